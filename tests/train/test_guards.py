"""Guards (lmforge.train.guards): each decision on hand values, the watcher's memory across steps,
and both ways on a tiny GRPO run: a reward that pays for length is stopped with the best weights
kept; an honest reward fires nothing."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lmforge.train.guards import GuardConfig, Guards, entropy_collapse, heldout_fall, kl_over, length_drift


def test_heldout_fall_needs_the_drop_and_a_rising_reward():
    f = heldout_fall(0.8, 0.5, 1.0, 2.0, max_drop=0.2)
    assert f.guard == "heldout" and f.values["drop"] == pytest.approx(0.3) and f.values["reward"] == 2.0
    assert heldout_fall(0.8, 0.61, 1.0, 2.0, max_drop=0.2) is None  # fell 0.19: inside the allowance
    assert heldout_fall(0.8, 0.5, 1.0, 1.0, max_drop=0.2) is None  # the reward did not rise: not hacking
    # lower is better (a loss): 1.0 -> 1.5 is a 0.5 fall
    assert heldout_fall(1.0, 1.5, 0.0, 0.1, max_drop=0.4, higher_is_better=False).values["drop"] == pytest.approx(0.5)
    assert heldout_fall(1.0, 0.5, 0.0, 0.1, max_drop=0.0, higher_is_better=False) is None


def test_kl_length_entropy_thresholds():
    assert kl_over(0.31, 0.3).values == {"kl": 0.31, "budget": 0.3} and kl_over(0.3, 0.3) is None
    assert length_drift(10, 20.5, 2.0).guard == "length" and length_drift(10, 20, 2.0) is None
    assert length_drift(10, 4.9, 2.0) is not None and length_drift(10, 5, 2.0) is None  # shrinking counts too
    assert entropy_collapse(0.09, 0.1).values == {"entropy": 0.09, "floor": 0.1} and entropy_collapse(0.1, 0.1) is None


def test_config_is_off_by_default_and_checked():
    assert not GuardConfig().enabled and GuardConfig(kl_budget=1.0).enabled
    with pytest.raises(ValidationError):
        GuardConfig(length_factor=1.0)  # a factor of 1 would fire on any change
    with pytest.raises(ValidationError):
        GuardConfig(kl_bugdet=1.0)  # a misspelt guard is an error, not a silently absent guard


def test_watcher_keeps_the_best_and_fires_on_a_fall_with_rising_reward():
    g = Guards(GuardConfig(heldout_metric="acc", heldout_max_drop=0.1))
    seq = [(1, 0.5, 0.0), (2, 0.7, 1.0), (3, 0.65, 2.0), (4, 0.55, 3.0)]  # (step, acc, reward)
    out = []
    for step, acc, reward in seq:
        g.observe({"step": step, "reward": reward})
        g.observe({"step": step, "acc": acc})
        out.append(g.check(step))
    assert [b for b, _ in out] == [True, True, False, False] and g.best_step == 2 and g.reward_at_best == 1.0
    assert out[2][1] is None and out[3][1].guard == "heldout"  # 0.7 -> 0.55 is 0.15 > 0.1, reward 3 > 1
    assert g.check(5) == (False, None)  # nothing new logged: the same values are not judged twice


def test_watcher_patience_start_length_and_resume_state():
    g = Guards(GuardConfig(length_factor=2.0, patience=2))
    g.observe({"response_length": 8.0})
    assert g.check(1) == (True, None) and g.start_length == 8.0
    g.observe({"response_length": 17.0})
    assert g.check(2) == (False, None)  # first strike
    g.observe({"response_length": 9.0})
    assert g.check(3) == (True, None) and g.strikes == 0  # back inside: strikes reset, new best (latest step)
    g.observe({"response_length": 17.0})
    g.check(4)
    resumed = Guards(g.cfg, g.state())  # a resumed run judges on from the same numbers
    assert resumed.start_length == 8.0 and resumed.strikes == 1 and resumed.best_step == 3
    resumed.observe({"response_length": 3.0})
    ok, f = resumed.check(5)
    assert not ok and f.guard == "length" and f.values == {"response_length": 3.0, "start": 8.0, "factor": 2.0}


def test_watcher_lower_is_better_and_unlogged_values():
    g = Guards(GuardConfig(heldout_metric="val_loss", heldout_higher_is_better=False, heldout_max_drop=0.2,
                           reward_metric="reward_margin", kl_budget=5.0, entropy_floor=0.5))
    g.observe({"loss": 1.0})  # nothing watched: no check
    assert g.check(1) == (False, None)
    g.observe({"reward_margin": 0.0, "val_loss": 2.0})
    assert g.check(2) == (True, None) and g.best == -2.0
    g.observe({"reward_margin": 1.0, "val_loss": 2.3})
    ok, f = g.check(3)
    assert f.guard == "heldout" and f.values["best"] == 2.0 and f.values["drop"] == pytest.approx(0.3)
    g.observe({"kl": 6.0, "entropy": 1.0, "val_loss": 1.0})
    assert g.check(4)[1].guard == "kl"


# --------------------------------------------------------------------------------------------
# Both ways on a tiny GRPO run

RULES = '''
def length(prompt, response, row):
    """The hackable reward: pays for every character."""
    return len(response) / 10

'''


def guarded_config(model, prompts, rules, rewards, guards, **train) -> dict:
    """test_grpo's toy task (an answer containing "is") is what the run is for; it is logged as the
    weight-0 term `task`, the held-out metric, beside the reward the run is trained on."""
    t = dict(max_steps=10, batch_size=32, lr=2e-4, threads=1, tensorboard=False, checkpoint_every=0, seed=1,
             log_every=1)
    t.update(train)
    return {"model": str(model), "prompts": str(prompts), "prompts_per_step": 8, "group_size": 4,
            "rewards": rewards + [{"kind": "contains", "word": "is", "name": "task", "weight": 0}],
            "rollout": {"temperature": 1.0, "max_new_tokens": 8}, "sample_every": 0, "guards": guards, "train": t}


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    p = tmp_path_factory.mktemp("rules") / "hack_rules.py"
    p.write_text(RULES)
    return p


def run_grpo(tmp_path, cfg: dict):
    from lmforge.pipeline import run_single
    from lmforge.rundir import RunDir

    from .conftest import write_yaml

    m = run_single("grpo", str(write_yaml(tmp_path / "run.yaml", cfg)), [], out=str(tmp_path / "run"), force=True,
                   resume=False, echo=lambda *a: None)
    return m, RunDir(tmp_path / "run", "grpo", "model").read_metrics()


def test_length_reward_is_stopped_with_the_best_weights_kept(tmp_path, tiny_model_dir, rules):
    from .test_ppo import write_prompts

    cfg = guarded_config(tiny_model_dir, write_prompts(tmp_path / "p.jsonl"), rules,
                         [{"kind": "function", "function": f"{rules}:length", "name": "length"}],
                         {"heldout_metric": "reward/task", "heldout_max_drop": 0.2}, lr=3e-3)
    cfg["train"]["checkpoint_every"] = 3
    m, recs = run_grpo(tmp_path, cfg)
    steps = [r for r in recs if "reward" in r]
    # (step, reward, task) on this seed: (1, 1.13, 0.25) (2, 1.03, ...) (3, 1.60, 0.0): longer answers, no "is" left
    assert steps[-1]["reward"] > 1.3 * steps[0]["reward"] and steps[-1]["reward/task"] < steps[0]["reward/task"] - 0.2
    why = m["summary"]["stopped_by"]
    assert why["guard"] == "heldout" and why["step"] == steps[-1]["step"] < 10 and why["best_step"] == 1
    assert why["drop"] > 0.2 and why["reward"] > why["reward_at_best"]
    fired = [r for r in recs if r.get("guard") == "heldout"]  # logged with the values that fired it
    assert len(fired) == 1 and fired[0]["guard/metric"] == steps[-1]["reward/task"]
    assert "guard heldout stopped the run" in (tmp_path / "run" / "log.txt").read_text()
    # model/ holds the best step's weights, not the last step's
    ckpts = tmp_path / "run" / "checkpoints"
    best, last = same_keys(ckpts / "guard" / "best" / "trainable.safetensors",
                           ckpts / f"step-{why['step']:06d}" / "trainable.safetensors")
    saved, _ = same_keys(tmp_path / "run" / "model" / "model.safetensors", ckpts / "guard" / "best" / "trainable.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in best) and any(not torch.equal(best[k], last[k]) for k in best)


def same_keys(a, b) -> tuple[dict, dict]:
    """Both files' tensors by their name without the wrapper's prefix (lm.), on the names they share."""
    from safetensors.torch import load_file

    x = {k.removeprefix("lm."): v for k, v in load_file(str(a)).items()}
    y = {k.removeprefix("lm."): v for k, v in load_file(str(b)).items()}
    shared = sorted(set(x) & set(y))
    assert len(shared) > 10
    return {k: x[k] for k in shared}, {k: y[k] for k in shared}


def test_honest_reward_fires_no_guard(tmp_path, tiny_model_dir, rules):
    from .test_ppo import write_prompts

    cfg = guarded_config(tiny_model_dir, write_prompts(tmp_path / "p.jsonl"), rules, [{"kind": "contains", "word": "is"}],
                         {"heldout_metric": "reward/task", "heldout_max_drop": 0.2, "kl_budget": 30.0,
                          "length_factor": 2.0, "entropy_floor": 1.0})
    m, recs = run_grpo(tmp_path, cfg)
    steps = [r for r in recs if "reward" in r]
    assert m["summary"]["stopped_by"] is None and not any("guard" in r for r in recs)
    assert len(steps) == 10 and steps[-1]["reward/task"] > steps[0]["reward/task"] + 0.5  # 0.25 -> 1.0 on this seed
    # the thresholds are not idle: KL peaked ~11 (budget 30), entropy fell 2.56 -> ~1.6 (floor 1.0)
    assert max(r["kl"] for r in steps) > 5 and min(r["entropy"] for r in steps) < 2.0
