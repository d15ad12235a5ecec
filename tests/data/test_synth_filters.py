"""synth's filters on hand-made rows: exact and near duplicates (curate's MinHash), a planted
evaluation item caught by word n-gram overlap and listed, provenance scores, and a filter that
removes everything refused in one sentence."""

from __future__ import annotations

import pytest

from lmforge.data.curate import NearDedupConfig
from lmforge.data.synth_filters import apply_filters, contamination, word_ngrams
from lmforge.errors import LmforgeError

LONG = ("the northern river floods every spring and the villagers move their goats to the high meadow "
        "above the old stone bridge before the snow melts while the miller counts sacks of barley and "
        "oats in his dusty loft and his daughter writes letters to a cousin who sails merchant ships")


def chat(q: str, a: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def test_word_ngrams_and_overlap_share_by_hand():
    assert word_ngrams("A b, c d!", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert word_ngrams("a b", 3) == {("a", "b")}  # shorter than n: itself
    # eval item "a b c d e" has 3 trigrams; the row holds 2 of them (abc, bcd): share 2/3
    assert contamination(["x a b c d y"], ["a b c d e"], n=3, threshold=0.5) == [(0, 0, pytest.approx(2 / 3))]
    assert contamination(["x a b c d y"], ["a b c d e"], n=3, threshold=0.7) == []


def test_duplicates_and_a_planted_eval_item_are_removed_counted_and_listed():
    planted = "What is the capital of Veloria? The capital of Veloria is Tarsk, on the eastern coast."
    rows = [
        chat("Tell me about the river.", LONG, provenance={"teacher": "big", "seed_row": 0}),
        chat("Tell me about the river!", LONG.upper()),  # exact after normalisation
        chat("Describe the river.", LONG.replace("goats", "sheep")),  # one word changed: near duplicate
        chat("Quiz", planted + " Anything else?"),  # contains the evaluation item
        chat("What is 2 + 3?", "5", provenance={"teacher": "big", "seed_row": 4}),
    ]
    existing = [chat("What is 7 + 1?", "8"), {"text": "what is 2 + 3? 5"}]
    evals = [{"prompt": "What is the capital of Veloria?", "answer": "The capital of Veloria is Tarsk, on the eastern coast."},
             {"prompt": "Name a river.", "answer": "The Amber."}]
    res = apply_filters(rows, eval_rows=evals, existing=existing, decontam_ngram=4, decontam_threshold=0.5,
                        near=NearDedupConfig(threshold=0.7))  # one word in 50 changed: Jaccard ~ 41/51
    assert dict(res.removed) == {"exact_duplicate": 2, "near_duplicate": 1, "decontamination": 1}
    # row 4 ("What is 2 + 3? 5") is the existing text row, exactly
    assert [r["messages"][0]["content"] for r in res.rows] == ["Tell me about the river."]
    assert [(c["row"], c["eval_row"], c["share"]) for c in res.contaminated] == [(3, 0, 1.0)]
    prov = res.rows[0]["provenance"]
    assert prov["teacher"] == "big" and prov["seed_row"] == 0  # what the generator recorded is kept
    assert prov["filters"] == {"near_duplicate_jaccard": 0.0, "eval_ngram_share": 0.0}
    assert "goats" not in res.examples["near_duplicate"][0] and "sheep" in res.examples["near_duplicate"][0]


def test_a_filter_that_removes_everything_is_one_sentence_with_the_counts():
    rows = [chat("Quiz", "The capital of Veloria is Tarsk, on the eastern coast."),
            chat("Quiz 2", "Indeed the capital of Veloria is Tarsk, on the eastern coast.")]
    evals = [{"text": "The capital of Veloria is Tarsk, on the eastern coast."}]
    with pytest.raises(LmforgeError, match=r"^synth: the decontamination filter removed all 2 remaining rows "
                                           r"\(of 2 generated; removed so far: \{'decontamination': 2\}\)"):
        apply_filters(rows, eval_rows=evals, decontam_ngram=4)
    with pytest.raises(LmforgeError, match=r"the exact/near duplicate filter removed all 1 remaining rows"):
        apply_filters([chat("q", "a b c")], existing=[chat("Q", "A, b c.")])
