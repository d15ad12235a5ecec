"""The seeded bootstrap: equal to the naive loop it replaces, and right on known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.eval import stats


def naive_bootstrap(values, weights=None, n_resamples=1000, confidence=0.95, seed=0):
    """The textbook loop: one resample of item indices at a time."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, float)
    w = None if weights is None else np.asarray(weights, float)
    out = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(v), size=len(v))
        out.append(v[idx].mean() if w is None else (v[idx] * w[idx]).sum() / w[idx].sum())
    a = (1 - confidence) / 2
    return tuple(np.quantile(out, [a, 1 - a]))


def test_equals_the_naive_loop_also_when_chunked(monkeypatch):
    values = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1]
    ref = naive_bootstrap(values, n_resamples=500, seed=3)
    e = stats.bootstrap(values, n_resamples=500, seed=3)
    assert e.value == pytest.approx(7 / 12)
    assert e.n == 12
    assert (e.ci_low, e.ci_high) == pytest.approx(ref, abs=1e-12)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 30)  # 2 resamples per chunk: same stream, same answer
    e2 = stats.bootstrap(values, n_resamples=500, seed=3)
    assert (e2.ci_low, e2.ci_high) == (e.ci_low, e.ci_high)


def test_weighted_ratio_equals_the_naive_loop():
    per_doc, tokens = [1.0, 3.0, 2.0, 5.0], [1, 3, 2, 10]
    e = stats.bootstrap(per_doc, weights=tokens, n_resamples=300, seed=1)
    assert e.value == pytest.approx((1 + 9 + 4 + 50) / 16)  # total nats / total tokens
    assert (e.ci_low, e.ci_high) == pytest.approx(naive_bootstrap(per_doc, tokens, 300, seed=1), abs=1e-12)


def test_seeded_and_degenerate_cases():
    v = np.random.default_rng(0).random(50)
    assert stats.bootstrap(v, seed=5) == stats.bootstrap(v, seed=5)
    assert stats.bootstrap(v, seed=5).ci_low != stats.bootstrap(v, seed=6).ci_low
    assert stats.bootstrap([1.0] * 20).as_dict() == {"value": 1.0, "n": 20, "ci_low": 1.0, "ci_high": 1.0}
    assert stats.bootstrap([0.25]).as_dict() == {"value": 0.25, "n": 1, "ci_low": 0.25, "ci_high": 0.25}
    assert stats.bootstrap([]).as_dict() == {"value": None, "n": 0, "ci_low": None, "ci_high": None}


def test_bernoulli_interval_covers_p_about_95_percent_of_the_time():
    p, n, trials = 0.3, 200, 200
    rng = np.random.default_rng(123)
    covered = 0
    for t in range(trials):
        e = stats.bootstrap(rng.random(n) < p, n_resamples=1000, seed=t)
        covered += e.ci_low <= p <= e.ci_high
    # Binomial(200, 0.95) lies in [180, 197] with probability > 0.999.
    assert 180 <= covered <= 197


def test_normal_mean_interval_has_the_analytic_width():
    n = 400
    x = np.random.default_rng(7).normal(10.0, 2.0, size=n)
    e = stats.bootstrap(x, n_resamples=4000, seed=0)
    sd = x.std(ddof=0)
    expected = 2 * 1.959964 * sd / math.sqrt(n)  # ~ 0.39
    assert (e.ci_high - e.ci_low) == pytest.approx(expected, rel=0.08)
    assert e.ci_low < x.mean() < e.ci_high


def test_paired_difference_is_the_bootstrap_of_differences_and_narrower_than_unpaired():
    rng = np.random.default_rng(2)
    difficulty = rng.random(300)
    a = (difficulty + 0.1 * rng.random(300) > 0.5).astype(float)
    b = (difficulty > 0.5).astype(float)
    d = stats.paired_difference(a, b, seed=4)
    ref = stats.bootstrap(a - b, seed=4)
    assert d == ref
    assert d.value == pytest.approx(a.mean() - b.mean())
    ea, eb = stats.bootstrap(a, seed=4), stats.bootstrap(b, seed=4)
    unpaired_half_width = 1.96 * math.sqrt(a.var() / 300 + b.var() / 300)
    assert (d.ci_high - d.ci_low) / 2 < 0.5 * unpaired_half_width
    assert ea.n == eb.n == 300


def test_bad_inputs_name_the_problem():
    with pytest.raises(LmforgeError, match="3 values but 2 weights"):
        stats.bootstrap([1, 2, 3], weights=[1, 1])
    with pytest.raises(LmforgeError, match="same items; got 2 and 3"):
        stats.paired_difference([1, 2], [1, 2, 3])
    with pytest.raises(LmforgeError, match="confidence"):
        stats.bootstrap([1, 2], confidence=1.5)
