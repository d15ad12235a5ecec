"""The `reward` stage: it learns a preference rule that depends on the prompt (>= 95% held-out
pairwise accuracy), saves a HF sequence-classification model whose own forward gives the same
rewards, and `lmforge score` reproduces the stage's held-out numbers (full model and LoRA merge)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.pipeline import run_single
from lmforge.rundir import RunDir
from lmforge.scoring import load_reward_model, score_file

from .conftest import assert_bitwise_equal, first_losses, run_cli, sigkill_after_checkpoint, write_yaml

SUBJ = ["The quick brown fox", "The lazy dog", "The old miller", "A small model", "The northern gate"]
VERB = ["jumps over the hills", "carries three apples", "answers questions", "is fine", "is old"]
ANIMALS = ["The quick brown fox.", "The lazy dog.", "A brown dog.", "The old fox."]
NUMBERS = ["Two.", "Three.", "Four.", "Two plus two."]
QUESTIONS = [("Name an animal.", ANIMALS, NUMBERS), ("Name a number.", NUMBERS, ANIMALS)]


def rule_rows(n: int, seed: int) -> list[dict]:
    """The preferred answer is the one of the kind the question asks for. Every answer is chosen
    for one question and rejected for the other, so a model that ignores the prompt scores 50%."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        q, good, bad = r.choice(QUESTIONS)
        rows.append({"prompt": f"{r.choice(SUBJ)} {r.choice(VERB)}. {q}", "chosen": r.choice(good),
                     "rejected": r.choice(bad)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rule")
    return write_jsonl(d / "train.jsonl", rule_rows(240, 1)), write_jsonl(d / "val.jsonl", rule_rows(64, 2))


def reward_config(model, files, **over) -> dict:
    train = dict(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=4, eval_every=20, eval_batches=8,
                 checkpoint_every=0, log_every=5, tensorboard=False, threads=1, seed=11, keep_best=False)
    train.update(over.pop("train", {}))
    return {"model": str(model), "data": str(files[0]), "val_data": str(files[1]), "train": train, **over}


def run_reward(tmp: Path, cfg: dict, name: str = "run") -> dict:
    path = write_yaml(tmp / f"{name}.yaml", cfg)
    return run_single("reward", str(path), [], out=str(tmp / name), force=True, resume=False, echo=lambda *a: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, files):
    tmp = tmp_path_factory.mktemp("reward")
    return tmp / "run", run_reward(tmp, reward_config(tiny_model_dir, files))


def test_reward_model_learns_a_prompt_dependent_rule(trained):
    run, m = trained
    evals = [e for e in RunDir(run, "reward", "model").read_metrics() if "val_loss" in e]
    assert evals[0]["step"] == 0 and evals[0]["val_accuracy"] < 0.8  # the fresh head knows nothing
    assert evals[-1]["val_accuracy"] >= 0.95 and evals[-1]["val_loss"] < evals[0]["val_loss"] / 2
    s = m["summary"]
    assert s["held_out_accuracy"] >= 0.95 and s["pairs"] == 240 and s["validation_pairs"] == 64
    gaps = json.loads((run / "reward_gaps.json").read_text())
    assert gaps["pairs"] == 64 and sum(gaps["histogram"]["counts"]) == 64 and gaps["quantiles"]["p50"] > 0
    assert (run / "reward_gaps.png").stat().st_size > 1000
    rows = [r for r in RunDir(run, "reward", "model").read_metrics() if "loss" in r]
    assert {"accuracy", "reward_chosen", "reward_rejected", "reward_margin"} <= set(rows[0])


def test_saved_reward_model_is_a_plain_hf_classifier_with_the_same_rewards(trained, files):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.data.chat import render

    run, m = trained
    hf = AutoModelForSequenceClassification.from_pretrained(str(run / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    rm = load_reward_model(run, device="cpu")
    rows = [json.loads(x) for x in files[1].read_text().splitlines()[:6]]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    ours = rm.score(prompts, [r["chosen"] for r in rows], batch_size=4)
    texts = [render(tok, [*p, {"role": "assistant", "content": r["chosen"]}], add_generation_prompt=False)
             for p, r in zip(prompts, rows)]
    batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")  # right padding
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0].tolist()
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_lmforge_score_cli_reproduces_the_held_out_accuracy(trained, files, tmp_path):
    run, m = trained
    out = tmp_path / "scored.jsonl"
    r = run_cli("score", str(run), str(files[1]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    gaps = np.array([x["chosen_score"] - x["rejected_score"] for x in rows])
    assert len(rows) == 64 and f"pairwise_accuracy {round(float((gaps > 0).mean()), 4)}" in r.stdout
    assert float((gaps > 0).mean()) == m["summary"]["held_out_accuracy"]
    assert float(np.median(gaps)) == pytest.approx(m["summary"]["held_out_gap_median"], abs=1e-4)
    # other row shapes: prompt + response, chat messages
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": rows[0]["prompt"], "response": rows[0]["chosen"]},
        {"messages": [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0]["chosen"]}]}])
    s = score_file(run, mixed, tmp_path / "m.jsonl", device="cpu")
    scored = [json.loads(x)["score"] for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert s["scored"] == 2 and scored == pytest.approx([rows[0]["chosen_score"]] * 2, abs=1e-5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "Two."}, {"prompt": "x"}])
    with pytest.raises(LmforgeError, match=r"bad\.jsonl line 2 needs 'prompt' \+ 'response'"):
        score_file(run, bad, tmp_path / "b.jsonl", device="cpu")
    assert not (tmp_path / "b.jsonl").exists()  # nothing half-written


