"""Stop strings and incremental detokenisation (pure helpers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index where the earliest stop string occurs in `text`, considering only matches that end
    after position `start` (text before it was already checked); -1 if none."""
    best = -1
    for s in stops:
        j = text.find(s, max(0, start - len(s) + 1))
        if j != -1 and (best == -1 or j < best):
            best = j
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string.

    A stream must hold them back: if the next token completes the stop string, they are cut.
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def decode_delta(tokenizer: Any, ids: list[int], prefix_offset: int, read_offset: int,
                 skip_special_tokens: bool = True) -> tuple[str, int, int]:
    """New text produced by the tokens after `read_offset`, as (text, prefix_offset, read_offset).

    Decoding token by token breaks multi-byte characters (a byte-level token may hold half of
    one) and, for SentencePiece tokenizers, leading spaces; so the window from `prefix_offset`
    is decoded with and without the new tokens and the difference is the new text. While the
    tail is an incomplete character (U+FFFD), nothing is returned and the offsets stay.
    """
    kw = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], **kw)
    full = tokenizer.decode(ids[prefix_offset:], **kw)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset
