"""Reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009).

    rrf(d) = sum over rankings r that contain d:  1 / (k + rank_r(d))      (rank starts at 1)

Ranks, not scores, are fused, so BM25 scores and cosine similarities need no common scale;
k = 60 is the paper's constant (it damps the weight of the very first ranks).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hashable]], *, k: int = 60) -> list[tuple[Hashable, float]]:
    """(item, fused score), best first; ties keep the order of first appearance."""
    scores: dict[Hashable, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    order = {item: i for i, item in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))
