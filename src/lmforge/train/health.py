"""Warnings when a preference run's own signals say the model is getting worse (dpo and kin).

A preference loss can fall and its pair accuracy climb while the model degrades: the loss only
asks that chosen beat rejected, which it can get by pushing BOTH down. Three signals the dpo stage
already logs tell this apart, and each gives one warning sentence (the run goes on; the warnings
go into log.txt and the stage summary, where the report shows them):

    logp_chosen     the chosen response's log-probability: its mean over the last quarter of the
                    logged steps below its mean over the first quarter by more than `LOGP_DROP` nats
    reward_chosen   the chosen reward (beta x log-ratio to the reference): negative on average over
                    the last quarter, i.e. the policy now finds the chosen answers LESS likely than
                    the model it started from did
    probe_chosen    the greedy probe's match rate with the chosen answers: its last value below its
                    first (the model's own answers moved away from the preferred ones)

Pure functions of the logged records, so each rule is checked on hand-made numbers.
"""

from __future__ import annotations

LOGP_DROP = 1.0  # nats: a summed log-prob wobbles by a fraction of a nat from batch to batch


def _series(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]


def _quarters(xs: list[float]) -> tuple[float, float]:
    k = max(1, len(xs) // 4)
    return sum(xs[:k]) / k, sum(xs[-k:]) / k


def degradation_warnings(records: list[dict], *, lr: float) -> list[str]:
    """One sentence per signal that says the model is degrading (empty when none does)."""
    out: list[str] = []
    fix = f"the model may be degrading: lower train.lr (now {lr:g}) or train fewer steps, and evaluate it"
    logp = _series(records, "logp_chosen")
    if len(logp) >= 4:
        first, last = _quarters(logp)
        if last < first - LOGP_DROP:
            out.append(f"the chosen responses' log-probability fell from {first:.2f} to {last:.2f}; {fix}.")
    reward = _series(records, "reward_chosen")
    if len(reward) >= 4:
        _, last = _quarters(reward)
        if last < 0:
            out.append(f"the chosen reward is negative ({last:.3f} over the last quarter of steps): the policy "
                       f"finds the preferred answers less likely than the starting model did; {fix}.")
    probe = _series(records, "val_probe_chosen") or _series(records, "probe_chosen")
    if len(probe) >= 2 and probe[-1] < probe[0]:
        out.append(f"the greedy probe matches the chosen answer less often than at the start "
                   f"({probe[0]:.0%} -> {probe[-1]:.0%}); {fix}.")
    return out
