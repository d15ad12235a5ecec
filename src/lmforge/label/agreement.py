"""Inter-annotator agreement: Krippendorff's alpha (nominal) over pairwise decisions.

Why Krippendorff's alpha and not a kappa: Cohen's kappa takes exactly two annotators who judged
the same items; Fleiss' kappa takes a fixed number of annotators per item. Here the overlap share
is judged by two or more annotators, others by one, skips leave holes, and annotators join late;
alpha takes any number of annotators per unit and missing values as they come, and for two
annotators on complete data it is Scott's pi corrected for sample size (close to Cohen's kappa).

The unit: rankings of k responses are not comparable as wholes (two annotators agreeing on the
best and disagreeing on the rest would count as plain disagreement), so each item contributes one
unit per pair of its responses, valued "first" / "second" (which of the two was ranked higher),
"tie" or "all_bad" (nominal: both-bad is a different statement from tie). Pairwise mode has one
such unit per item, so alpha there is exactly alpha over the A/B/tie/both-bad choices.

    alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c * n_k

with o_ck the coincidence counts (each unit with m >= 2 values adds, for every ordered pair of
its values from different annotators, 1 / (m - 1)), n_c = sum_k o_ck and n = sum_c n_c
(Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability", nominal case).
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Hashable


def krippendorff_alpha(units: dict[Hashable, list[Hashable]]) -> float | None:
    """Nominal alpha of {unit: [the value each annotator gave]}; units with fewer than two values
    are not pairable and are left out. None when undefined (fewer than two pairable values, or
    every value the same, so no disagreement could be expected)."""
    o: Counter = Counter()
    for values in units.values():
        m = len(values)
        if m < 2:
            continue
        for a, b in itertools.permutations(range(m), 2):
            o[values[a], values[b]] += 1.0 / (m - 1)
    n_c: Counter = Counter()
    for (c, _k), w in o.items():
        n_c[c] += w
    n = sum(n_c.values())
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if n <= 1 or expected == 0:
        return None
    observed = sum(w for (c, k), w in o.items() if c != k)
    return 1.0 - (n - 1) * observed / expected


def pair_values(judgment: dict, response_ids: list[int]) -> dict[tuple[int, int], str]:
    """{(r1, r2) with r1 < r2: "first" | "second" | "tie" | "all_bad"} for one live non-skip judgment."""
    ids = sorted(response_ids)
    out = {}
    for r1, r2 in itertools.combinations(ids, 2):
        if judgment["verdict"] == "ranked":
            rank = {r: i for i, r in enumerate(judgment["ranking"])}
            out[r1, r2] = "first" if rank[r1] < rank[r2] else "second"
        else:
            out[r1, r2] = judgment["verdict"]
    return out


def agreement(judgments: list[dict], responses_of: dict[int, list[int]]) -> dict:
    """Alpha overall and per annotator pair, with the units and the raw share of agreeing pairs.

    judgments: live judgments (store.judgments()); responses_of: item id -> its response ids."""
    by_unit: dict[tuple, dict[str, str]] = defaultdict(dict)  # (item, r1, r2) -> annotator -> value
    for j in judgments:
        if j["verdict"] == "skip":
            continue
        for pair, v in pair_values(j, responses_of[j["item_id"]]).items():
            by_unit[(j["item_id"], *pair)][j["annotator"]] = v
    overall = krippendorff_alpha({u: list(vals.values()) for u, vals in by_unit.items()})
    names = sorted({a for vals in by_unit.values() for a in vals})
    pairs = []
    for a, b in itertools.combinations(names, 2):
        shared = {u: [vals[a], vals[b]] for u, vals in by_unit.items() if a in vals and b in vals}
        if not shared:
            continue
        items = {u[0] for u in shared}
        agree = sum(v[0] == v[1] for v in shared.values())
        pairs.append({"annotators": [a, b], "items": len(items), "units": len(shared),
                      "percent_agreement": round(100.0 * agree / len(shared), 2),
                      "alpha": _round(krippendorff_alpha(shared))})
    multi = [u for u, vals in by_unit.items() if len(vals) >= 2]
    return {"method": "Krippendorff's alpha (nominal) over response pairs", "alpha": _round(overall),
            "items_with_overlap": len({u[0] for u in multi}), "units": len(multi), "pairs": pairs}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