def test_lora_reward_model_is_merged_into_a_plain_classifier(tmp_path, tiny_model_dir, files):
    m = run_reward(tmp_path, reward_config(tiny_model_dir, files, adapter={"method": "lora", "r": 4, "dropout": 0.0},
                                           train=dict(max_steps=6, eval_every=0)))
    s = m["summary"]
    assert s["adapter"] == "lora" and s["trainable_parameters"] < s["parameters"] / 4
    assert not (tmp_path / "run" / "model" / "adapter_config.json").exists()
    score_file(tmp_path / "run", files[1], tmp_path / "s.jsonl", device="cpu")
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    gaps = np.array([x["chosen_score"] - x["rejected_score"] for x in rows])
    # the merged model scores exactly as the adapter model did at the end of training
    assert float(np.median(gaps)) == pytest.approx(s["held_out_gap_median"], abs=1e-4)
    assert float((gaps > 0).mean()) == s["held_out_accuracy"]


def test_qlora_reward_model_is_merged_into_its_full_precision_start(tmp_path, tiny_model_dir, files):
    """QLoRA trains on a 4-bit copy; the saved reward model is the full-precision start with the
    adapter merged in (no quantisation error on top), and the head trained whole is kept exactly."""
    from safetensors.torch import load_file

    m = run_reward(tmp_path, reward_config(tiny_model_dir, files, adapter={"method": "qlora", "r": 4, "dropout": 0.0},
                                           train=dict(max_steps=4, eval_every=0, lr=1e-2)))
    out = tmp_path / "run" / "model"
    assert m["summary"]["adapter"] == "qlora" and not (out / "adapter_config.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    saved = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    norms = [k for k in start if k.startswith("model.") and "norm" in k]
    assert norms and all(torch.equal(saved[k], start[k]) for k in norms)  # frozen, not adapted: the start's own
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], start[q])  # the LoRA update merged into the full-precision weight
    rm = load_reward_model(tmp_path / "run", device="cpu")
    assert all(math.isfinite(x) for x in rm.score(["Name an animal."], ["The lazy dog."]))


def test_loss_uses_the_pair_margin_and_the_centering_term():
    """r(chosen) = 2, r(rejected) = 0.5, margin 1: -log sigma(2 - 0.5 - 1) + 0.1 * (2 + 0.5)^2."""
    import math

    from lmforge.train.reward import Config, make_loss

    def engine(**kw):
        return torch.tensor([2.0, 0.5], dtype=torch.float64)

    batch = {"input_ids": torch.zeros(1, 1), "ends": torch.zeros(2), "n": 1, "margin": torch.tensor([1.0])}
    plain = make_loss(Config(model="m"))(engine, batch)
    assert plain.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))  # margin ignored by default
    out = make_loss(Config(model="m", margin=True, center_coef=0.1))(engine, batch)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))) + 0.1 * 2.5**2)
    assert out.metrics["accuracy"].item() == 1 and out.metrics["reward_margin"].item() == pytest.approx(1.5)


# ---------------------------------------------------------------- pinned first losses, exact resume after SIGKILL


# The first four losses of a seeded 4-step run (full fine-tuning with a fresh head, and LoRA with
# the head trained whole), computed once with the code before the shared policy set-up (commit
# cf2b4ea) and pinned: the fresh head's seeded initialisation, the adapter's, the data order and
# the loss all move them.
PINNED = {"none": [0.695597, 0.691642, 0.667310, 0.722378], "lora": [0.695597, 0.693780, 0.689679, 0.697074]}


@pytest.mark.parametrize("method", ["none", "lora"])
def test_first_losses_pinned(tmp_path, tiny_model_dir, files, method):
    cfg = reward_config(tiny_model_dir, files, adapter={"method": method, "r": 4},
                        train=dict(max_steps=4, log_every=1, eval_every=0))
    run_reward(tmp_path, cfg)
    assert first_losses(tmp_path / "run", "reward", 4) == pytest.approx(PINNED[method], abs=1e-5)


def test_sigkilled_reward_run_resumes_bitwise_equal(tmp_path, tiny_model_dir, files, capsys):
    from safetensors.torch import load_file

    cfg = reward_config(tiny_model_dir, files, train=dict(max_steps=16, checkpoint_every=1, eval_every=8, log_every=1))
    run_reward(tmp_path, cfg, "ref")
    path = write_yaml(tmp_path / "k.yaml", cfg)
    out = tmp_path / "killed"
    killed_at = sigkill_after_checkpoint("reward", path, out, random.Random().randint(3, 12))
    capsys.readouterr()
    m = run_single("reward", str(path), [], out=str(out), force=False, resume=True, echo=lambda *a: None)
    assert f"resumed from checkpoint {killed_at}" in capsys.readouterr().out and m["status"] == "complete"
    assert_bitwise_equal(load_file(str(tmp_path / "ref" / "model" / "model.safetensors")),
                         load_file(str(out / "model" / "model.safetensors")))
    steps = [r["step"] for r in RunDir(out, "reward", "model").read_metrics() if "loss" in r]
    assert steps == list(range(1, 17))
