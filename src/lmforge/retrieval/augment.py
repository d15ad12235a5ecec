"""Retrieval-augmented prompts: the `retrieval:` settings that generate, chat, serve, eval and
compare share, and the one function that turns a conversation into an augmented prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Schema
from lmforge.retrieval.index import Index, open_index
from lmforge.retrieval.prompt import INSTRUCTION, Fitted, fit_passages


class RetrievalConfig(Schema):
    index: str = Field(description="Index folder (an index stage folder or its index/ folder).")
    k: int = Field(4, ge=1, description="Passages put into the prompt (best first, while they fit the window).")
    mode: Literal["auto", "bm25", "dense", "hybrid"] = Field(
        "auto", description="auto: hybrid (BM25 + dense, fused by RRF) when the index has vectors, else BM25.")
    embedding_model: str | None = Field(None, description="Embedding model to query with; None = the one the index "
                                        "was built with (either way it must be that model, or it is refused).")
    instruction: str = Field(INSTRUCTION, description="The line before the passages in the context section.")


@dataclass
class Retriever:
    cfg: RetrievalConfig
    index: Index

    def augment(self, messages: list[dict], tokenizer: Any, render: Callable[[list[dict]], str], *,
                budget: int) -> Fitted:
        """Search with the last user turn, then fit the best passages into `budget` prompt tokens."""
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        passages = self.index.search(query, self.cfg.k, mode=self.cfg.mode) if query else []
        return fit_passages(messages, passages, tokenizer, render, budget=budget, instruction=self.cfg.instruction)


def open_retriever(cfg: RetrievalConfig, tokenizer: Any, tokenizer_source: str) -> Retriever:
    """The index, checked against the tokenizer of the model that will read its passages."""
    return Retriever(cfg, open_index(cfg.index, tokenizer=tokenizer, tokenizer_source=tokenizer_source,
                                      embedding_model=cfg.embedding_model))
