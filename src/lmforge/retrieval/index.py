"""The retrieval index: one folder holding the chunks, their BM25 index and (optionally) their
vectors, plus what it was built from.

    <index>/
        index.json      format, tokenizer and embedding-model identities, chunking and BM25
                        settings, every document's key and sha256 (in order), chunk count
        chunks.parquet  id, doc, ordinal, text, n_tokens, terms   (row i = BM25 row i)
        bm25/           bm25s's matrices
        dense.faiss     chunk vectors (only with an embedding model)

`sync()` makes the index hold exactly the given documents. Unchanged documents (same key, same
sha256) keep their chunks, BM25 terms and vectors; only new or changed documents are chunked
and embedded (the costly step). The BM25 matrices are then re-derived from the stored terms,
because every document's IDF changes when the corpus does; that is a sparse-matrix build, not
a re-read. Chunks are ordered as the documents are given, so an updated index is file-for-file
the index a rebuild from scratch would write (tested).

`open_index()` refuses (one sentence) an index built with another tokenizer or embedding model
than the one now asked for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.retrieval import lexical
from lmforge.retrieval.chunking import token_offsets, windows
from lmforge.retrieval.dense import DenseStore, Embedder, load_embedder
from lmforge.retrieval.documents import Document
from lmforge.retrieval.fusion import reciprocal_rank_fusion
from lmforge.rundir import atomic_write_json, resolve_artifact, staged_dir

FORMAT = 1
META = "index.json"
CHUNKS = "chunks.parquet"
Mode = Literal["auto", "bm25", "dense", "hybrid"]


@dataclass(frozen=True)
class Chunk:
    id: int  # 63-bit, from (document key, document sha256, ordinal): stable across updates
    doc: str
    ordinal: int
    text: str
    n_tokens: int
    terms: list[str]


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk with its rank score (BM25, cosine, or fused RRF score)."""

    chunk_id: int
    doc: str
    ordinal: int
    text: str
    n_tokens: int
    score: float

    def as_dict(self) -> dict:
        return {"chunk_id": self.chunk_id, "source": self.doc, "ordinal": self.ordinal, "text": self.text,
                "score": round(self.score, 6)}


@dataclass
class SyncReport:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    chunks: int = 0
    chunks_embedded: int = 0
    rebuilt_because: str | None = None
    skipped: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tokenizer_identity(tokenizer: Any, source: str) -> dict:
    """sha256 of the vocabulary (token -> id) and special tokens: what chunk sizes depend on."""
    ident = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens], ensure_ascii=False)
    return {"source": str(source), "sha256": hashlib.sha256(ident.encode()).hexdigest()}


def chunk_id(doc: Document, ordinal: int) -> int:
    h = hashlib.sha256(f"{doc.key}\0{doc.sha256}\0{ordinal}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1  # FAISS ids are signed 64-bit


def chunk_documents(docs: list[Document], tokenizer: Any, *, chunk_tokens: int, overlap: int,
                    batch: int = 256) -> list[list[Chunk]]:
    """Each document's chunks; tokenised and given BM25 terms in batches (one call per batch)."""
    out: list[list[Chunk]] = []
    for start in range(0, len(docs), batch):
        part = docs[start:start + batch]
        spans = [windows(o, chunk_tokens=chunk_tokens, overlap=overlap) for o in token_offsets([d.text for d in part], tokenizer)]
        texts = [[d.text[s.start:s.end] for s in sp] for d, sp in zip(part, spans)]
        flat_terms = iter(lexical.terms([t for ts in texts for t in ts]))
        out += [[Chunk(chunk_id(d, i), d.key, i, t, s.n_tokens, next(flat_terms)) for i, (s, t) in enumerate(zip(sp, ts))]
                for d, sp, ts in zip(part, spans, texts)]
    return out


class Index:
    def __init__(self, folder: Path, meta: dict, chunks: list[Chunk], bm25: Any, dense: DenseStore | None):
        self.folder, self.meta, self.chunks, self.bm25, self.dense = folder, meta, chunks, bm25, dense
        self.embedder: Embedder | None = None
        self._row = {c.id: i for i, c in enumerate(chunks)}

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())

    def search(self, query: str, k: int, *, mode: Mode = "auto", depth: int = 50) -> list[Passage]:
        """The top `k` passages: BM25, dense, or both fused by RRF (auto = hybrid when the index
        has vectors); each ranking looks `depth` deep before fusion."""
        if mode == "auto":
            mode = "hybrid" if self.dense is not None else "bm25"
        if mode in ("dense", "hybrid") and self.dense is None:
            raise LmforgeError(f"Index {self.folder} has no dense vectors (built without an embedding model); "
                               "use mode bm25, or rebuild it with an embedding model.")
        ranked: list[list[tuple[int, float]]] = []
        if mode in ("bm25", "hybrid"):
            ranked.append(lexical.search(self.bm25, lexical.terms([query])[0], max(k, depth)))
        if mode in ("dense", "hybrid"):
            if self.embedder is None:
                self.embedder = load_embedder(self.meta["embedding"]["source"])
                check_embedder(self, self.embedder)
            hits = self.dense.search(self.embedder.embed([query])[0], max(k, depth))
            ranked.append([(self._row[i], s) for i, s in hits])
        if len(ranked) == 1:
            best = ranked[0][:k]
        else:
            best = [(int(r), s) for r, s in reciprocal_rank_fusion([[r for r, _ in x] for x in ranked])[:k]]
        return [self._passage(row, score) for row, score in best]

    def _passage(self, row: int, score: float) -> Passage:
        c = self.chunks[row]
        return Passage(c.id, c.doc, c.ordinal, c.text, c.n_tokens, score)


