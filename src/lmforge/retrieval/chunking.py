"""Token-aware chunking: windows of `chunk_tokens` tokens of the model's tokenizer, `overlap`
tokens shared with the previous window, so a fact cut at a boundary is whole in one chunk.

A chunk's text is the exact slice of the document that its tokens cover (character offsets
from the fast tokenizer), so nothing is re-decoded and passages quote the document verbatim.
Chunking in the model's tokens (not words) bounds what a passage costs in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class Span:
    start: int  # character offsets into the document
    end: int
    n_tokens: int


def chunk_spans(text: str, tokenizer: Any, *, chunk_tokens: int, overlap: int) -> list[Span]:
    """Spans of `text`: token windows [i, i + chunk_tokens) with i stepping by chunk_tokens - overlap.

    The last window ends at the last token (it may be shorter); a text of n <= chunk_tokens
    tokens is one chunk.
    """
    return windows(token_offsets([text], tokenizer)[0], chunk_tokens=chunk_tokens, overlap=overlap)


def token_offsets(texts: list[str], tokenizer: Any) -> list[list[tuple[int, int]]]:
    """Each text's token character offsets (one batched call: the tokenizer's Rust side does the work)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LmforgeError("Chunking needs a fast (Rust) tokenizer for character offsets; this tokenizer is not one.")
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def windows(offsets: list[tuple[int, int]], *, chunk_tokens: int, overlap: int) -> list[Span]:
    if not 0 <= overlap < chunk_tokens:
        raise LmforgeError(f"chunk overlap {overlap} must be at least 0 and smaller than chunk_tokens {chunk_tokens}.")
    n = len(offsets)
    step = chunk_tokens - overlap
    spans: list[Span] = []
    i = 0
    while i < n:
        j = min(i + chunk_tokens, n)
        spans.append(Span(offsets[i][0], offsets[j - 1][1], j - i))
        if j == n:
            break
        i += step
    return spans
