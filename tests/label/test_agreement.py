"""Krippendorff's alpha against hand-computed values."""

from __future__ import annotations

import pytest

from lmforge.label.agreement import agreement, krippendorff_alpha, pair_values


def test_alpha_hand_computed():
    # Coincidences: u1 (x,x) adds o_xx 2; u2 (x,y) adds o_xy 1, o_yx 1; u3 (y,y) adds o_yy 2;
    # u4 (x,x,y), m=3, each ordered pair weighs 1/2: o_xx 1, o_xy 1, o_yx 1. u5 has one value: unpaired.
    # o_xx=3 o_xy=2 o_yx=2 o_yy=2 -> n_x=5 n_y=4 n=9; alpha = 1 - 8 * 4 / (5*4 + 4*5) = 0.2
    units = {"u1": ["x", "x"], "u2": ["x", "y"], "u3": ["y", "y"], "u4": ["x", "x", "y"], "u5": ["y"]}
    assert krippendorff_alpha(units) == pytest.approx(0.2)


def test_alpha_edges():
    assert krippendorff_alpha({"a": ["x", "x"], "b": ["y", "y"]}) == pytest.approx(1.0)
    # perfect disagreement on two units: o_xy = o_yx = 2, n_x = n_y = 2, n = 4: 1 - 3*4/8 = -0.5
    assert krippendorff_alpha({"a": ["x", "y"], "b": ["y", "x"]}) == pytest.approx(-0.5)
    assert krippendorff_alpha({"a": ["x", "x"], "b": ["x", "x"]}) is None  # no variation: undefined
    assert krippendorff_alpha({"a": ["x"]}) is None


def test_pair_values_of_a_ranking():
    j = {"verdict": "ranked", "ranking": [12, 10, 11]}
    assert pair_values(j, [10, 11, 12]) == {(10, 11): "first", (10, 12): "second", (11, 12): "second"}
    assert pair_values({"verdict": "tie", "ranking": None}, [3, 4]) == {(3, 4): "tie"}


def test_agreement_per_pair_and_overall():
    def j(item, who, verdict, ranking=None):
        return {"item_id": item, "annotator": who, "verdict": verdict, "ranking": ranking}

    responses = {1: [1, 2], 2: [3, 4], 3: [5, 6]}
    js = [j(1, "ann", "ranked", [1, 2]), j(1, "bob", "ranked", [1, 2]),
          j(2, "ann", "ranked", [3, 4]), j(2, "bob", "ranked", [4, 3]),
          j(3, "ann", "ranked", [6, 5]), j(3, "bob", "skip"), j(3, "cy", "ranked", [6, 5])]
    a = agreement(js, responses)
    # ann-bob: units (1: first, first), (2: first, second): o_ff=2, o_fs=o_sf=1 -> n_f=3, n_s=1, n=4
    # alpha = 1 - 3 * 2 / (3 + 3) = 0.0; ann-cy: one unit, both "second": undefined
    pairs = {tuple(p["annotators"]): p for p in a["pairs"]}
    assert pairs["ann", "bob"]["alpha"] == pytest.approx(0.0) and pairs["ann", "bob"]["percent_agreement"] == 50.0
    assert pairs["ann", "cy"]["alpha"] is None and pairs["ann", "cy"]["units"] == 1
    assert ("bob", "cy") not in pairs  # bob skipped item 3
    # overall: units first/first, first/second, second/second: o_ff=2, o_fs=o_sf=1, o_ss=2 -> n_f=n_s=3, n=6
    # alpha = 1 - 5 * 2 / 18 = 0.4444
    assert a["alpha"] == pytest.approx(1 - 5 * 2 / 18, abs=1e-4) and a["items_with_overlap"] == 3
