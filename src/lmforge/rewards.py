"""Rewards for online RL (`ppo`, `grpo`): verifiable rules, Python functions and a reward model.

    rewards = Rewards.build(cfg.rewards, reward_model=cfg.reward_model, policy_tokenizer=tok)
    rewards.check_rows(rows)                      # fail fast: every row has what the rules need
    total, parts = rewards.score(prompts, responses, rows, wheres)
        total  (N,) weighted sum of the parts; parts {name: (N,)} logged one by one

A reward is a list of weighted terms (`RewardSpec`), summed:

    answer        1 if the response gives the row's reference answer, else 0. Numeric answers
                  (the world's arithmetic) use the eval stage's `numeric_match` rule: the LAST
                  number on the first non-blank line equals the answer ("7", "It is 7." -> 7;
                  "7 or 8" -> 8). Other answers use `exact_match` (normalised text equality).
                  Training on exactly the eval metric is the point of a verifiable reward.
    format        1 if the stripped response fully matches the regex `pattern`, else 0
    contains      1 if the response contains `word` as a whole word (case-insensitive), else 0
    function      `module:function` or `path/file.py:function`, called as
                  fn(prompt_turns, response, row) -> number (lmforge.scoring's contract)
    reward_model  the stage's `reward_model` (a reward stage folder) scores (prompt, response)

A reward model must share the policy's tokenizer (same vocabulary and chat template) unless
`allow_tokenizer_mismatch`: its scores are only meaningful on text encoded the way it was
trained, and a mismatch usually means the wrong folder was passed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from lmforge.config import Schema
from lmforge.errors import LmforgeError

Kind = Literal["answer", "format", "contains", "function", "reward_model"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardSpec(Schema):
    """One weighted term of the reward."""

    kind: Kind = Field(description="answer, format, contains, function or reward_model (see lmforge.rewards).")
    weight: float = Field(1.0, allow_inf_nan=False, description="Multiplier of this term in the summed reward.")
    name: str | None = Field(None, description="Name of the term in the metrics (default: the kind).")
    answer_field: str = Field("answer", description="answer: the prompt row's field holding the reference answer.")
    pattern: str | None = Field(None, description="format: a regex the whole stripped response must match.")
    word: str | None = Field(None, description="contains: the word the response must contain (whole word, any case).")
    function: str | None = Field(
        None, description="function: `module:function` or `file.py:function`, fn(prompt_turns, response, row) -> number.")

    @model_validator(mode="after")
    def _knobs(self) -> "RewardSpec":
        need = {"format": "pattern", "contains": "word", "function": "function"}.get(self.kind)
        if need and not getattr(self, need):
            raise ValueError(f"a {self.kind} reward needs `{need}`")
        if self.kind == "format":
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression ({e})") from None
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


# --------------------------------------------------------------------------------------------
# The rules: pure functions of (response, row)


def answer_reward(response: str, row: dict, field: str) -> float:
    """1.0 if `response` gives row[field]: numerically (eval's numeric_match) or as normalised text."""
    from lmforge.eval.scorers import exact_match, numeric_match

    ref = row.get(field)
    if _NUMBER.fullmatch(str(ref).strip().replace(",", "")):
        return numeric_match(response, row, field)
    return exact_match(response, row, field)


def format_reward(response: str, pattern: str) -> float:
    return float(re.fullmatch(pattern, response.strip(), flags=re.DOTALL) is not None)


def contains_reward(response: str, word: str) -> float:
    return float(re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", response, flags=re.IGNORECASE) is not None)


# --------------------------------------------------------------------------------------------
# The summed reward


def same_tokenizer(a, b) -> bool:
    """Same vocabulary (token -> id), same special tokens and same chat template."""
    return (a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))


@dataclass
class _Term:
    spec: RewardSpec
    fn: Any = None  # the loaded function (kind function)


class Rewards:
    """The configured reward terms, loaded once; `score` is called on every rollout."""

    def __init__(self, terms: list[_Term], reward_model=None):
        self.terms, self.reward_model = terms, reward_model

    @classmethod
    def build(cls, specs: list[RewardSpec], *, reward_model: str | None, policy_tokenizer, policy_source: str = "policy",
              device=None, allow_tokenizer_mismatch: bool = False) -> "Rewards":
        from lmforge.scoring import load_reward_model, load_score_fn

        specs = list(specs)
        if not specs:
            if reward_model is None:
                raise LmforgeError("No reward is configured: list `rewards` (answer, format, contains, function, "
                                   "reward_model) or set `reward_model` to a reward stage folder.")
            specs = [RewardSpec(kind="reward_model")]
        labels = [s.label for s in specs]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise LmforgeError(f"rewards: the name {dup[0]!r} is used by two terms; give each a distinct `name`.")
        terms = [_Term(s, load_score_fn(s.function) if s.kind == "function" else None) for s in specs]
        rm = None
        if any(s.kind == "reward_model" for s in specs):
            if reward_model is None:
                raise LmforgeError("rewards has a reward_model term but `reward_model` is not set; point it to a "
                                   "reward stage folder.")
            rm = load_reward_model(reward_model, device=device)
            if not allow_tokenizer_mismatch and not same_tokenizer(rm.tokenizer, policy_tokenizer):
                raise LmforgeError(
                    f"The reward model {reward_model} has a different tokenizer (vocabulary, special tokens or chat "
                    f"template) than the policy {policy_source}; train the reward model from the policy's model, or "
                    "set allow_tokenizer_mismatch: true to score through its own tokenizer anyway.")
        return cls(terms, rm)

    @property
    def names(self) -> list[str]:
        return [t.spec.label for t in self.terms]

    def check_rows(self, rows: list[dict], wheres: list[str]) -> None:
        """Every row holds what the answer terms read; one sentence naming the first that does not."""
        for t in self.terms:
            if t.spec.kind != "answer":
                continue
            f = t.spec.answer_field
            for row, where in zip(rows, wheres):
                if row.get(f) is None or isinstance(row.get(f), (dict, list)):
                    raise LmforgeError(f"{where} has no reference answer in field {f!r}, which the answer reward "
                                       "reads; add it, or set the reward's answer_field.")

    def score(self, prompts: list[list[dict]], responses: list[str], rows: list[dict],
              wheres: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(total reward (N,), {term name: (N,) unweighted values})."""
        from lmforge.scoring import call_score_fn

        n = len(responses)
        parts: dict[str, np.ndarray] = {}
        total = np.zeros(n, dtype=np.float64)
        for t in self.terms:
            s = t.spec
            if s.kind == "answer":
                v = [answer_reward(r, row, s.answer_field) for r, row in zip(responses, rows)]
            elif s.kind == "format":
                v = [format_reward(r, s.pattern) for r in responses]
            elif s.kind == "contains":
                v = [contains_reward(r, s.word) for r in responses]
            elif s.kind == "function":
                v = [call_score_fn(t.fn, s.function, p, r, row, w)
                     for p, r, row, w in zip(prompts, responses, rows, wheres)]
            else:
                v = self.reward_model.score(prompts, responses, wheres=wheres) if n else []
            parts[s.label] = np.asarray(v, dtype=np.float64)
            total += s.weight * parts[s.label]
        return total, parts
