"""Guards (lmforge.train.guards): each decision on hand values, the watcher's memory across steps,
and both ways on a tiny GRPO run: a reward that pays for length is stopped with the best weights
kept; an honest reward fires nothing."""

from __future__ import annotations

import pytest
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
