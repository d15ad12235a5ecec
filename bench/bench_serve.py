"""Server throughput and latency: `lmforge serve` under 16 concurrent streaming clients.

    python bench/bench_serve.py                       # the random 5M-parameter Llama
    python bench/bench_serve.py --model runs/default/sft --clients 16 --requests 8

The server runs as `lmforge serve` in a subprocess (its own process, as deployed); the clients
are asyncio tasks on one `httpx.AsyncClient`, each sending `--requests` streaming completions
one after another with a fixed length (`min_tokens` = `max_tokens`). Printed: completion
tokens/s, request latency p50/p99, time to first token p50/p99, and the same workload with one
client, whose ratio shows what batching concurrent requests buys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import tiny_llama, word_tokenizer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif first is None and obj["choices"] and obj["choices"][0]["text"]:
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return total, first if first is not None else total, tokens


async def load(base: str, clients: int, requests: int, body: dict) -> dict:
    latencies, ttfts, tokens = [], [], 0
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def worker() -> None:
            nonlocal tokens
            for _ in range(requests):
                lat, ttft, n = await one_request(client, body)
                latencies.append(lat)
                ttfts.append(ttft)
                tokens += n

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"tok_s": tokens / wall, "tokens": tokens, "wall": wall, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99), "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="A model folder (default: a random 5M-parameter Llama saved to a temp folder).")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=6, help="Requests per client.")
    ap.add_argument("--tokens", type=int, default=64, help="Completion tokens per request.")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server process.")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = str(Path(tmp) / "model")
            tiny_llama(8192).save_pretrained(model_dir)
            word_tokenizer(8192).save_pretrained(model_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", model_dir, "--name", "bench", "--port", str(port),
               "--max-concurrent", str(max(args.clients, 1)), "--device", "cpu", "max_tokens=4096"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            prompt = " ".join(f"t{i}" for i in range(10, 42))  # 32 tokens
            body = {"model": "bench", "prompt": prompt, "max_tokens": args.tokens, "min_tokens": args.tokens,
                    "temperature": 0.7, "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True}}
            asyncio.run(load(base, 2, 1, body))  # warm-up
            single = asyncio.run(load(base, 1, max(2, args.requests // 2), body))
            many = asyncio.run(load(base, args.clients, args.requests, body))
        finally:
            proc.terminate()
            proc.wait(30)
    for name, r in (("1 client", single), (f"{args.clients} clients", many)):
        print(f"{name:>11}: {r['tok_s']:7.0f} completion tok/s | latency p50 {r['p50']:.2f}s p99 {r['p99']:.2f}s | "
              f"first token p50 {r['ttft_p50'] * 1e3:.0f}ms p99 {r['ttft_p99'] * 1e3:.0f}ms ({r['tokens']} tokens)")
    print(f"throughput ratio, {args.clients} clients vs 1: {many['tok_s'] / single['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
