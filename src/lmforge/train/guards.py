"""Guards against reward hacking and runaway policies (ppo, grpo, dpo).

A reward can be gamed: a policy that learns to write longer answers, or to drift far from the
model it started from, raises its training reward while getting worse at what the reward stood
for. Four guards watch the metrics a stage logs and stop the run, keeping its best weights:

    heldout     a held-out metric (`heldout_metric`) falls more than `heldout_max_drop` below its
                best while the training reward (`reward_metric`) is above its value at that best
    kl          the KL from the reference (`kl`) exceeds `kl_budget`
    length      the mean response length (`response_length`) leaves [start / f, start x f],
                start being its first logged value, f = `length_factor`
    entropy     the policy's mean token entropy (`entropy`) falls below `entropy_floor`

The decisions are pure functions of hand-checkable numbers (below); `Guards` keeps what they need
across steps (the best held-out value, the starting length, consecutive firings) as plain numbers
a checkpoint can hold, and the shared Trainer (lmforge.train.loop) feeds it every logged record,
saves the best weights and stops the run when a guard fires.

"Best" is the step, among those at which no guard fired, with the best held-out metric; without
a held-out metric it is the latest such step (then the weights are written at every check, i.e.
every `train.log_every` steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import Field

from lmforge.config import Schema


class GuardConfig(Schema):
    """Guards of an RL or preference stage; each is off until its threshold is set."""

    heldout_metric: str | None = Field(
        None, description="Logged metric that must not fall while the reward rises: an evaluation metric (dpo: e.g. "
        "val_accuracy) or a reward term logged with weight 0 (ppo/grpo: e.g. reward/answer). None = guard off.")
    heldout_higher_is_better: bool = Field(True, description="False for a metric where lower is better (val_loss).")
    heldout_max_drop: float = Field(0.0, ge=0, description="How far below its best the held-out metric may fall "
                                    "(in its own units) before the guard fires.")
    reward_metric: str = Field("reward", description="Logged training reward the held-out guard compares "
                               "(ppo/grpo: reward; dpo: reward_margin).")
    kl_budget: float | None = Field(None, gt=0, description="Largest allowed logged `kl` from the reference (None = off).")
    length_factor: float | None = Field(None, gt=1, description="Largest allowed drift of the logged mean "
                                        "`response_length`, as a factor of its first value either way (None = off).")
    entropy_floor: float | None = Field(None, ge=0, description="Smallest allowed logged mean token `entropy`, in "
                                        "nats (None = off).")
    patience: int = Field(1, ge=1, description="Consecutive checks on which a guard must fire before it stops the run.")

    @property
    def enabled(self) -> bool:
        return any(x is not None for x in (self.heldout_metric, self.kl_budget, self.length_factor, self.entropy_floor))


@dataclass(frozen=True)
class Firing:
    """A guard that fired: its name, the values that made it fire, one sentence for the log."""

    guard: str
    values: dict[str, float]
    message: str


# --------------------------------------------------------------------------------------------
# The decisions: pure functions of the numbers


def heldout_fall(best: float, now: float, reward_at_best: float, reward_now: float, *, max_drop: float,
                 higher_is_better: bool = True, name: str = "heldout") -> Firing | None:
    """Fires when the held-out metric is more than max_drop worse than its best AND the reward is
    higher than when that best was seen (a falling metric with a falling reward is not hacking)."""
    drop = (best - now) if higher_is_better else (now - best)
    if drop > max_drop and reward_now > reward_at_best:
        return Firing("heldout", {"metric": now, "best": best, "drop": drop, "reward": reward_now,
                                  "reward_at_best": reward_at_best},
                      f"{name} fell to {now:.4g} from its best {best:.4g} (by {drop:.4g} > {max_drop:.4g}) while the "
                      f"reward rose to {reward_now:.4g} from {reward_at_best:.4g}")
    return None


def kl_over(kl: float, budget: float) -> Firing | None:
    if kl > budget:
        return Firing("kl", {"kl": kl, "budget": budget}, f"KL from the reference {kl:.4g} exceeds the budget {budget:.4g}")
    return None


def length_drift(start: float, now: float, factor: float) -> Firing | None:
    if now > start * factor or now < start / factor:
        return Firing("length", {"response_length": now, "start": start, "factor": factor},
                      f"mean response length {now:.4g} drifted beyond x{factor:g} of its start {start:.4g}")
    return None


def entropy_collapse(entropy: float, floor: float) -> Firing | None:
    if entropy < floor:
        return Firing("entropy", {"entropy": entropy, "floor": floor},
                      f"policy entropy {entropy:.4g} fell below the floor {floor:.4g}")
    return None


# --------------------------------------------------------------------------------------------
# What the decisions need across steps


_STATE = ("best", "best_step", "reward_at_best", "start_length", "strikes")  # saved as guard_<name>


class Guards:
    """Watches logged records: `observe` each one, `check` once per step boundary."""

    def __init__(self, cfg: GuardConfig, state: dict | None = None):
        self.cfg = cfg
        self.latest: dict[str, float] = {}
        self.fresh = False  # a watched value arrived since the last check
        self.best: float | None = None  # held-out metric's best (higher = better after the sign), or a step
        self.best_step: int | None = None
        self.reward_at_best: float | None = None
        self.start_length: float | None = None
        self.strikes = 0
        for k in _STATE:
            if state and state.get(f"guard_{k}") is not None:
                setattr(self, k, state[f"guard_{k}"])

    @property
    def watched(self) -> tuple[str, ...]:
        c = self.cfg
        return tuple(k for k, on in ((c.heldout_metric, c.heldout_metric), (c.reward_metric, c.heldout_metric),
                                     ("kl", c.kl_budget), ("response_length", c.length_factor),
                                     ("entropy", c.entropy_floor)) if on is not None)

    def observe(self, record: dict) -> None:
        for k in self.watched:
            v = record.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.latest[k] = float(v)
                self.fresh = True
        if self.start_length is None and "response_length" in self.latest:
            self.start_length = self.latest["response_length"]

    def fired(self) -> Firing | None:
        """The first guard firing on the latest values (None if none, or a value is not logged yet)."""
        c, v = self.cfg, self.latest
        m, r = c.heldout_metric, c.reward_metric
        if m is not None and m in v and r in v and self.reward_at_best is not None and self.best is not None:
            best = self.best if c.heldout_higher_is_better else -self.best
            f = heldout_fall(best, v[m], self.reward_at_best, v[r], max_drop=c.heldout_max_drop,
                             higher_is_better=c.heldout_higher_is_better, name=m)
            if f:
                return f
        if c.kl_budget is not None and "kl" in v and (f := kl_over(v["kl"], c.kl_budget)):
            return f
        if c.length_factor is not None and self.start_length and "response_length" in v and (
                f := length_drift(self.start_length, v["response_length"], c.length_factor)):
            return f
        if c.entropy_floor is not None and "entropy" in v and (f := entropy_collapse(v["entropy"], c.entropy_floor)):
            return f
        return None

    def check(self, step: int) -> tuple[bool, Firing | None]:
        """(the weights of this step are the new best, the firing that stops the run or None).
        Only new values count: with log_every > 1 the steps between logs are not re-judged."""
        if not self.fresh:
            return False, None
        self.fresh = False
        f = self.fired()
        self.strikes = self.strikes + 1 if f else 0
        if f:
            return False, f if self.strikes >= self.cfg.patience else None
        m = self.cfg.heldout_metric
        if m is not None and m not in self.latest:
            return False, None
        score = float(step) if m is None else (self.latest[m] if self.cfg.heldout_higher_is_better else -self.latest[m])
        if self.best is not None and score <= self.best:
            return False, None
        self.best, self.best_step = score, step
        self.reward_at_best = self.latest.get(self.cfg.reward_metric)
        return True, None

    def state(self) -> dict:
        """Plain numbers for a checkpoint's state.json (resume continues the same judgement)."""
        return {f"guard_{k}": getattr(self, k) for k in _STATE}
