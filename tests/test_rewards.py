"""Rewards for PPO/GRPO: the verifiable rules against hand-worked cases, the weighted sum, the
function contract (import failures and non-numbers are one sentence), and the reward model's
tokenizer check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.rewards import Rewards, RewardSpec, answer_reward, contains_reward, format_reward

U = [{"role": "user", "content": "What is 3 + 4?"}]


def build(*specs: dict, **kw) -> Rewards:
    return Rewards.build([RewardSpec(**s) for s in specs], reward_model=kw.pop("reward_model", None),
                         policy_tokenizer=kw.pop("policy_tokenizer", None), **kw)


def test_answer_reward_is_the_eval_numeric_rule_then_exact_text():
    row = {"answer": "7"}
    # the LAST number on the first non-blank line must equal the answer
    assert [answer_reward(r, row, "answer") for r in ("7", "It is 7.", "\n 3 + 4 = 7", "7 or 8", "8\n7", "", "seven")] \
        == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert answer_reward("-2", {"answer": "-2"}, "answer") == 1.0
    assert answer_reward("12", {"answer": "1,2"}, "answer") == 1.0  # thousands separators are dropped
    text = {"answer": "I don't know."}
    assert answer_reward("i don’t know", text, "answer") == 1.0  # normalised: case, curly quote, final dot
    assert answer_reward("I don't know the capital.", text, "answer") == 0.0


def test_format_and_contains_rules():
    assert [format_reward(r, r"-?\d+") for r in ("42", " -3\n", "42.", "4 2", "")] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [contains_reward(r, "fox") for r in ("The Fox ran", "a fox.", "foxes", "firefox", "")] == [1, 1, 0, 0, 0]


def test_weighted_sum_and_parts(tmp_path):
    r = build({"kind": "answer"}, {"kind": "format", "pattern": r"-?\d+", "weight": 0.5},
              {"kind": "contains", "word": "seven", "weight": -2.0, "name": "says_seven"})
    responses = ["7", "It is 7.", "seven", "8"]
    rows = [{"answer": "7"}] * 4
    total, parts = r.score([U] * 4, responses, rows, [f"row {i}" for i in range(4)])
    assert parts["answer"].tolist() == [1, 1, 0, 0]
    assert parts["format"].tolist() == [1, 0, 0, 1]
    assert parts["says_seven"].tolist() == [0, 0, 1, 0]
    assert total.tolist() == [1.5, 1.0, -2.0, 0.5]
    assert r.names == ["answer", "format", "says_seven"]


def test_function_rewards_load_from_a_file_and_check_their_result(tmp_path):
    f = tmp_path / "rules.py"
    f.write_text("def length(prompt, response, row):\n    return len(response) + row['bonus']\n"
                 "def text(prompt, response, row):\n    return 'high'\n"
                 "def nan(prompt, response, row):\n    return float('nan')\n"
                 "def boom(prompt, response, row):\n    raise KeyError('answer')\n")
    r = build({"kind": "function", "function": f"{f}:length"})
    total, _ = r.score([U, U], ["ab", "abcd"], [{"bonus": 1}, {"bonus": 0}], ["row 1", "row 2"])
    assert total.tolist() == [3.0, 4.0]
    for name, says in (("text", "returned 'high' for row 2; it must return a finite number"),
                       ("nan", "returned nan for row 2"), ("boom", "failed on row 2 (KeyError")):
        r = build({"kind": "function", "function": f"{f}:{name}"})
        with pytest.raises(LmforgeError, match=f"score_fn {f}:{name} {says}".replace("(", r"\(")):
            r.score([U], ["x"], [{}], ["row 2"])
    with pytest.raises(LmforgeError, match="module 'no_such_module_xyz' cannot be imported"):
        build({"kind": "function", "function": "no_such_module_xyz:score"})
    with pytest.raises(LmforgeError, match="has no function 'missing'"):
        build({"kind": "function", "function": f"{f}:missing"})


def test_configuration_errors_are_one_sentence():
    with pytest.raises(LmforgeError, match="No reward is configured"):
        build()
    with pytest.raises(LmforgeError, match="`reward_model` is not set"):
        build({"kind": "reward_model"})
    with pytest.raises(LmforgeError, match="the name 'answer' is used by two terms"):
        build({"kind": "answer"}, {"kind": "answer", "answer_field": "x"})
    with pytest.raises(ValueError, match="a contains reward needs `word`"):
        RewardSpec(kind="contains")
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        RewardSpec(kind="format", pattern="(")
    r = build({"kind": "answer"})
    with pytest.raises(LmforgeError, match="line 2 of p.jsonl has no reference answer in field 'answer'"):
        r.check_rows([{"answer": "1"}, {"prompt": "x"}], ["line 1 of p.jsonl", "line 2 of p.jsonl"])


def _reward_model(tiny_model_dir: Path, out: Path, *, extra_token: str | None = None) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    cfg.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if extra_token is not None:
        tok.add_tokens([extra_token])  # another vocabulary: what a reward model from another base has
    tok.save_pretrained(str(out))
    return out


def test_reward_model_must_share_the_policy_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from lmforge.scoring import load_reward_model

    policy_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    same = _reward_model(tiny_model_dir, tmp_path / "rm")
    r = build({"kind": "reward_model", "weight": 2.0}, reward_model=str(same), policy_tokenizer=policy_tok)
    total, parts = r.score([U, U], ["7", "eight"], [{}, {}], ["a", "b"])
    direct = load_reward_model(same).score([U, U], ["7", "eight"])
    assert np.allclose(parts["reward_model"], direct) and np.allclose(total, 2 * np.asarray(direct))
    assert parts["reward_model"][0] != parts["reward_model"][1]

    other = _reward_model(tiny_model_dir, tmp_path / "rm2", extra_token="zebra")
    with pytest.raises(LmforgeError, match=f"The reward model {other} has a different tokenizer .* than the policy pol"):
        build({"kind": "reward_model"}, reward_model=str(other), policy_tokenizer=policy_tok, policy_source="pol")
    # explicitly allowed: it scores through its own tokenizer
    build({"kind": "reward_model"}, reward_model=str(other), policy_tokenizer=policy_tok, allow_tokenizer_mismatch=True)
