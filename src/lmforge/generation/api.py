"""The function API: `generate()` for whole completions, `stream()` for one prompt's text as it comes."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.generation.engine import Completion, Engine, Row
from lmforge.generation.params import SamplingParams


def encode_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                   add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt; lists of ints pass through unchanged.

    Raw text gets the tokenizer's special tokens (e.g. a BOS) as in training; pass
    `add_special_tokens=False` for text already rendered by a chat template, which carries its own.
    """
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]))
            continue
        ids = p.tolist() if hasattr(p, "tolist") else p  # a 1-D tensor or array of ids
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise LmforgeError(f"prompt {i} must be a string or a list of token ids, not {type(p).__name__}.")
        out.append([int(t) for t in ids])
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
             params: SamplingParams | None = None, *, max_batch: int = 32, add_special_tokens: bool = True,
             on_finish: Any = None, seed_stream: int = 0) -> list[Completion]:
    """Sample `params.n` completions of every prompt; returns them prompt by prompt, sample by sample.

    prompts     strings (tokenised here) or lists of token ids
    max_batch   rows decoded together; finished rows are replaced by waiting prompts at once
    on_finish   optional callback(Completion) as each completion finishes (progress bars)

    With `params.seed` set, completion j of prompt i uses random stream seed_stream + i * n + j, so
    the result does not depend on max_batch or on the other prompts (up to float rounding); a
    caller that splits one request's prompts over processes passes each share's first global
    stream, so every completion samples as it would in one call.
    """
    params = params or SamplingParams()
    engine = Engine(model, tokenizer, max_batch=max_batch)
    rows: list[Row] = []
    for i, ids in enumerate(encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)):
        rows += engine.add(ids, params, tag=i, seed_stream=seed_stream + i * params.n, where=f"prompt {i}")
    while engine.has_work():
        for r in engine.step():
            if r.finished and on_finish is not None:
                on_finish(r.completion())
    return [r.completion() for r in rows]


@dataclass
class Chunk:
    """A piece of a streamed completion: new text, and the finish reason on the last piece."""

    index: int  # which of the n completions
    text: str
    token_ids: list[int]  # tokens sampled since the previous chunk of this completion
    finish_reason: str | None = None


def stream(model: Any, tokenizer: Any, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
           add_special_tokens: bool = True) -> Iterator[Chunk]:
    """Generate the completions of one prompt, yielding text as soon as it is safe to show.

    Text that might begin a stop string is held back until it is clear; the concatenated chunks
    equal the final completion text. Closing the iterator early stops generation.
    """
    params = params or SamplingParams()
    engine = Engine(model, tokenizer, max_batch=max(params.n, 1))
    ids = encode_prompts(tokenizer, [prompt], add_special_tokens=add_special_tokens)[0]
    rows = engine.add(ids, params, tag=0, stream=True)
    given = [0] * len(rows)
    try:
        while engine.has_work():
            for r in engine.step():
                text = r.take_text()
                if text or r.finished:
                    new_ids = r.token_ids[given[r.sample_index]:]
                    given[r.sample_index] = len(r.token_ids)
                    yield Chunk(r.sample_index, text, new_ids, r.finish_reason)
    finally:
        for r in rows:
            engine.cancel(r)
