"""BM25 scores against hand-computed values, and reciprocal rank fusion on a hand example."""

from __future__ import annotations

import math

import pytest

from lmforge.retrieval import lexical
from lmforge.retrieval.fusion import reciprocal_rank_fusion

# Three chunks of 3, 2 and 4 terms: avgdl = 3, N = 3.
CORPUS = [["apple", "banana", "apple"], ["banana", "cherry"], ["cherry", "cherry", "cherry", "date"]]


def test_bm25_scores_equal_the_hand_computed_lucene_formula():
    bm25 = lexical.build(CORPUS, k1=1.5, b=0.75)
    # "apple": df 1 -> idf = ln(1 + 2.5/1.5) = 0.980829; chunk 0: tf 2, |d| = avgdl ->
    # tf / (tf + k1) = 2 / 3.5 -> 0.560474. No other chunk holds "apple".
    assert lexical.search(bm25, ["apple"], 3) == [(0, pytest.approx(0.560474, abs=1e-5))]
    # "banana" and "cherry": df 2 -> idf = ln(1 + 1.5/2.5) = ln 1.6 = 0.470004 each.
    idf = math.log(1.6)
    s1 = 2 * idf * 1 / (1 + 1.5 * (0.25 + 0.75 * 2 / 3))  # chunk 1: both terms once, |d| = 2
    s2 = idf * 3 / (3 + 1.5 * (0.25 + 0.75 * 4 / 3))  # chunk 2: cherry x3, |d| = 4
    s0 = idf * 1 / (1 + 1.5)  # chunk 0: banana once, |d| = 3
    assert (s1, s2, s0) == pytest.approx((0.442357, 0.289233, 0.188001), abs=1e-6)
    got = lexical.search(bm25, ["banana", "cherry"], 3)
    assert [r for r, _ in got] == [1, 2, 0]
    assert [s for _, s in got] == pytest.approx([s1, s2, s0], abs=1e-5)


def test_bm25_top_k_unknown_terms_and_zero_scores():
    bm25 = lexical.build(CORPUS, k1=1.5, b=0.75)
    assert [r for r, _ in lexical.search(bm25, ["banana", "cherry"], 2)] == [1, 2]
    assert lexical.search(bm25, ["zebra"], 3) == []  # no known term: nothing, not every chunk at 0
    assert [r for r, _ in lexical.search(bm25, ["date", "zebra"], 3)] == [2]  # chunks scoring 0 left out


def test_terms_are_lowercased_words_without_stop_words():
    assert lexical.terms(["What is the capital of Arvia?", "The Apples, the apple!"]) == [
        ["what", "capital", "arvia"], ["apples", "apple"]]


def test_rrf_on_a_hand_example():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60)
    # a: 1/61 + 1/62; c: 1/63 + 1/61; b: 1/62; d: 1/63
    assert [x for x, _ in fused] == ["a", "c", "b", "d"]
    assert [s for _, s in fused] == pytest.approx([1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62, 1 / 63])


def test_rrf_ties_keep_first_appearance():
    assert [x for x, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
