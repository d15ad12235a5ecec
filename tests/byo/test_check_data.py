"""`lmforge check-data` (what each row was detected as, what will be trained on, skipped rows and
why, a rendered example; no model loads) and `lmforge schema` listing nested fields."""

from __future__ import annotations

import json

from ..data.test_sft_data import write_jsonl
from ..train.conftest import run_cli

SFT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    {"prompt": "2+2=", "completion": "4"},
    {"text": "no format"},
    {"messages": [{"role": "user", "content": "x"}]},
]
PREF_ROWS = [
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": "2+2?", "responses": ["4", "5", "22"]},  # best first: 3 pairs (4>5, 4>22, 5>22)
    {"prompt": "Hi", "completion": "Hello", "label": True},
    {"prompt": "Hi"},
]


def test_check_data_sft_reports_formats_counts_skips_and_the_rendered_example(tmp_path):
    f = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    p = run_cli("check-data", "sft", str(f), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["rows"] == 5 and r["formats"] == {"chat": 1, "alpaca": 1, "prompt_completion": 1}
    assert r["rows_detected"] == [[f"{f} line 1", "chat"], [f"{f} line 2", "alpaca"],
                                  [f"{f} line 3", "prompt_completion"]]
    assert r["trained_on"] == {"conversations": 3, "assistant_turns (supervised)": 3, "with_system_turn": 1}
    assert r["skipped"] == {"unknown format": 1, "no assistant turn": 1}
    assert r["example"] == "<|system|>Be brief.<|eos|><|user|>Hi<|eos|><|assistant|>Hello!<|eos|>"
    text = run_cli("check-data", "sft", str(f)).stdout
    assert "sft.jsonl line 5 has no assistant turn" in text and "sft.jsonl line 2: alpaca" in text


def test_check_data_preferences_counts_pairs_from_each_format(tmp_path):
    f = write_jsonl(tmp_path / "pref.jsonl", PREF_ROWS)
    r = json.loads(run_cli("check-data", "dpo", str(f), "--json").stdout)
    assert r["formats"] == {"pairwise": 1, "ranked": 1, "unpaired": 1} and r["skipped"] == {"unknown format": 1}
    assert r["trained_on"] == {"pairs (dpo methods, reward)": 4, "unpaired items (dpo method kto only)": 1}
    assert r["example"] == "<|user|>Capital of France?<|eos|><|assistant|>Paris<|eos|>"


def test_check_data_names_an_unknown_stage_in_one_sentence(tmp_path):
    p = run_cli("check-data", "ppo", str(write_jsonl(tmp_path / "x.jsonl", PREF_ROWS)))
    assert p.returncode == 2 and p.stderr.strip() == "error: check-data knows the stages sft, distill, dpo, reward, not 'ppo'."


def test_schema_lists_nested_fields():
    ev = run_cli("schema", "eval").stdout
    assert "tasks[].name  (str, default required)" in ev and "tasks[].kind" in ev and "gates[].metric" in ev
    grpo = run_cli("schema", "grpo").stdout
    assert "rewards[].kind" in grpo and "adapter.r  (int, default 16)" in grpo
