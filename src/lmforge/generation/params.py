"""SamplingParams: the validated sampling knobs shared by every caller of the engine, and the
`key=value` parser the command line uses to build them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator, model_validator

from lmforge.config import Schema
from lmforge.errors import LmforgeError

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_SAMPLES = 128


class SamplingParams(Schema):
    """How to sample one completion (or `n` of them) from a prompt."""

    temperature: float = Field(
        0.7, ge=0.0, le=100.0, allow_inf_nan=False,
        description="Softmax temperature; 0 means greedy decoding (always the most likely token), as does any "
        "value below 1.2e-38 (float32's smallest normal number).",
    )
    top_p: float = Field(
        0.9, gt=0.0, le=1.0, allow_inf_nan=False,
        description="Nucleus sampling: sample from the smallest set of tokens whose probabilities reach top_p (1 = off).",
    )
    top_k: int = Field(0, ge=0, description="Sample only from the k most likely tokens (0 = off).")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Drop tokens whose probability is below min_p times the most likely token's (0 = off).",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, allow_inf_nan=False,
        description="Logits of tokens already in the prompt or completion: positive ones divided by this, "
        "negative ones multiplied (1 = off; >1 discourages repeats).",
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Subtracted once from the logit of every token that already appears in the completion.",
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Subtracted from a token's logit once per time it already appears in the completion.",
    )
    min_new_tokens: int = Field(
        0, ge=0, description="Generate at least this many tokens: EOS, stop tokens and stop strings are ignored before."
    )
    max_new_tokens: int = Field(
        256, ge=1, le=1_000_000,
        description="Generate at most this many tokens; prompt plus max_new_tokens must fit the model's context.",
    )
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS,
        description="Stop strings: the completion ends just before the first one that appears (it is not included).",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, max_length=MAX_STOP_TOKEN_IDS,
        description="Token ids that end the completion, in addition to the tokenizer's EOS.",
    )
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="Completions to sample per prompt.")
    seed: int | None = Field(
        None, ge=0, lt=2**63,
        description="Seeds each completion's own random stream (completion j of a prompt uses stream j), "
        "so a seeded request samples the same tokens whatever it is batched with; None = torch's global RNG.",
    )
    logprobs: bool = Field(
        False, description="Also return each sampled token's log-probability under the distribution it was sampled "
        "from (after penalties, temperature and top-k/top-p/min-p; for greedy rows, the softmax of the penalised logits).",
    )
    skip_special_tokens: bool = Field(True, description="Leave special tokens (EOS, role markers) out of the text.")

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in v):
            raise ValueError("stop strings must be at most 256 characters long")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_non_negative(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("stop token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> "SamplingParams":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        return self


def sampling_params(overrides: Sequence[str] = (), **flags: Any) -> SamplingParams:
    """SamplingParams from `key=value` overrides (YAML values) and named flags (None = unset)."""
    from lmforge.config import parse_override, validate

    data: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 1:
            raise LmforgeError(f"Sampling option {text!r}: the keys are flat, e.g. temperature=0.2.")
        data[path[0]] = value
    return validate(SamplingParams, data, where="sampling options")
