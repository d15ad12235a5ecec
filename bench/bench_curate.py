"""Benchmark of the curate stage on a synthetic corpus with planted duplicates.

    python bench/bench_curate.py                 # 200 MB (the reference size)
    python bench/bench_curate.py --size-mb 20    # a quick check
    python bench/bench_curate.py --engine datatrove --workers 1 2 --size-mb 20 40
                                                 # each size x each worker count: docs/s, peak RSS

The corpus: documents of random words from a 50k-word random vocabulary (so two unplanted
documents share essentially no 5-gram), written as JSON lines. Planted among them:
  - exact copies of earlier documents (`--exact-frac`);
  - near copies: an earlier document with 0.5-1.5% of its words replaced, which keeps the true
    Jaccard similarity of 5-gram shingle sets around 0.86-0.95 (computed and printed below).
A copy always comes after its original, so "keep the first" must remove the copy.

The stage runs as `lmforge curate` in a subprocess, so peak RSS is the stage's own. Printed:
documents/s, peak RSS, precision/recall of near-duplicate removal against the planted pairs
(target at Jaccard 0.8: recall >= 0.95, precision >= 0.99), the exact-duplicate count, and two
references: the stage's MinHash against naive per-document datasketch MinHash (speed ratio),
and the measured memory per document of the near-dedup index.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lmforge.data.curate import DocIndex, MinHasher, dedup_key, key_hash

ROOT = Path(__file__).resolve().parent


def render(words: np.ndarray, vocab: np.ndarray) -> str:
    """Word ids -> text: a period every 12 words, a paragraph break every 60."""
    toks = vocab[words].tolist()
    out = []
    for i, w in enumerate(toks, 1):
        out.append(w + ("." if i % 12 == 0 or i == len(toks) else ""))
        if i % 60 == 0 and i < len(toks):
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


def shingles(text: str, n: int) -> set[tuple[str, ...]]:
    w = dedup_key(text).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def generate(out: Path, size_mb: float, exact_frac: float, near_frac: float, seed: int, files: int):
    """Write the corpus; return ground truth: hash -> doc kind, and the planted near pairs."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(3, 11))) for _ in range(50_000)])
    target = size_mb * 1e6
    per_file = target / files
    pool: list[np.ndarray] = []  # recent unique documents that may still be copied (each at most once)
    kinds: dict[int, str] = {}  # key hash -> "unique" | "near" (exact copies share their original's hash)
    near_pairs: list[tuple[str, str]] = []
    n_docs = n_exact = written = 0
    fi, f, in_file = 0, None, 0.0
    while written < target:
        if f is None or in_file >= per_file:
            if f is not None:
                f.close()
            f, in_file = open(out / f"corpus-{fi:03d}.jsonl", "w", encoding="utf-8"), 0.0
            fi += 1
        r = rng.random()
        if r < exact_frac and pool:
            words = pool.pop(int(rng.integers(len(pool))))
            text = render(words, vocab)
            n_exact += 1
        elif r < exact_frac + near_frac and pool:
            orig = pool.pop(int(rng.integers(len(pool))))
            words = orig.copy()
            k = max(1, int(len(words) * rng.uniform(0.005, 0.015)))
            pos = rng.choice(len(words), k, replace=False)
            words[pos] = rng.integers(0, len(vocab), k)
            text = render(words, vocab)
            kinds[key_hash(dedup_key(text))] = "near"
            near_pairs.append((render(orig, vocab), text))
        else:
            words = rng.integers(0, len(vocab), int(rng.integers(150, 600)))
            text = render(words, vocab)
            kinds[key_hash(dedup_key(text))] = "unique"
            pool.append(words)
            if len(pool) > 5000:
                pool.pop(0)
        line = json.dumps({"text": text}) + "\n"
        f.write(line)
        in_file += len(line)
        written += len(line)
        n_docs += 1
    f.close()
    return n_docs, n_exact, kinds, near_pairs


def reference_speed(texts: list[str], num_perm: int, ngram: int) -> tuple[float, float]:
    """Seconds to MinHash `texts`: the stage's batched numpy path vs naive datasketch per document."""
    from datasketch import MinHash

    hasher = MinHasher(num_perm, ngram, seed=1)
    t = time.perf_counter()
    hasher.signatures([hasher.shingle_hashes(dedup_key(x)) for x in texts])
    fast = time.perf_counter() - t
    t = time.perf_counter()
    for x in texts:
        w = dedup_key(x).split()
        m = MinHash(num_perm=num_perm)
        m.update_batch([" ".join(w[i:i + ngram]).encode() for i in range(len(w) - ngram + 1)])
    return fast, time.perf_counter() - t


def index_bytes_per_doc(n: int, num_perm: int, threshold: float) -> float:
    """Measured Python-heap bytes per document held by the near-dedup index (LSH + signature)."""
    hasher = MinHasher(num_perm, 5, seed=1)
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 2**32, (n, num_perm), dtype=np.uint32)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = DocIndex(hasher, threshold, (0.1, 0.9))
    for i in range(n):
        index.add(sigs[i], 0, 0, i)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # The signature store grows in 65536-document blocks: count its share per document, not the block.
    return (used - index.blocks[0].nbytes * len(index.blocks)) / n + 4 * num_perm


