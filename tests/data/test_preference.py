"""Preference data: row formats, ranked expansion, KTO items, bad rows, SFT-identical masks, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.formats import ReadStats
from lmforge.data.preference import (
    DataFields,
    PreferenceBatches,
    collate,
    in_validation,
    load_splits,
    ranked_to_pairs,
    read_preferences,
)
from lmforge.data.sft import ChatEncoder
from lmforge.errors import LmforgeError

Q1, A1 = "How are you today?", "I am fine, thank you."
Q2, A2 = "What is two plus two?", "Two plus two is four."


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def enc(tok):
    return ChatEncoder(tok)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path, enc, unit="pairs", max_length=128, **kw):
    return read_preferences(str(path), enc, unit=unit, max_length=max_length, **kw)["train"]


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_formats_text_trl_conversational_and_implicit_prompt_give_the_same_sequences(tmp_path, tok, enc):
    rows = [
        {"prompt": Q1, "chosen": A1, "rejected": A2},
        {"prompt": [{"role": "user", "content": Q1}], "chosen": [{"role": "assistant", "content": A1}],
         "rejected": [{"role": "assistant", "content": A2}]},
        {"chosen": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}],
         "rejected": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A2}]},
    ]
    d = read(write_jsonl(tmp_path / "p.jsonl", rows), enc)
    assert d.stats["pairs"] == 3 and d.n_seqs == 6
    seqs = [d.seq(s).tolist() for s in range(6)]
    assert seqs[0] == seqs[2] == seqs[4] and seqs[1] == seqs[3] == seqs[5]
    c, p = d.seq(int(d.chosen[0])), int(d.prompt_len[d.chosen[0]])
    assert decode(tok, c[:p]) == f"<|user|>{Q1}<|eos|><|assistant|>"
    assert decode(tok, c[p:]) == A1 + "<|eos|>"
    assert decode(tok, d.seq(int(d.rejected[0]))[p:]) == A2 + "<|eos|>"


def test_sequences_and_masks_are_exactly_sfts(tmp_path, tok, enc):
    """The response tokens are what SFT's encoder supervises for the same conversation."""
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q2},
              {"role": "assistant", "content": "Four."}, {"role": "user", "content": Q1}]
    d = read(write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": A1, "rejected": A2}]), enc)
    ids, sup = enc.encode_many([([*prompt, {"role": "assistant", "content": A1}], "x")])[0]
    assert d.seq(int(d.chosen[0])).tolist() == ids
    p = int(d.prompt_len[d.chosen[0]])
    # Only the final turn counts: SFT also supervises the earlier "Four." turn, preference data never does.
    last = len(sup) - sup[::-1].index(False)
    assert p == last and all(sup[p:]) and sum(sup[:p]) == len(enc.tok("Four.<|eos|>", add_special_tokens=False)["input_ids"])
    b = collate(d, np.array([d.chosen[0]]), layout="pad", pad_id=tok.pad_token_id)
    lab = b["labels"][0].tolist()
    assert lab[p - 1:len(ids) - 1] == ids[p:] and set(lab[:p - 1] + lab[len(ids) - 1:]) == {-100}
    assert int(b["n_tokens"][0]) == len(ids) - p


def test_ranked_rows_expand_into_pairs():
    assert ranked_to_pairs([3.0, 2.0, 1.0], "all", False) == [(0, 1, 0.0), (0, 2, 0.0), (1, 2, 0.0)]
    # scores: ties form no pair; margins are score differences
    assert ranked_to_pairs([0.5, 2.0, 0.5], "all", True) == [(1, 0, 1.5), (1, 2, 1.5)]
    assert ranked_to_pairs([0.5, 2.0, -1.0], "best_vs_worst", True) == [(1, 2, 3.0)]
    assert ranked_to_pairs([0.5, 2.0, -1.0], "best_vs_rest", False) == [(1, 0, 0.0), (1, 2, 0.0)]


def test_ranked_file_shares_sequences_between_pairs(tmp_path, tok, enc):
    rows = [{"prompt": Q1, "responses": [A1, A2, "Hello there!"]},
            {"prompt": Q2, "responses": [A1, A2, "The lazy dog."], "scores": [1.0, 3.0, 1.0]}]
    d = read(write_jsonl(tmp_path / "r.jsonl", rows), enc)
    # row 1: 3 pairs over 3 sequences; row 2: A2 beats both others (tie between them: no pair)
    assert d.stats["pairs"] == 5 and d.n_seqs == 6
    texts = [decode(tok, d.seq(s)[d.prompt_len[s]:]).removesuffix("<|eos|>") for s in range(6)]
    pairs = [(texts[c], texts[r]) for c, r in zip(d.chosen, d.rejected)]
    assert pairs == [(A1, A2), (A1, "Hello there!"), (A2, "Hello there!"), (A2, A1), (A2, "The lazy dog.")]
    assert d.margin.tolist() == [0, 0, 0, 2.0, 2.0]


def test_unpaired_items_and_pairs_as_kto_items(tmp_path, tok, enc):
    rows = [{"prompt": Q1, "completion": A1, "label": "good"}, {"prompt": Q1, "completion": A2, "label": False},
            {"prompt": Q2, "chosen": A2, "rejected": A1},
            {"prompt": Q2, "responses": [A2, "Hello there!", A1]}]  # middle of a ranking: left out
    d = read(write_jsonl(tmp_path / "u.jsonl", rows), enc, unit="items")
    texts = [decode(tok, d.seq(s)[d.prompt_len[s]:]).removesuffix("<|eos|>") for s in d.item_seq]
    assert list(zip(texts, d.desirable.tolist())) == [(A1, True), (A2, False), (A2, True), (A1, False), (A2, True),
                                                       (A1, False)]
    assert d.stats["ranked_middle_left_out"] == 1
    with pytest.raises(LmforgeError, match=r"u\.jsonl line 1 is an unpaired .* method dpo trains on pairs"):
        read(tmp_path / "u.jsonl", enc, unit="pairs")


BAD = [
    ({"prompt": Q1, "chosen": A1, "rejected": A1}, "'chosen' and 'rejected' are the same response", "chosen equals rejected"),
    ({"prompt": Q1, "chosen": "  ", "rejected": A2}, "field 'chosen' is an empty response", "empty response"),
    ({"prompt": Q1, "chosen": A1}, "has field 'chosen' but no 'rejected'", "missing field"),
    ({"chosen": A1, "rejected": A2}, "has no field 'prompt'", "missing field"),
    ({"prompt": "", "chosen": A1, "rejected": A2}, "field 'prompt' is empty", "empty prompt"),
    ({"prompt": Q1, "responses": [A1]}, "must list at least two responses", "bad responses"),
    ({"prompt": Q1, "responses": [A1, A2], "scores": [1, 1]}, "every response has the same score", "no preference"),
    ({"prompt": Q1, "completion": A1, "label": "maybe"}, "field 'label' is 'maybe'", "bad label"),
    ({"prompt": [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}], "chosen": A1, "rejected": A2},
     "messages[1] and messages[2] are both 'assistant' turns", "consecutive same-role turns"),
    ({"prompt": " ".join(["hello"] * 200), "chosen": A1, "rejected": A2}, "leaves no room for a response within "
     "max_length 64", "prompt too long"),
]


