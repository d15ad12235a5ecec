"""Retrieval-augmented prompts: the `retrieval:` settings that generate, chat, serve, eval and
compare share, and the one function that turns a conversation into an augmented prompt.

    retriever = open_retriever(RetrievalConfig(index="runs/x/index"), tokenizer, model_path)
    fitted = retriever.augment(messages, tokenizer, budget=context - max_new_tokens)
    fitted.messages            # the conversation with the context section in its last user turn
    passages_json(fitted)      # [{"id": 1, "chunk_id", "source", "ordinal", "text", "score"}, ...]

`chat=False` is for plain (non-chat) prompts: the prompt is the context section's text itself.
"""

from __future__ import annotations

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

    def augment(self, messages: list[dict], tokenizer: Any, *, budget: int, chat: bool = True) -> Fitted:
        """Search with the last user turn, then fit the best passages into `budget` prompt tokens."""
        from lmforge.data.chat import render

        def rendered(m: list[dict]) -> str:
            return render(tokenizer, m, add_generation_prompt=True) if chat else m[-1]["content"]

        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        passages = self.index.search(query, self.cfg.k, mode=self.cfg.mode) if query.strip() else []
        return fit_passages(messages, passages, tokenizer, rendered, budget=budget, instruction=self.cfg.instruction)


def open_retriever(cfg: RetrievalConfig, tokenizer: Any, tokenizer_source: str) -> Retriever:
    """The index, checked against the tokenizer of the model that will read its passages."""
    return Retriever(cfg, open_index(cfg.index, tokenizer=tokenizer, tokenizer_source=tokenizer_source,
                                     embedding_model=cfg.embedding_model))


def open_retrievers(indexes: dict[str, str], k: int, tokenizer: Any, tokenizer_source: str) -> dict[str, Retriever]:
    """{name: Retriever} for the server's `indexes`, each checked against the served model's tokenizer."""
    return {name: open_retriever(RetrievalConfig(index=path, k=k), tokenizer, tokenizer_source)
            for name, path in indexes.items()}


def passages_json(fitted: Fitted) -> dict:
    """What a response carries about retrieval: the passages used, numbered as in the prompt."""
    return {"passages": [{"id": i, **p.as_dict()} for i, p in enumerate(fitted.passages, 1)],
            "passages_truncated": fitted.truncated, "passages_dropped": fitted.dropped}


def prompt_budget(model: Any, max_new_tokens: int) -> int:
    """Prompt tokens that leave room for the answer in the model's window."""
    from lmforge.models import context_length

    return max(1, context_length(model) - max_new_tokens)


def task_prompt(retriever: Retriever, task: Any, row: dict, tokenizer: Any, model: Any, max_new_tokens: int):
    """An eval task's prompt with passages: token ids (chat) or text (plain), as `eval.tasks.prompt_text` gives."""
    from lmforge.data.chat import encode
    from lmforge.eval.tasks import messages

    chat = task.format == "chat"
    msgs = messages(task, row) if chat else [{"role": "user", "content": row[task.prompt_field]}]
    fitted = retriever.augment(msgs, tokenizer, budget=prompt_budget(model, max_new_tokens), chat=chat)
    return encode(tokenizer, fitted.messages, add_generation_prompt=True) if chat else fitted.messages[-1]["content"]
