"""Stage `index`: build or update a retrieval index of documents, and measure its quality.

    documents (curate's formats + .md) ──read──> Document(key, text, sha256)
        ──sync: only new/changed documents chunked and embedded──> index/ (retrieval.index)
    questions with gold passages ──search──> recall@k, MRR  (quality.json)

In a recipe:

    - stage: index
      documents: [my_docs/]
      tokenizer: "@tokenizer"            # or a model folder; chunk sizes are in its tokens
      embedding_model: null              # a sentence-transformers folder, or a causal LM (mean-pooled)
      questions: my_questions.jsonl      # optional: retrieval quality

On its own: `lmforge index DOCS... --out DIR [--tokenizer T] [--embedding-model E]`. Re-running
on a grown folder updates the index in place (see `retrieval.index.sync`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, atomic_write_json

ARTIFACT = "index"
PROVIDES = ("index",)
INPUTS = {"documents": None, "tokenizer": "tokenizer", "embedding_model": None, "questions": None}
# A fresh start keeps the index: `sync` reuses only what was built the same way (tokenizer, embedding
# model, chunking and BM25 settings, each document's sha256) and rebuilds the rest, so an update
# never re-chunks or re-embeds an unchanged document.
KEEP = ("index",)


class Config(Schema):
    documents: list[str] = Field(description="Document files, folders or globs (JSONL/Parquet/CSV/.txt/.md/"
                                 "datasets folders); a text or Markdown file is one document, a row is one document.")
    text_field: str = Field("text", description="Column holding the text in structured files.")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="A malformed row: error, or skip and count it.")
    tokenizer: str | None = Field(None, description="Tokenizer (or model) folder whose tokens size the chunks; in a "
                                  "recipe, the newest tokenizer stage. It must be the generating model's tokenizer.")
    embedding_model: str | None = Field(None, description="Dense index: a sentence-transformers model folder, or a "
                                        "causal LM folder (its mean-pooled hidden states); None = BM25 only.")
    chunk_tokens: int = Field(128, ge=8, description="Tokens per chunk.")
    overlap: int = Field(32, ge=0, description="Tokens a chunk shares with the previous one.")
    k1: float = Field(1.5, gt=0, description="BM25 term-frequency saturation.")
    b: float = Field(0.75, ge=0, le=1, description="BM25 length normalisation.")
    questions: str | None = Field(None, description="Questions with gold passages (`evidence` or `source` fields) "
                                  "to measure recall@k and MRR on; None = no quality measurement.")
    ks: list[int] = Field(default_factory=lambda: [1, 4, 10], description="k values for recall@k.")
    mode: Literal["auto", "bm25", "dense", "hybrid"] = Field("auto", description="Retrieval mode measured.")

    @model_validator(mode="after")
    def _overlap(self) -> "Config":
        if self.overlap >= self.chunk_tokens:
            raise ValueError(f"overlap {self.overlap} must be smaller than chunk_tokens {self.chunk_tokens}")
        return self


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.retrieval import quality
    from lmforge.retrieval.dense import load_embedder
    from lmforge.retrieval.documents import read_documents
    from lmforge.retrieval.index import open_index, sync

    tok_src = cfg.tokenizer or cfg.embedding_model
    if tok_src is None:
        raise LmforgeError("index needs `tokenizer`: the tokenizer (or model) folder whose tokens size the chunks.")
    docs, stats = read_documents(cfg.documents, text_field=cfg.text_field, on_bad_rows=cfg.on_bad_rows)
    questions = quality.read_questions(cfg.questions, on_bad_rows=cfg.on_bad_rows) if cfg.questions else None
    tokenizer = load_tokenizer(tok_src)
    embedder = load_embedder(cfg.embedding_model) if cfg.embedding_model else None

    def log(msg: str) -> None:
        print(msg)
        rd.log(msg)

    report = sync(rd.artifact, docs, tokenizer, str(tok_src), embedder=embedder, chunk_tokens=cfg.chunk_tokens,
                  overlap=cfg.overlap, k1=cfg.k1, b=cfg.b, log=log)
    index = open_index(rd.artifact, tokenizer=tokenizer, tokenizer_source=str(tok_src))
    index.embedder = embedder
    summary = {"documents": len(docs), **report.as_dict(), "skipped": stats.skipped, "size_bytes": index.size_bytes,
               "dense": embedder is not None}
    if questions is not None:
        q = quality.evaluate(index, questions, ks=cfg.ks, mode=cfg.mode)
        atomic_write_json(rd.path / "quality.json", q)
        log("index quality: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items() if isinstance(v, float)))
        summary["quality"] = q
    return summary


def cli_index(documents: list[str], *, out: str, tokenizer: str | None, embedding_model: str | None,
              questions: str | None, chunk_tokens: int, overlap: int) -> dict:
    """`lmforge index DOCS... --out DIR`: the stage outside a recipe (re-running updates DIR)."""
    import sys

    from lmforge.config import validate
    from lmforge.pipeline import PlannedStage, run_stage

    cfg = validate(Config, {"documents": documents, "tokenizer": tokenizer, "embedding_model": embedding_model,
                            "questions": questions, "chunk_tokens": chunk_tokens, "overlap": overlap}, where="index")
    rd = RunDir(Path(out), stage="index", artifact=ARTIFACT)
    return run_stage(PlannedStage("index", "index", sys.modules[__name__], cfg, rd))  # unchanged inputs: skipped
