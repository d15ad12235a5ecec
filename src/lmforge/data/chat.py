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
"""

from __future__ import annotations

from typing import Any

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
