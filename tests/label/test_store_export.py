"""The store keeps every judgment (across a new connection, two annotators on one item, undo),
serves each annotator their own queue with the overlap share, and the export is what `reward`,
`dpo` (and KTO) and `sft` read, with provenance on every row."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.label.export import export
from lmforge.label.store import Response, Store, in_overlap, token_hash


def make_store(path, n_items=4, k=3, overlap=0.0):
    s = Store(path)
    s.configure(mode="rank", overlap=overlap, overlap_annotators=2)
    for i in range(n_items):
        s.add_item(f"q{i}", [{"role": "user", "content": f"Question {i}?"}],
                   [Response(f"answer {i}.{j}", f"model{j % 2}", {"temperature": 0.7, "seed": j}) for j in range(k)],
                   source=f"prompts.jsonl line {i + 1}")
    return s


def rids(s, item_id):
    return [r["id"] for r in s.item(item_id)["responses"]]


def test_tokens_are_hashed_and_checked(tmp_path):
    s = make_store(tmp_path / "l.sqlite")
    tok = s.add_annotator("ann")
    assert s.annotator(tok).name == "ann" and s.annotator("wrong-token") is None and s.annotator(None) is None
    raw = (tmp_path / "l.sqlite").read_bytes() + (tmp_path / "l.sqlite-wal").read_bytes()
    assert tok.encode() not in raw and token_hash(tok).encode() in raw
    tok2 = s.add_annotator("ann")  # a new token replaces the old one
    assert s.annotator(tok) is None and s.annotator(tok2).name == "ann"
    with pytest.raises(LmforgeError, match="shorter than 16"):
        s.add_annotator("bob", "short")


def test_queue_claims_resume_and_overlap(tmp_path):
    s = make_store(tmp_path / "l.sqlite", n_items=40, overlap=0.25)
    overlapped = {s.item(i)["prompt_id"] for i in range(1, 41) if s.item(i)["target"] == 2}
    assert overlapped == {f"q{i}" for i in range(40) if in_overlap(f"q{i}", 0.25)} and 4 <= len(overlapped) <= 16
    a, b = s.annotator(s.add_annotator("a")), s.annotator(s.add_annotator("b"))
    first = s.next_item(a.id)
    assert s.next_item(a.id) == first  # served again until judged (a reload shows the same item)
    s.judge(a.id, first, verdict="ranked", ranking=rids(s, first))
    seen_a, seen_b = {first}, set()
    for who, seen in ((a, seen_a), (b, seen_b), (a, seen_a), (b, seen_b)) * 30:
        i = s.next_item(who.id)
        if i is not None:
            seen.add(i)
            s.judge(who.id, i, verdict="skip" if i == 3 and who is a else "ranked", ranking=None if i == 3 and who is a else rids(s, i))
    both = {s.item(i)["prompt_id"] for i in seen_a & seen_b}
    assert both == overlapped | {"q2"}  # overlap items go to both; the one `a` skipped went to b too
    assert len(seen_a | seen_b) == 40 and s.is_complete()
    assert s.progress(a.id)["remaining"] == 0 and s.progress(a.id)["done"] == len(seen_a)


def test_judgments_survive_undo_replace_and_reopen(tmp_path):
    path = tmp_path / "l.sqlite"
    s = make_store(path)
    a, b = s.annotator(s.add_annotator("a")), s.annotator(s.add_annotator("b"))
    r = rids(s, 1)
    s.judge(a.id, 1, verdict="ranked", ranking=[r[2], r[0], r[1]], seconds=3.5)
    s.judge(b.id, 1, verdict="tie", note="same")
    s.judge(a.id, 2, verdict="ranked", ranking=rids(s, 2))
    assert s.undo(a.id) == 2 and s.next_item(a.id) == 2  # the undone item is served again
    s.judge(a.id, 1, verdict="ranked", ranking=r, flags={str(r[1]): ["unsafe"]}, ideal="The answer.")  # replaces
    s.close()
    s = Store(path)  # a fresh connection sees every committed judgment
    live = s.judgments()
    assert [(j["annotator"], j["item_id"], j["verdict"]) for j in live] == [("b", 1, "tie"), ("a", 1, "ranked")]
    assert live[1]["flags"] == {r[1]: ["unsafe"]} and live[1]["ideal"] == "The answer."
    assert [j["status"] for j in s.judgments(live=False)] == ["replaced", "live", "undone", "live"]


def test_bad_judgments_are_one_sentence(tmp_path):
    s = make_store(tmp_path / "l.sqlite")
    a = s.annotator(s.add_annotator("a"))
    r = rids(s, 1)
    cases = [(dict(verdict="ranked", ranking=r[:2]), "must list each"),
             (dict(verdict="maybe"), "not one of"),
             (dict(verdict="tie", ranking=r), "takes no ranking"),
             (dict(verdict="tie", flags={"999": ["unsafe"]}), "not one of the item's responses"),
             (dict(verdict="tie", flags={str(r[0]): ["rude"]}), "must be a list of unsafe, wrong"),
             (dict(verdict="tie", seconds=-1), "seconds")]
    for kw, msg in cases:
        with pytest.raises(LmforgeError, match=msg):
            s.judge(a.id, 1, **kw)
    with pytest.raises(KeyError):
        s.judge(a.id, 999, verdict="tie")
    assert s.judgments() == []


def test_export_formats_read_by_the_training_stages(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from lmforge.data.preference import read_preferences
    from lmforge.data.sft import ChatEncoder

    s = make_store(tmp_path / "l.sqlite", n_items=4, k=3)
    a, b = s.annotator(s.add_annotator("a")), s.annotator(s.add_annotator("b"))
    r1, r2, r3, r4 = (rids(s, i) for i in (1, 2, 3, 4))
    s.judge(a.id, 1, verdict="ranked", ranking=[r1[1], r1[0], r1[2]], seconds=2.0)  # 3 pairs
    s.judge(b.id, 1, verdict="ranked", ranking=[r1[0], r1[1], r1[2]], seconds=4.0)  # 3 more, b's name
    s.judge(a.id, 2, verdict="tie", flags={str(r2[0]): ["wrong"]})  # no pair; one bad thumb
    s.judge(a.id, 3, verdict="all_bad", ideal="  A better answer.  ")  # three bad thumbs, one SFT row
    s.judge(a.id, 4, verdict="skip")
    st = export(s, tmp_path / "out")
    pref = [json.loads(x) for x in (tmp_path / "out/preference.jsonl").read_text().splitlines()]
    kto = [json.loads(x) for x in (tmp_path / "out/kto.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp_path / "out/sft.jsonl").read_text().splitlines()]
    items = [json.loads(x) for x in (tmp_path / "out/items.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"], p["provenance"]["annotator"]) for p in pref] == [
        ("answer 0.1", "answer 0.0", "a"), ("answer 0.1", "answer 0.2", "a"), ("answer 0.0", "answer 0.2", "a"),
        ("answer 0.0", "answer 0.1", "b"), ("answer 0.0", "answer 0.2", "b"), ("answer 0.1", "answer 0.2", "b")]
    p0 = pref[0]["provenance"]
    assert p0["prompt_id"] == "q0" and p0["chosen"]["model"] == "model1" and p0["chosen"]["sampling"]["seed"] == 1
    assert [(k["completion"], k["label"]) for k in kto] == [
        ("answer 0.1", "good"), ("answer 0.2", "bad"), ("answer 0.0", "good"), ("answer 0.2", "bad"),
        ("answer 1.0", "bad"), ("answer 2.0", "bad"), ("answer 2.1", "bad"), ("answer 2.2", "bad")]
    assert kto[4]["provenance"]["flags"] == ["wrong"]
    assert sft == [{"messages": [{"role": "user", "content": "Question 2?"},
                                 {"role": "assistant", "content": "A better answer."}],
                    "provenance": {"prompt_id": "q2", "annotator": "a", "judgment_id": 4, "model": "human:a"}}]
    assert [i["verdict"] for i in items] == ["ranked", "ranked", "tie", "all_bad", "skip"]
    assert items[0]["seconds"] == 2.0 and items[0]["responses"][1]["rank"] == 1
    assert st["rows"] == {"preference": 6, "kto": 8, "sft": 1, "items": 5} and st["judgments"] == 5
    assert st["agreement"]["pairs"][0]["percent_agreement"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert st["seconds_per_judgment"]["mean"] == 1.2 and st["flags"] == {"wrong": 1}
    # The training stages' own reader takes the files as they are.
    enc = ChatEncoder(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    pairs = read_preferences(str(tmp_path / "out/preference.jsonl"), enc, unit="pairs", max_length=128)["train"]
    assert len(pairs.chosen) == 6
    thumbs = read_preferences(str(tmp_path / "out/kto.jsonl"), enc, unit="items", max_length=128)["train"]
    assert thumbs.desirable.tolist() == [True, False, True, False, False, False, False, False]


def test_feedback_from_use_becomes_kto_and_sft(tmp_path):
    s = make_store(tmp_path / "l.sqlite", n_items=1)
    turns = [{"role": "user", "content": "Capital of France?"}]
    s.add_feedback("serve", turns, Response("Lyon.", "runs/x/sft", {"temperature": 0.7}), good=False,
                   correction="Paris.")
    s.add_feedback("chat", turns, Response("Paris.", "runs/x/sft", {"temperature": 0.2}), good=True)
    a = s.annotator(s.add_annotator("ann"))
    assert s.progress(a.id)["total"] == 1  # feedback items are never served to annotators
    assert s.item(s.next_item(a.id))["prompt_id"] == "q0"
    with pytest.raises(LmforgeError, match="exactly one response"):
        s.judge(a.id, 1, verdict="good")
    st = export(s, tmp_path / "out")
    kto = [json.loads(x) for x in (tmp_path / "out/kto.jsonl").read_text().splitlines()]
    sft = [json.loads(x) for x in (tmp_path / "out/sft.jsonl").read_text().splitlines()]
    assert [(k["completion"], k["label"], k["provenance"]["annotator"]) for k in kto] == [
        ("Lyon.", "bad", "feedback:serve"), ("Paris.", "good", "feedback:chat")]
    assert kto[0]["provenance"]["model"] == "runs/x/sft" and kto[0]["provenance"]["sampling"] == {"temperature": 0.7}
    assert sft[0]["messages"] == [*turns, {"role": "assistant", "content": "Paris."}]
    assert st["feedback_from_use"] == {"good": 1, "bad": 1, "corrections": 1}