# --------------------------------------------------------------------------------------------
# Reading and writing


def _read_chunks(folder: Path) -> list[Chunk]:
    import pyarrow.parquet as pq

    t = pq.read_table(folder / CHUNKS).to_pydict()
    return [Chunk(*row) for row in zip(t["id"], t["doc"], t["ordinal"], t["text"], t["n_tokens"], t["terms"])]


def _write_chunks(folder: Path, chunks: list[Chunk]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array([c.id for c in chunks], pa.int64()),
        "doc": [c.doc for c in chunks], "ordinal": pa.array([c.ordinal for c in chunks], pa.int32()),
        "text": [c.text for c in chunks], "n_tokens": pa.array([c.n_tokens for c in chunks], pa.int32()),
        "terms": pa.array([c.terms for c in chunks], pa.list_(pa.string())),
    })
    pq.write_table(table, folder / CHUNKS)


def read_meta(folder: Path) -> dict | None:
    p = folder / META
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"Index metadata {p} cannot be read ({e}); rebuild the index.") from None
    if meta.get("format") != FORMAT:
        raise LmforgeError(f"Index {folder} has format {meta.get('format')!r}, not {FORMAT}; rebuild it.")
    return meta


def open_index(path: str | Path, *, tokenizer: Any = None, tokenizer_source: str = "",
               embedding_model: str | Path | None = None) -> Index:
    """Open an index for search; refuse one built with another tokenizer or embedding model."""
    folder = resolve_artifact(path, "index")
    meta = read_meta(folder)
    if meta is None:
        raise LmforgeError(f"{folder} is not an lmforge index (no {META}); build one with `lmforge index`.")
    if tokenizer is not None:
        now = tokenizer_identity(tokenizer, tokenizer_source)
        if now["sha256"] != meta["tokenizer"]["sha256"]:
            raise LmforgeError(
                f"Index {folder} was built with the tokenizer of {meta['tokenizer']['source']}, but the model now "
                f"asked for uses another tokenizer ({tokenizer_source or 'given'}); rebuild the index with it.")
    bm25 = lexical.load(folder / "bm25")
    dense = DenseStore.load(folder) if meta.get("embedding") else None
    index = Index(folder, meta, _read_chunks(folder), bm25, dense)
    if embedding_model is not None:
        if dense is None:
            raise LmforgeError(f"Index {folder} was built without an embedding model, but {embedding_model} was "
                               "asked for; rebuild the index with it.")
        index.embedder = load_embedder(embedding_model)
        check_embedder(index, index.embedder)
    return index


def check_embedder(index: Index, emb: Embedder) -> None:
    built = index.meta["embedding"]
    if emb.sha256 != built["sha256"] or emb.kind != built["kind"]:
        raise LmforgeError(
            f"Index {index.folder} was built with the embedding model {built['source']} ({built['kind']}, "
            f"sha256 {built['sha256'][:12]}), not {emb.source} ({emb.kind}, sha256 {emb.sha256[:12]}); "
            "query it with the same model or rebuild it.")


