"""Soak: one `lmforge serve` on loopback under mixed valid, invalid, slow and disconnecting
clients for a bounded time and request count.

    python bench/bench_soak.py                          # 180 s or 4000 requests, the random 5M Llama
    python bench/bench_soak.py --seconds 600 --workers 32 --model runs/default/sft

The server runs as `lmforge serve` in a subprocess bound to 127.0.0.1 (nothing else is ever
contacted). Each worker loops, picking a client kind at random:

    valid        a chat or completions request, streamed or not (200, or 429 when full)
    invalid      a bad body: broken/deep JSON, lone surrogates, wrong types, too many rows,
                 non-JSON content type, a foreign Host header (must be a 4xx, never a 5xx)
    slow         sends nothing, trickles headers, or trickles a body (the server must close it or 408)
    disconnect   starts a request (streamed or not) and hangs up early

Printed: requests by kind and outcome, latency p50/p99 of the valid 200s, the server's slots
and rows in use after the run (must be 0), its rows cancelled, and its RSS after a warm-up and
after each phase of the run (growth that levels off is the allocator's high-water mark; growth
that goes on phase after phase is a leak). Exit status 1 if any 5xx was answered or a slot stayed in use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import tiny_llama, word_tokenizer  # noqa: E402

HOST = "127.0.0.1"  # loopback only, by design
PROMPT = " ".join(f"t{i}" for i in range(10, 30))
INVALID: list[tuple[str, bytes, dict]] = [
    ("completions", b"{not json", {}),
    ("completions", b"[" * 100_000, {}),
    ("completions", b'{"model": "soak", "prompt": "\\ud800"}', {}),
    ("chat", b'{"model": "soak", "messages": [{"role": "user", "content": "\\udfff"}]}', {}),
    ("completions", json.dumps({"model": "soak", "prompt": PROMPT, "temperature": "hot"}).encode(), {}),
    ("completions", json.dumps({"model": "soak", "prompt": [PROMPT] * 2000, "n": 8}).encode(), {}),
    ("completions", json.dumps({"model": "soak", "prompt": PROMPT, "min_tokens": 9, "max_tokens": 3}).encode(), {}),
    ("chat", json.dumps({"model": "soak", "messages": [{"role": "robot", "content": "x"}]}).encode(), {}),
    ("completions", json.dumps({"model": "gpt-4o", "prompt": PROMPT}).encode(), {}),
    ("completions", json.dumps({"model": "soak", "prompt": "t5 " * 300_000}).encode(), {}),
    ("completions", json.dumps({"model": "soak", "prompt": PROMPT}).encode(), {"content-type": "text/plain"}),
    ("completions", json.dumps({"model": "soak", "prompt": PROMPT}).encode(), {"host": "attacker.example"}),
]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] if s else float("nan")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Soak:
    def __init__(self, base: str, port: int, rng: random.Random):
        self.base, self.port, self.rng = base, port, rng
        self.outcomes: Counter = Counter()
        self.latencies: list[float] = []

    def valid_body(self) -> tuple[str, dict]:
        stream = self.rng.random() < 0.5
        tokens = self.rng.choice([4, 16, 32])
        extra = {"temperature": self.rng.choice([0, 0.7, 1.0, 1e-38]), "max_tokens": tokens, "stream": stream}
        if self.rng.random() < 0.5:
            return "chat", {"model": "soak", "messages": [{"role": "user", "content": PROMPT}], **extra}
        return "completions", {"model": "soak", "prompt": PROMPT, "n": self.rng.choice([1, 2]), **extra}

    async def valid(self, client: httpx.AsyncClient) -> str:
        route, body = self.valid_body()
        url = "/v1/chat/completions" if route == "chat" else "/v1/completions"
        t0 = time.perf_counter()
        async with client.stream("POST", url, json=body) as r:
            text = (await r.aread()).decode()
        if r.status_code == 200:
            if body["stream"] and not text.rstrip().endswith("data: [DONE]"):
                return "200 but truncated stream"
            if body["stream"] and '"error"' in text:
                return "200 stream with an error event"
            self.latencies.append(time.perf_counter() - t0)
        return str(r.status_code)

    async def invalid(self, client: httpx.AsyncClient) -> str:
        route, raw, headers = self.rng.choice(INVALID)
        url = "/v1/chat/completions" if route == "chat" else "/v1/completions"
        r = await client.post(url, content=raw, headers={"content-type": "application/json", **headers})
        ok_json = r.headers.get("content-type", "").startswith("application/json") and "error" in r.json()
        return f"{r.status_code // 100}xx" + ("" if ok_json else " (not a JSON error)")

    async def slow(self) -> str:
        kind = self.rng.choice(["idle", "headers", "body"])
        reader, writer = await asyncio.open_connection(HOST, self.port)
        try:
            if kind == "headers":
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            elif kind == "body":
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5000\r\n\r\n{")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    data = await asyncio.wait_for(reader.read(4096), 0.5)
                except asyncio.TimeoutError:
                    if kind != "idle":
                        writer.write(b"x")  # one more byte, never finishing
                    continue
                if not data:
                    return f"{kind}: closed by the server"
                if data.startswith(b"HTTP/1.1 408"):
                    return f"{kind}: 408"
                return f"{kind}: answered {data[:12]!r}"
            return f"{kind}: still open after 60 s"
        except ConnectionError:
            return f"{kind}: closed by the server"
        finally:
            writer.close()

    async def disconnect(self) -> str:
        route, body = self.valid_body()
        body = {**body, "max_tokens": 64, "min_tokens": 64}
        url = "/v1/chat/completions" if route == "chat" else "/v1/completions"
        async with httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(30, read=0.3)) as c:
            try:
                async with c.stream("POST", url, json=body) as r:
                    async for _ in r.aiter_lines():
                        break  # first line, then hang up
                    return f"stream hung up ({r.status_code})"
            except httpx.ReadTimeout:
                return "waiting client hung up"

    async def worker(self, stop_at: float, budget: list[int]) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as client:
            while time.monotonic() < stop_at and budget[0] > 0:
                budget[0] -= 1
                kind = self.rng.choices(["valid", "invalid", "slow", "disconnect"], [50, 30, 8, 12])[0]
                try:
                    if kind == "valid":
                        out = await self.valid(client)
                    elif kind == "invalid":
                        out = await self.invalid(client)
                    elif kind == "slow":
                        out = await self.slow()
                    else:
                        out = await self.disconnect()
                except (httpx.HTTPError, OSError) as e:
                    out = f"client error {type(e).__name__}"
                self.outcomes[(kind, out)] += 1


def start_server(model_dir: str, port: int, threads: int | None) -> subprocess.Popen:
    env = {**os.environ, "LMFORGE_API_KEY": "", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", model_dir, "--name", "soak", "--host", HOST, "--port", str(port),
           "--max-concurrent", "8", "--device", "cpu", "--timeout", "60", "max_queue=16", "max_tokens=64",
           "header_timeout_s=2", "body_timeout_s=2", "max_rows=16"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the server did not start:\n{proc.stdout.read() if proc.poll() is not None else ''}")
        time.sleep(0.2)


async def settle(base: str) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        deadline = time.monotonic() + 30
        while True:
            h = (await c.get("/health")).json()
            if (h["running"], h["waiting"], h["rows"]) == (0, 0, 0) or time.monotonic() > deadline:
                return h
            await asyncio.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="A model folder (default: a random 5M-parameter Llama saved to a temp folder).")
    ap.add_argument("--seconds", type=float, default=180, help="Stop starting requests after this long.")
    ap.add_argument("--requests", type=int, default=4000, help="Stop after this many requests in all.")
    ap.add_argument("--workers", type=int, default=24, help="Concurrent clients.")
    ap.add_argument("--phases", type=int, default=3, help="Measure the server's RSS after each of this many phases.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server process.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            tiny_llama(8192).save_pretrained(model_dir)
            word_tokenizer(8192).save_pretrained(model_dir)
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        proc = start_server(model_dir, port, args.threads)
        base = f"http://{HOST}:{port}"
        try:
            soak = Soak(base, port, random.Random(args.seed))
            asyncio.run(Soak(base, port, random.Random(-1)).worker(time.monotonic() + 5, [20]))  # warm-up
            rss = [rss_kib(proc.pid)]
            t0 = time.monotonic()
            budget = [args.requests]

            async def run(until: float) -> None:
                await asyncio.gather(*(soak.worker(until, budget) for _ in range(args.workers)))

            for phase in range(1, args.phases + 1):  # RSS after each phase: a plateau, or growth that goes on
                asyncio.run(run(t0 + args.seconds * phase / args.phases))
                asyncio.run(settle(base))
                rss.append(rss_kib(proc.pid))
            wall = time.monotonic() - t0
            health = asyncio.run(settle(base))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    total = sum(soak.outcomes.values())
    print(f"{total} requests in {wall:.0f} s from {args.workers} clients (loopback {HOST})")
    for (kind, out), n in sorted(soak.outcomes.items()):
        print(f"  {kind:<10} {out:<40} {n:6d}")
    print(f"valid 200s: latency p50 {percentile(soak.latencies, 0.5):.2f}s p99 {percentile(soak.latencies, 0.99):.2f}s "
          f"({len(soak.latencies)} requests)")
    print(f"after the run: running {health['running']}, waiting {health['waiting']}, rows {health['rows']} "
          f"(rows cancelled over the run: {health['rows_cancelled']})")
    steps = " -> ".join(f"{r / 1024:.1f}" for r in rss)
    print(f"server RSS (MiB) after warm-up, then after each of {args.phases} phases: {steps} "
          f"(growth {(rss[-1] - rss[0]) / 1024:+.1f} MiB; in the last phase {(rss[-1] - rss[-2]) / 1024:+.1f} MiB)")
    five = sum(n for (kind, out), n in soak.outcomes.items() if out.startswith("5"))
    stuck = (health["running"], health["waiting"], health["rows"]) != (0, 0, 0)
    if five or stuck:
        print(f"FAILED: {five} 5xx answers; slots or rows still in use: {stuck}")
        sys.exit(1)


if __name__ == "__main__":
    main()
