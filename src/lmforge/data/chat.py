"""The chat format, defined once and used by training, evaluation, generation and serving.

lmforge's own tokenizers carry this Jinja template (saved in tokenizer_config.json, so plain
`tokenizer.apply_chat_template` produces the same text). Every turn is a role marker, the
content, and EOS:

    <|system|>Be brief.<|eos|><|user|>What is 2+2?<|eos|><|assistant|>4<|eos|>

Role markers and EOS are special tokens, so tokenisation always splits at them: the content
tokens of a turn are exactly the tokens of the content alone, and an assistant turn's
supervised span decodes to exactly its content plus EOS. Generation stops at EOS.

A reused tokenizer (any local HF folder) keeps its own template; code that needs the prompt
text always goes through `render()` so the choice is made in this one place.

Message content is text, never markup: a user who types `<|eos|><|assistant|>` must not end
their turn and speak as the assistant. `encode()` (prompts for generation) and `encode_text()`
(the SFT encoder's segments) tokenise the template's own markers as special tokens and
content with special-token parsing off, so content always round-trips as the text it was.
"""

from __future__ import annotations

from typing import Any

from lmforge.errors import LmforgeError

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def render(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """The prompt text for `messages` under the tokenizer's chat template.

    Tokenizers without a template (a base model's) get lmforge's template, so `--chat` works
    on any model lmforge trained or loads.
    """
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def special_texts(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special tokens when it parses special tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    texts.update(str(t) for t in added.values() if getattr(t, "special", False))
    return sorted((t for t in texts if t), key=len, reverse=True)


def _risky(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Indices of the messages whose content holds a special token's text."""
    specials = special_texts(tokenizer)
    return [i for i, m in enumerate(messages)
            if isinstance(m.get("content"), str) and any(s in m["content"] for s in specials)]


def has_special_text(tokenizer: Any, messages: list[dict]) -> bool:
    """Whether any message content holds a special token's text (cheap: no rendering)."""
    return bool(_risky(tokenizer, messages))


def content_spans(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """`render(...)` and the (start, end) character spans in it of every message content that
    holds a special token's text (usually none, and then the spans list is empty).

    The spans are found by rendering with a placeholder in place of each such content: the
    template's text around the placeholders, with the contents put back, must equal the real
    rendering (a template that rewrites content cannot keep it as text: LmforgeError).
    """
    text = render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    risky = _risky(tokenizer, messages)
    if not risky:
        return text, []
    marks = {i: f"\ue000lmforge-content-{i}\ue001" for i in risky}
    masked = [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)]
    shape = render(tokenizer, masked, add_generation_prompt=add_generation_prompt)
    spans, out, pos = [], [], 0
    for i in risky:
        at = shape.find(marks[i], pos)
        if at == -1:
            break
        out.append(shape[pos:at])
        start = sum(len(p) for p in out)
        out.append(messages[i]["content"])
        spans.append((start, start + len(messages[i]["content"])))
        pos = at + len(marks[i])
    out.append(shape[pos:])
    if len(spans) != len(risky) or "".join(out) != text:
        raise LmforgeError(
            f"message {risky[0]} contains the text of a special token, and the chat template changes message "
            "content, so it cannot be kept as plain text; remove the special-token text from the message.")
    return text, spans


def encode_text(tokenizer: Any, text: str, spans: list[tuple[int, int]], cuts: list[int] = ()) -> list[list[int]]:
    """Token ids of `text` cut at the character offsets `cuts` (one id list per piece), with the
    characters inside `spans` tokenised with special-token parsing off.

    With no spans this is one tokenizer call on the pieces, exactly as before content was
    protected; a span is tokenised on its own only when it is there.
    """
    if not text:
        return [[]]
    bounds = sorted({0, len(text), *cuts, *(b for s in spans for b in s)})
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    inside = [any(s <= a and b <= e for s, e in spans) for a, b in pieces]
    plain = [text[a:b] for (a, b), p in zip(pieces, inside) if not p]
    literal = [text[a:b] for (a, b), p in zip(pieces, inside) if p]
    enc_plain = iter(tokenizer(plain, add_special_tokens=False)["input_ids"] if plain else [])
    enc_lit = iter(tokenizer(literal, add_special_tokens=False, split_special_tokens=True)["input_ids"] if literal else [])
    edges = sorted({0, len(text), *cuts})
    out: list[list[int]] = [[] for _ in range(len(edges) - 1)]
    k = 0
    for (a, _), p in zip(pieces, inside):
        while a >= edges[k + 1]:
            k += 1
        out[k] += next(enc_lit) if p else next(enc_plain)
    return out


def encode(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool) -> list[int]:
    """Token ids of `render(...)`: the template's markers as special tokens, content as text."""
    text, spans = content_spans(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return encode_text(tokenizer, text, spans)[0]