def run_stage(cfg: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest single process) of `lmforge curate` in a fresh parent,
    so RUSAGE_CHILDREN covers this run only (its datatrove workers included)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(p.stderr[-3000:] if p.returncode else ''); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "lmforge.cli", "curate", str(cfg),
                           "--out", str(out), "--force"], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"curate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.time() - t, int(proc.stdout.split()[-1]) / 1024  # KiB on Linux


def measure(args, corpus: Path, n_docs: int, size: float, n_exact: int, kinds: dict[int, str], workers: int) -> bool:
    """Run the stage once with `workers`; print speed, memory and dedup quality; True if the targets are met."""
    cfg = args.out / f"curate-{workers}.yaml"
    cfg.write_text(f"inputs: ['{corpus}/*.jsonl']\nnear_dedup: {{threshold: {args.threshold}}}\n"
                   f"engine: {args.engine}\nworkers: {workers}\n")
    run = args.out / f"run-{workers}"
    wall, peak_mb = run_stage(cfg, run)
    data = run / "data"
    report = json.loads((data / "curation_report.json").read_text())

    present: set[int] = set()
    for shard in sorted(data.glob("*.parquet")):
        for b in pq.ParquetFile(shard).iter_batches(columns=["text"]):
            present.update(key_hash(dedup_key(x)) for x in b.column(0).to_pylist())
    near_hashes = [h for h, k in kinds.items() if k == "near"]
    tp = sum(h not in present for h in near_hashes)
    removed = {k: v["count"] for k, v in report["removed"].items() if v["count"]}
    near_removed = removed.get("near_duplicate", 0)
    unique_lost = sum(h not in present for h, k in kinds.items() if k == "unique")
    recall = tp / max(1, len(near_hashes))
    precision = tp / max(1, near_removed)

    print(f"[engine {args.engine}, {workers} worker(s), {size:.0f} MB] "
          f"curate: {report['documents_in']} in -> {report['documents_out']} out; removed {removed}")
    print(f"speed: {report['docs_per_s']:.0f} documents/s inside the stage ({report['seconds']:.1f} s), "
          f"{n_docs / wall:.0f} documents/s and {size / wall:.2f} MB/s including start-up ({wall:.1f} s)")
    print(f"peak RSS of the largest stage process (the main one or a worker): {peak_mb:.0f} MB")
    print(f"near-dup removal at Jaccard {args.threshold}: recall {recall:.4f} ({tp}/{len(near_hashes)}), "
          f"precision {precision:.4f} ({tp}/{near_removed}); unplanted documents lost: {unique_lost}")
    print(f"exact duplicates removed: {removed.get('exact_duplicate', 0)} (planted {n_exact})")

    return recall >= 0.95 and precision >= 0.99


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=200.0, help="Corpus size in MB of JSON lines.")
    ap.add_argument("--exact-frac", type=float, default=0.03, help="Fraction of documents that are exact copies.")
    ap.add_argument("--near-frac", type=float, default=0.05, help="Fraction of documents that are near copies.")
    ap.add_argument("--files", type=int, default=4, help="Number of JSONL files to spread the corpus over.")
    ap.add_argument("--threshold", type=float, default=0.8, help="near_dedup.threshold.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=["local", "datatrove"], default="local", help="curate's engine.")
    ap.add_argument("--workers", type=int, nargs="+", default=[2],
                    help="Worker counts to run (engine: datatrove; each is one run of the stage).")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "curate", help="Work folder (emptied first).")
    ap.add_argument("--keep", action="store_true", help="Keep the corpus and the outputs.")
    args = ap.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    corpus = args.out / "corpus"
    corpus.mkdir(parents=True)
    t = time.time()
    n_docs, n_exact, kinds, near_pairs = generate(corpus, args.size_mb, args.exact_frac, args.near_frac,
                                                  args.seed, args.files)
    size = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
    print(f"corpus: {n_docs} documents, {size:.1f} MB in {args.files} files ({time.time() - t:.1f} s to generate); "
          f"planted {n_exact} exact copies and {len(near_pairs)} near copies")
    jac = np.array([len(a & b) / len(a | b) for a, b in ((shingles(x, 5), shingles(y, 5)) for x, y in near_pairs)])
    print(f"planted near pairs, true Jaccard of 5-gram shingles: min {jac.min():.3f}  mean {jac.mean():.3f}  "
          f"max {jac.max():.3f}  ({int((jac < args.threshold).sum())} below {args.threshold})")

    ok = True
    for workers in args.workers:
        ok &= measure(args, corpus, n_docs, size, n_exact, kinds, workers)
    sample = [x for pair in near_pairs[:300] for x in pair][:500]
    fast, naive = reference_speed(sample, 128, 5)
    print(f"MinHash of {len(sample)} docs: stage {fast * 1e3:.0f} ms vs naive datasketch per doc "
          f"{naive * 1e3:.0f} ms -> {naive / max(fast, 1e-9):.1f}x faster")
    per_doc = index_bytes_per_doc(20_000, 128, args.threshold)
    print(f"near-dedup index memory: {per_doc:.0f} bytes per kept document (LSH tables + 512 B signature)")
    print("targets (recall >= 0.95, precision >= 0.99):", "met" if ok else "NOT met")
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
