"""A model lmforge saves evaluates with EleutherAI's lm-evaluation-harness, on a local task.

The same check as `lm_eval --model hf --model_args pretrained=DIR --tasks lmforge_mc
--include_path TASK_DIR --device cpu`, run in-process; lm-eval's per-choice log-likelihoods must
equal the ones computed directly from the saved model, so its accuracy is the model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROWS = [
    {"question": "What is two plus two?", "choices": ["four", "five", "three"], "label": 0},
    {"question": "The quick brown fox jumps over the lazy", "choices": ["dog", "cat"], "label": 0},
    {"question": "Hello there! How are you", "choices": ["today?", "yesterday?"], "label": 1},
]


def write_task(tmp: Path) -> Path:
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "lmforge_mc.yaml").write_text(
        "task: lmforge_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


def test_lm_eval_harness_scores_a_saved_model_like_the_model_itself(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = write_task(tmp_path)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32",
                                  tasks=["lmforge_mc"], task_manager=TaskManager(include_path=str(tasks)),
                                  device="cpu", batch_size=4, log_samples=True, bootstrap_iters=0)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def loglik(context: str, continuation: str) -> float:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        assert whole[:len(ctx)] == ctx  # byte-level BPE splits at the leading space
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
        return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))

    samples = sorted(out["samples"]["lmforge_mc"], key=lambda s: s["doc_id"])
    correct = 0
    for s, row in zip(samples, ROWS):
        # lm-eval joins question and choice with its default target delimiter, one space.
        assert [tuple(a) for a in s["arguments"]] == [(row["question"], " " + c) for c in row["choices"]]
        ours = [loglik(row["question"], " " + c) for c in row["choices"]]
        theirs = [r[0][0] for r in s["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += max(range(len(ours)), key=ours.__getitem__) == row["label"]
    assert out["results"]["lmforge_mc"]["acc,none"] == pytest.approx(correct / len(ROWS))
