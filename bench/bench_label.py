"""Write latency of the labelling server under concurrent annotators (loopback only, bounded).

    python bench/bench_label.py                      # 10 annotators x 40 judgments
    python bench/bench_label.py --annotators 20 --per-annotator 20

`lmforge label --responses` serves a generated store in a subprocess (the real command, port 0 on
127.0.0.1). Each annotator is a thread with its own HTTP connection that loops GET /api/next ->
POST /api/judgments (a full ranking of k responses, a flag, a note) as fast as it can: far
harsher than people, who take seconds per item. Printed: POST latency p50/p99/max, GET /api/next
p99, judgments/s, and whether every acknowledged judgment is in the database afterwards. The
reference is the floor: the same judgments committed straight into a Store (no HTTP, one thread);
the ratio is what the server, the lock and the concurrency add.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from lmforge.label.store import Response, Store


def write_responses(path: Path, n: int, k: int) -> None:
    rows = [{"id": f"q{i}", "prompt": f"Question {i}: what is {i} plus {i}?",
             "responses": [{"text": f"Answer {j} to question {i}: " + "word " * random.randint(5, 60),
                            "model": f"m{j % 2}", "sampling": {"temperature": 0.7, "seed": j}} for j in range(k)]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def annotate(url: str, token: str, n: int, post_ms: list, next_ms: list, acked: list) -> None:
    rng = random.Random(token)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.get("/api/next").json()
            next_ms.append(1000 * (time.perf_counter() - t))
            if r["item"] is None:
                return
            ids = [x["id"] for x in r["item"]["responses"]]
            rng.shuffle(ids)
            body = {"item_id": r["item"]["id"], "verdict": "ranked", "ranking": ids, "flags": {str(ids[-1]): ["wrong"]},
                    "note": "bench", "seconds": 1.0}
            t = time.perf_counter()
            resp = c.post("/api/judgments", json=body)
            post_ms.append(1000 * (time.perf_counter() - t))
            resp.raise_for_status()
            acked.append(resp.json()["judgment_id"])


def reference(items: int, k: int, judgments: int) -> list[float]:
    """The floor: store.judge straight into SQLite (same settings), one thread, no HTTP."""
    with tempfile.TemporaryDirectory() as d:
        s = Store(Path(d) / "ref.sqlite")
        s.configure(mode="rank", overlap=0.0, overlap_annotators=2)
        for i in range(items):
            s.add_item(f"q{i}", [{"role": "user", "content": f"q{i}"}],
                       [Response(f"a{j}", "m", {}) for j in range(k)], "bench")
        a = s.annotator(s.add_annotator("ref"))
        ms = []
        for _ in range(judgments):
            i = s.next_item(a.id)
            if i is None:
                break
            ids = [r["id"] for r in s.item(i)["responses"]]
            t = time.perf_counter()
            s.judge(a.id, i, verdict="ranked", ranking=ids, flags={str(ids[-1]): ["wrong"]}, note="bench", seconds=1.0)
            ms.append(1000 * (time.perf_counter() - t))
        s.close()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotators", type=int, default=10)
    ap.add_argument("--per-annotator", type=int, default=40, help="judgments each annotator makes (bounded)")
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    n_items = args.annotators * args.per_annotator
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_responses(d / "responses.jsonl", n_items, args.k)
        names = [f"a{i}" for i in range(args.annotators)]
        add = subprocess.run([sys.executable, "-m", "lmforge.cli", "label", "--out", str(d / "lab"),
                              *sum((["--add-annotator", n] for n in names), [])], capture_output=True, text=True, check=True)
        tokens = [line.split("token ")[1].strip() for line in add.stdout.splitlines() if " token " in line]
        server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "label", "--responses", str(d / "responses.jsonl"),
                                   "--out", str(d / "lab"), "--k", str(args.k), "--port", "0", "--overlap", "0.2",
                                   "--max-wait", "600"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = None
        for line in server.stdout:
            if line.startswith("label: serving "):
                url = line.split()[2]
                break
        if url is None:
            sys.exit(f"the server did not start: {server.communicate()[0]}")
        post_ms: list[float] = []
        next_ms: list[float] = []
        acked: list[int] = []
        threads = [threading.Thread(target=annotate, args=(url, t, args.per_annotator, post_ms, next_ms, acked))
                   for t in tokens]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        server.terminate()
        server.communicate(timeout=120)
        s = Store(d / "lab" / "labels.sqlite")
        stored = {j["id"] for j in s.judgments()}
        s.close()
    ref = reference(n_items, args.k, len(acked))
    p = np.percentile
    print(f"{args.annotators} annotators x {args.per_annotator} judgments (k={args.k}) over loopback HTTP, "
          f"{len(acked)} judgments in {wall:.1f}s ({len(acked) / wall:.0f}/s)")
    print(f"POST /api/judgments ms: p50 {p(post_ms, 50):.1f}  p99 {p(post_ms, 99):.1f}  max {max(post_ms):.1f}")
    print(f"GET /api/next ms:       p50 {p(next_ms, 50):.1f}  p99 {p(next_ms, 99):.1f}")
    print(f"reference Store.judge (no HTTP, 1 thread) ms: p50 {p(ref, 50):.2f}  p99 {p(ref, 99):.2f}")
    print(f"ratio p99 server / reference: {p(post_ms, 99) / p(ref, 99):.1f}x")
    lost = set(acked) - stored
    print(f"acknowledged judgments missing from the database: {len(lost)} (of {len(acked)})")
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
