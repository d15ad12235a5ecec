"""Active selection: hand-computed uncertainty and disagreement, and a real reward model's
scores putting its least certain item first in every annotator's queue."""

from __future__ import annotations

import math

import pytest

from lmforge.label.select import disagreement, priority, select, uncertainty
from lmforge.label.store import Response, Store


def test_uncertainty_and_disagreement_by_hand():
    # top 2.0, runner-up 0.0: sigmoid(2) = 0.880797; 1 - |2 * 0.880797 - 1| = 0.238406
    assert uncertainty([0.0, 2.0, -1.0]) == pytest.approx(0.238406, abs=1e-6)
    assert uncertainty([1.0, 1.0]) == pytest.approx(1.0)
    assert disagreement([1, 2, 3], [3, 2, 1]) == 1.0
    assert disagreement([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert disagreement([1, 2, 3], [1, 1, 3]) == 0.0  # a tie is no disagreement
    # two models: disagreement first, then mean uncertainty
    assert priority([[0.0, 5.0], [5.0, 0.0]]) < priority([[0.0, 0.1], [0.0, 0.1]])
    assert priority([[0.0, 0.1]]) < priority([[0.0, 3.0]])
    assert priority([[0.0, 0.1]])[1] == pytest.approx(-(1 - abs(2 / (1 + math.exp(-0.1)) - 1)))


def test_select_with_a_reward_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.scoring import load_reward_model

    rm_dir = tmp_path / "rm"
    m = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    m.config.pad_token_id = AutoTokenizer.from_pretrained(str(tiny_model_dir)).pad_token_id
    m.save_pretrained(str(rm_dir))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(rm_dir))
    s = Store(tmp_path / "l.sqlite")
    s.configure(mode="rank", overlap=0.0, overlap_annotators=2)
    texts = [["The quick brown fox.", "Hello there!"], ["Two plus two is four.", "I am fine."],
             ["A small model.", "The old miller carries three apples."], ["Thank you.", "What is two plus two?"]]
    for i, t in enumerate(texts):
        s.add_item(f"q{i}", [{"role": "user", "content": f"Say something {i}."}], [Response(x, "m", {}) for x in t], "t")
    summary = select(s, [str(rm_dir)], device="cpu")
    rm = load_reward_model(str(rm_dir), device="cpu")
    u = {f"q{i}": uncertainty(rm.score([[{"role": "user", "content": f"Say something {i}."}]] * 2, t))
         for i, t in enumerate(texts)}
    expect = sorted(u, key=lambda q: -u[q])
    assert [s.item(i)["prompt_id"] for i in s.item_ids()] == expect and summary["first"] == expect
    a = s.annotator(s.add_annotator("ann"))
    assert s.item(s.next_item(a.id))["prompt_id"] == expect[0]
