"""Confidence intervals for evaluation metrics: the seeded percentile bootstrap.

Every metric lmforge reports is a mean over items (a 0/1 score per prompt, a reward per
answer) or a ratio of sums (nats per token over documents). Its 95% interval comes from
resampling the items with replacement `n_resamples` times and taking the 2.5th and 97.5th
percentiles of the recomputed statistic (Efron's percentile bootstrap). The draws come from
`numpy.random.default_rng(seed)`, so the same scores always give the same interval.

A difference between two models on the same items (a delta in the report) is bootstrapped
*paired*: one resample of item indices is applied to both score lists, so the shared
per-item difficulty cancels and the interval is narrower than two independent ones suggest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lmforge.errors import LmforgeError

# Resamples are drawn in chunks of at most this many indices (8 bytes each), so a bootstrap
# over a large item list never allocates an (n_resamples, n) matrix at once.
_CHUNK_ELEMENTS = 4_000_000


@dataclass
class Estimate:
    """A statistic with its sample size and bootstrap interval (None when n == 0)."""

    value: float | None
    n: int
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _resample_means(values: np.ndarray, weights: np.ndarray | None, n_resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(n_resamples,) statistics of index resamples: mean, or sum(v*w)/sum(w) when weighted."""
    n = len(values)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = np.empty(n_resamples, dtype=np.float64)
    done = 0
    while done < n_resamples:
        b = min(per_chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n))  # (b, n) item indices, with replacement
        if weights is None:
            out[done:done + b] = values[idx].mean(axis=1)
        else:
            w = weights[idx]
            out[done:done + b] = (values[idx] * w).sum(axis=1) / w.sum(axis=1)
        done += b
    return out


def bootstrap(values: Sequence[float], *, weights: Sequence[float] | None = None, n_resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of `values` (weighted: sum(v*w)/sum(w)) and its percentile-bootstrap interval.

    Equals, for the unweighted case:
        stats = [mean(choice(values, n, replace=True)) for _ in range(n_resamples)]
        (mean(values), n, percentile(stats, 2.5), percentile(stats, 97.5))
    with the resamples drawn from `np.random.default_rng(seed)`.
    """
    if not 0 < confidence < 1:
        raise LmforgeError(f"confidence must be between 0 and 1, not {confidence}.")
    if n_resamples < 1:
        raise LmforgeError(f"n_resamples must be at least 1, not {n_resamples}.")
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return Estimate(None, 0, None, None)
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != v.shape:
            raise LmforgeError(f"bootstrap got {n} values but {len(w)} weights; they must pair up.")
        if (w < 0).any() or w.sum() <= 0:
            raise LmforgeError("bootstrap weights must be non-negative with a positive sum.")
    point = float(v.mean()) if w is None else float((v * w).sum() / w.sum())
    if n == 1:
        return Estimate(point, 1, point, point)
    stats = _resample_means(v, w, n_resamples, np.random.default_rng(seed))
    if w is not None:
        stats = stats[np.isfinite(stats)]  # a resample of only zero-weight items has no ratio
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(point, n, float(lo), float(hi))


def paired_difference(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 1000,
                      confidence: float = 0.95, seed: int = 0) -> Estimate:
    """mean(a) - mean(b) over the same items, with a paired bootstrap interval.

    Equals `bootstrap([x - y for x, y in zip(a, b)])`: resampling item indices and applying
    them to both lists is resampling the per-item differences.
    """
    if len(a) != len(b):
        raise LmforgeError(f"A paired difference needs scores of the same items; got {len(a)} and {len(b)}.")
    return bootstrap(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64),
                     n_resamples=n_resamples, confidence=confidence, seed=seed)