@pytest.mark.parametrize("row,message,_reason", BAD)
def test_bad_row_is_an_error_naming_file_and_line(tmp_path, enc, row, message, _reason):
    good = {"prompt": Q2, "chosen": A2, "rejected": A1}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row, good])
    with pytest.raises(LmforgeError) as e:
        read(path, enc, max_length=64)
    assert "bad.jsonl line 3" in str(e.value) and message in str(e.value) and "on_bad_rows: skip" in str(e.value)


def test_bad_rows_skipped_and_counted(tmp_path, enc):
    good = {"prompt": Q2, "chosen": A2, "rejected": A1}
    rows = [good] + [r for r, _, _ in BAD] + [good]
    stats = ReadStats()
    d = read(write_jsonl(tmp_path / "bad.jsonl", rows), enc, max_length=64, on_bad_rows="skip", stats=stats)
    assert d.stats["pairs"] == 2
    assert stats.skipped == {"chosen equals rejected": 1, "empty response": 1, "missing field": 2, "empty prompt": 1,
                             "bad responses": 1, "no preference": 1, "bad label": 1,
                             "consecutive same-role turns": 1, "prompt too long": 1}


def test_overlong_truncated_or_dropped_and_counted(tmp_path, tok, enc):
    long_a, long_b = "Hello there! " * 20 + "A", "Hello there! " * 20 + "B"
    rows = [{"prompt": Q1, "chosen": A1, "rejected": long_b},  # rejected truncated
            {"prompt": Q1, "chosen": long_a, "rejected": long_b},  # identical once truncated
            {"prompt": Q2, "chosen": A2, "rejected": A1}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    d = read(path, enc, max_length=40)
    assert d.stats["pairs"] == 2 and d.stats["truncated"] == 3 and d.stats["pairs_identical_after_truncation"] == 1
    assert d.lengths.max() == 40
    dropped = read(path, enc, max_length=40, overlong="drop")
    assert dropped.stats["pairs"] == 1 and dropped.stats["dropped_too_long"] == 2


def test_parquet_and_datasets_folder_read_like_jsonl(tmp_path, enc):
    import datasets

    rows = [{"prompt": Q1, "chosen": A1, "rejected": A2}, {"prompt": Q2, "chosen": A2, "rejected": A1}]
    ref = read(write_jsonl(tmp_path / "p.jsonl", rows), enc)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for src in (tmp_path / "p.parquet", tmp_path / "ds"):
        d = read(src, enc)
        assert np.array_equal(d.ids, ref.ids) and np.array_equal(d.chosen, ref.chosen)


def test_validation_split_keeps_every_prompt_on_one_side(tmp_path, tok):
    rows = [{"prompt": f"{q} {i}", "chosen": a, "rejected": b}
            for i in range(40) for q, a, b in ((Q1, A1, A2), (Q1, A2, "Hello there!"))]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    sp = load_splits(DataFields(data=str(path), val_fraction=0.25), tok, unit="pairs", max_length=64, method="dpo")
    tr = {json.dumps(e["prompt"]) for e in sp.train.examples}
    va = {json.dumps(e["prompt"]) for e in sp.val.examples}
    assert not tr & va and sp.train.stats["pairs"] + sp.val.stats["pairs"] == 80
    assert sp.val.stats["pairs"] == 2 * sum(in_validation([{"role": "user", "content": f"{Q1} {i}"}], 0.25)
                                            for i in range(40))
    assert sp.example.endswith("⟧") and "⟦" in sp.example


def test_pack_layout_no_row_longer_than_the_longest_sequence(tmp_path, tok, enc):
    rows = [{"prompt": Q1, "chosen": A1, "rejected": "Hello there! " * 6}, {"prompt": Q2, "chosen": "Four.", "rejected": "Two."}]
    d = read(write_jsonl(tmp_path / "k.jsonl", rows), enc)
    seqs = np.array([d.chosen[0], d.chosen[1], d.rejected[0], d.rejected[1]])
    b = collate(d, seqs, layout="pack", pad_id=tok.pad_token_id)
    longest = int(d.lengths[seqs].max())
    assert b["input_ids"].shape[1] == longest and b["input_ids"].shape[0] < 4  # short ones share a row
    flat_ids, flat_slot = b["input_ids"].flatten(), b["token_slot"].flatten()
    for k, s in enumerate(seqs):
        tokens = flat_ids[flat_slot == k].tolist()
        assert tokens == d.seq(int(s)).tolist()  # contiguous, complete
        assert int(b["ends"][k]) == int(np.flatnonzero(flat_slot.numpy() == k)[-1])
        pos = b["position_ids"].flatten()[flat_slot == k].tolist()
        assert pos == list(range(len(tokens)))


def test_batches_are_a_pure_function_of_position(tmp_path, tok, enc):
    rows = [{"prompt": f"{Q1} {i}", "chosen": A1, "rejected": A2} for i in range(10)]
    d = read(write_jsonl(tmp_path / "o.jsonl", rows), enc)
    a = PreferenceBatches(d, unit="pairs", seed=3, pad_id=tok.pad_token_id, layout="pack")
    b = PreferenceBatches(d, unit="pairs", seed=3, pad_id=tok.pad_token_id, layout="pack")
    first = [a.index_at(p) for p in range(10)]
    assert sorted(first) == list(range(10)) and first != list(range(10))  # an epoch visits each pair once
    b.batch(0, 7)  # touching other positions first changes nothing
    x, y = a.batch(12, 4), b.batch(12, 4)
    assert all(np.array_equal(x[k], y[k]) for k in ("input_ids", "labels", "token_slot", "margin")) and x["n"] == 4
    a.ref = np.arange(d.n_seqs, dtype=np.float32)
    z = a.batch(12, 4)
    idx = [a.index_at(p) for p in range(12, 16)]
    assert z["ref_logps"].tolist() == [float(s) for s in np.concatenate([d.chosen[idx], d.rejected[idx]])]
