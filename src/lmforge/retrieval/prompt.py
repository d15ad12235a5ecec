"""Putting retrieved passages into the prompt: the context section, and fitting it in the window.

The context goes into the last user turn, before the question, exactly so (passages are
numbered in rank order; the answer can cite them as [1], [2], ...):

    Answer the question from the passages below. Cite the passages you use by number, like [1].
    If they do not contain the answer, say "I don't know."

    Passages:
    [1] <text of the best passage>
    [2] <text of the next one>

    Question: <the user's question>

That user turn then goes through the chat template like any other (`data.chat.render`), or is
the whole prompt for a plain (non-chat) model. With no passages the section is left out and
the question is sent as is.

`fit_passages()` keeps the prompt within the model's window: passages are added best first
while the rendered prompt plus the answer budget fits; the first that does not fit whole is cut
(at a token boundary) to the room left, and the rest are dropped. Cut and dropped passages are
counted in the result, never silent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lmforge.retrieval.index import Passage

INSTRUCTION = ("Answer the question from the passages below. Cite the passages you use by number, like [1]. "
               "If they do not contain the answer, say \"I don't know.\"")
MIN_PASSAGE_TOKENS = 8  # a cut passage shorter than this carries no usable evidence: drop it instead


def context_section(question: str, passages: list[Passage], *, instruction: str = INSTRUCTION) -> str:
    """The user turn's text: instruction, numbered passages, question (see the module docstring)."""
    if not passages:
        return question
    lines = "\n".join(f"[{i}] {' '.join(p.text.split())}" for i, p in enumerate(passages, 1))
    return f"{instruction}\n\nPassages:\n{lines}\n\nQuestion: {question}"


def with_context(messages: list[dict], passages: list[Passage], *, instruction: str = INSTRUCTION) -> list[dict]:
    """`messages` with the last user turn replaced by its context section."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        return list(messages)
    out = [dict(m) for m in messages]
    out[last]["content"] = context_section(messages[last]["content"], passages, instruction=instruction)
    return out


@dataclass
class Fitted:
    messages: list[dict]
    passages: list[Passage]  # as used (a cut passage carries its cut text)
    prompt_tokens: int
    truncated: int = 0  # passages cut to fit
    dropped: int = 0  # passages left out


def fit_passages(messages: list[dict], passages: list[Passage], tokenizer: Any, render: Callable[[list[dict]], str],
                 *, budget: int, instruction: str = INSTRUCTION) -> Fitted:
    """The prompt with as many passages (best first) as fit in `budget` prompt tokens."""
    def length(ps: list[Passage]) -> int:
        return len(tokenizer(render(with_context(messages, ps, instruction=instruction)),
                             add_special_tokens=False)["input_ids"])

    used: list[Passage] = []
    truncated = 0
    for p in passages:
        n = length([*used, p])
        if n <= budget:
            used.append(p)
            continue
        cut = _cut_to_fit(p, used, n - budget, tokenizer, length, budget)
        if cut is not None:
            used.append(cut)
            truncated += 1
        dropped = len(passages) - len(used)
        return Fitted(with_context(messages, used, instruction=instruction), used, length(used), truncated, dropped)
    return Fitted(with_context(messages, used, instruction=instruction), used, length(used), truncated, 0)


def _cut_to_fit(p: Passage, used: list[Passage], overflow: int, tokenizer: Any, length, budget: int) -> Passage | None:
    offsets = tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(offsets) - overflow
    while keep >= MIN_PASSAGE_TOKENS:
        cut = replace(p, text=p.text[:offsets[keep - 1][1]], n_tokens=keep)
        if length([*used, cut]) <= budget:
            return cut
        keep -= 1  # re-tokenising the joined text can cost a token more than the count said
    return None