def sync(folder: str | Path, docs: list[Document], tokenizer: Any, tokenizer_source: str, *,
         embedder: Embedder | None, chunk_tokens: int, overlap: int, k1: float = 1.5, b: float = 0.75,
         log=print) -> SyncReport:
    """Make the index at `folder` hold exactly `docs`, reusing what an existing index has."""
    folder = Path(folder)
    dup = _first_duplicate([d.key for d in docs])
    if dup:
        raise LmforgeError(f"Document {dup} is given twice; list each input once.")
    settings = {"format": FORMAT, "tokenizer": tokenizer_identity(tokenizer, tokenizer_source),
                "embedding": embedder.identity if embedder else None,
                "chunking": {"chunk_tokens": chunk_tokens, "overlap": overlap}, "bm25": {"k1": k1, "b": b}}
    report = SyncReport()
    old_chunks, old_dense = _reusable(folder, settings, report)
    by_doc: dict[str, list[Chunk]] = {}
    for c in old_chunks:
        by_doc.setdefault(c.doc, []).append(c)
    old_sha = {k: v[0].id for k, v in by_doc.items()}  # any chunk id encodes its document's sha
    unchanged = {d.key for d in docs if d.key in by_doc and old_sha[d.key] == chunk_id(d, 0)}
    new_docs = [d for d in docs if d.key not in unchanged]
    made = dict(zip((d.key for d in new_docs),
                    chunk_documents(new_docs, tokenizer, chunk_tokens=chunk_tokens, overlap=overlap)))
    chunks = [c for d in docs for c in (by_doc[d.key] if d.key in unchanged else made[d.key])]
    fresh = [c for cs in made.values() for c in cs]
    report.unchanged = len(unchanged)
    report.changed = sum(d.key in by_doc for d in new_docs)
    report.added = len(new_docs) - report.changed
    report.removed = len(set(by_doc) - {d.key for d in docs})
    report.chunks = len(chunks)
    report.chunks_embedded = len(fresh) if embedder else 0
    _write(folder, settings, docs, chunks, fresh, old_dense, embedder, k1=k1, b=b)
    log(f"index: {report.added} added, {report.changed} changed, {report.removed} removed, {report.unchanged} unchanged "
        f"documents; {report.chunks} chunks ({report.chunks_embedded} embedded)"
        + (f"; rebuilt because {report.rebuilt_because}" if report.rebuilt_because else ""))
    return report


def _first_duplicate(keys: list[str]) -> str | None:
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            return k
        seen.add(k)
    return None


def _reusable(folder: Path, settings: dict, report: SyncReport) -> tuple[list[Chunk], DenseStore | None]:
    """The chunks (and vectors) of an existing index built the same way; nothing otherwise."""
    meta = read_meta(folder) if folder.is_dir() else None
    if meta is None:
        return [], None
    for key in ("tokenizer", "embedding", "chunking", "bm25"):
        a, b = meta.get(key), settings[key]
        if (a or {}).get("sha256", a) != (b or {}).get("sha256", b):
            report.rebuilt_because = f"the {key} differs from the one the existing index was built with"
            return [], None
    return _read_chunks(folder), DenseStore.load(folder) if meta.get("embedding") else None


def _write(folder: Path, settings: dict, docs: list[Document], chunks: list[Chunk], fresh: list[Chunk],
           old_dense: DenseStore | None, embedder: Embedder | None, *, k1: float, b: float) -> None:
    meta = {**settings, "documents": [{"key": d.key, "sha256": d.sha256} for d in docs], "n_chunks": len(chunks)}
    with staged_dir(folder) as tmp:
        _write_chunks(tmp, chunks)
        (tmp / "bm25").mkdir()
        lexical.save(lexical.build([c.terms for c in chunks], k1=k1, b=b), tmp / "bm25")
        if embedder is not None:
            new_vecs = dict(zip((c.id for c in fresh), embedder.embed([c.text for c in fresh])))
            reuse = [c.id for c in chunks if c.id not in new_vecs]
            new_vecs.update(zip(reuse, old_dense.vectors(reuse) if reuse else []))
            ids = np.array([c.id for c in chunks], dtype=np.int64)
            vecs = np.stack([new_vecs[c.id] for c in chunks]) if chunks else np.zeros((0, 1), np.float32)
            DenseStore.build(ids, vecs).save(tmp)
        atomic_write_json(tmp / META, meta)
