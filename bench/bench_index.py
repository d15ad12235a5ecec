"""Benchmark of the retrieval index: build docs/s and query latency p50/p99 on >= 100k chunks,
lmforge against the libraries it wraps used bare (the overhead lmforge adds).

    python bench/bench_index.py                      # 22k documents, ~100k chunks
    python bench/bench_index.py --docs 2000          # a quick check

The corpus: documents of Zipf-distributed words from a 30k-word random vocabulary, each about
`--chunks-per-doc` chunks of 64 tokens of a byte-level BPE tokenizer trained here on a sample.

Measured, on the same chunk texts and queries:

    build    lmforge `retrieval.index.sync` (read from memory, token-aware chunking, BM25 terms,
             bm25s index, Parquet chunk table, atomic folder)  vs  bm25s bare (tokenize + index
             of the chunk texts lmforge produced: chunking is lmforge's addition, so it is timed
             inside the lmforge figure only)
    update   sync with 1% more documents (only they are chunked; BM25's matrices are re-derived from the
             stored terms, since every IDF changes, so on a BM25-only index that build dominates)
    BM25 query   `Index.search(mode="bm25")`  vs  bm25s bare (tokenize the query, score, top-k)
    dense query  `DenseStore.search` through `Index.search(mode="dense")` (a stub embedder returns
                 a fixed random vector, so the embedding model's cost is excluded)  vs  FAISS bare
                 (`IndexFlatIP.search`) on the same 100k x 384 unit vectors

The machine is shared while this is written: figures are indicative, the ratios more so.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.retrieval import lexical
from lmforge.retrieval.dense import DenseStore
from lmforge.retrieval.documents import Document
from lmforge.retrieval.index import open_index, sync


def corpus(n_docs: int, words_per_doc: int, seed: int) -> list[Document]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(30_000)])
    docs = []
    for i in range(n_docs):
        ids = np.minimum(rng.zipf(1.2, words_per_doc) - 1, len(vocab) - 1)
        text = " ".join(vocab[ids]) + "."
        docs.append(Document(f"doc{i:07d}.md line 1", text, hashlib.sha256(text.encode()).hexdigest()))
    return docs


def train_tokenizer(sample: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=4000, show_progress=False, special_tokens=["<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eos|>")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def timed(fns: list, queries) -> list[list[float]]:
    """Per-query seconds of each function; the functions take turns on each query, so a busy
    machine's load swings hit them alike."""
    out: list[list[float]] = [[] for _ in fns]
    for q in queries:
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn(q)
            out[i].append(time.perf_counter() - t)
    return out


class StubEmbedder:
    """Returns one fixed unit vector: times the vector store, not an embedding model."""

    def __init__(self, dim: int, seed: int):
        v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
        self.v = v / np.linalg.norm(v)

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.tile(self.v, (len(texts), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=22_000)
    ap.add_argument("--chunks-per-doc", type=int, default=5)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    chunk_tokens, overlap = 64, 0
    docs = corpus(args.docs + args.docs // 100, 40 * args.chunks_per_doc, args.seed)
    base, extra = docs[:args.docs], docs[args.docs:]
    tok = train_tokenizer([d.text for d in base[:500]])
    tmp = Path(tempfile.mkdtemp(prefix="bench_index."))
    try:
        t = time.perf_counter()
        rep = sync(tmp / "ix", base, tok, "bench", embedder=None, chunk_tokens=chunk_tokens, overlap=overlap,
                   log=lambda _m: None)
        lm_build = time.perf_counter() - t
        ix = open_index(tmp / "ix")
        texts = [c.text for c in ix.chunks]
        t = time.perf_counter()
        bare = lexical.build(lexical.terms(texts), k1=1.5, b=0.75)
        bare_build = time.perf_counter() - t
        t = time.perf_counter()
        up = sync(tmp / "ix", base + extra, tok, "bench", embedder=None, chunk_tokens=chunk_tokens, overlap=overlap,
                  log=lambda _m: None)
        lm_update = time.perf_counter() - t
        print(f"corpus: {len(base):,} documents -> {rep.chunks:,} chunks of <= {chunk_tokens} tokens")
        print(f"build   lmforge {len(base) / lm_build:,.0f} docs/s ({lm_build:.1f} s) | bm25s bare "
              f"{len(base) / bare_build:,.0f} docs/s ({bare_build:.1f} s, without chunking) | lmforge/bare time "
              f"{lm_build / bare_build:.2f}x")
        print(f"update  +{len(extra)} documents ({up.added} chunked, {up.unchanged:,} reused): {lm_update:.1f} s "
              f"= {lm_update / lm_build:.2f}x the full build")

        rng = np.random.default_rng(args.seed + 1)
        queries = [" ".join(rng.choice(texts[int(i)].split(), 4)) for i in rng.integers(0, len(texts), args.queries)]
        ix = open_index(tmp / "ix")
        def bm25s_bare(q):
            import bm25s

            # strings, not bm25s.tokenize's ids: those are numbered in the query's own vocabulary
            return bare.retrieve(bm25s.tokenize([q], stopwords="en", return_ids=False, show_progress=False), k=10,
                                 show_progress=False)

        lm_q, bare_q, lib_q = timed([lambda q: ix.search(q, 10, mode="bm25"),
                                     lambda q: lexical.search(bare, lexical.terms([q])[0], 10), bm25s_bare], queries)
        print(f"BM25 query (k=10, {len(queries)} queries)  lmforge p50 {pct(lm_q, 50):.2f} ms p99 {pct(lm_q, 99):.2f} ms | "
              f"bm25s retrieve() p50 {pct(lib_q, 50):.2f} ms p99 {pct(lib_q, 99):.2f} ms | "
              f"bm25s scores+top-k p50 {pct(bare_q, 50):.2f} ms | lmforge/retrieve() p50 {pct(lm_q, 50) / pct(lib_q, 50):.2f}x")

        import faiss

        vecs = np.random.default_rng(args.seed + 2).standard_normal((len(ix.chunks), args.dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        t = time.perf_counter()
        ids = np.array([c.id for c in ix.chunks], dtype=np.int64)
        ix.dense = DenseStore.build(ids, vecs)
        lm_dense_build = time.perf_counter() - t
        flat = faiss.IndexFlatIP(args.dim)
        t = time.perf_counter()
        flat.add(vecs)
        bare_dense_build = time.perf_counter() - t
        ix.embedder = StubEmbedder(args.dim, args.seed)
        qv = ix.embedder.embed(["x"])
        lm_d, bare_d, hyb = timed([lambda q: ix.search(q, 10, mode="dense"), lambda q: flat.search(qv, 10),
                                   lambda q: ix.search(q, 10, mode="hybrid")], queries[:50])
        print(f"dense add {len(ids):,} x {args.dim}: lmforge {lm_dense_build:.2f} s | FAISS bare {bare_dense_build:.2f} s")
        print(f"dense query (k=10, exact)  lmforge p50 {pct(lm_d, 50):.2f} ms p99 {pct(lm_d, 99):.2f} ms | FAISS bare "
              f"p50 {pct(bare_d, 50):.2f} ms p99 {pct(bare_d, 99):.2f} ms | ratio p50 {pct(lm_d, 50) / pct(bare_d, 50):.2f}x")
        print(f"hybrid query (BM25 + dense, RRF)  lmforge p50 {pct(hyb, 50):.2f} ms p99 {pct(hyb, 99):.2f} ms")
        print("(shared, busy machine: figures are indicative)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
