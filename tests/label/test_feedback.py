"""Feedback from use: `chat`'s /good, /bad and /fix write ratings into a label store, which the
export turns into KTO thumbs and SFT rows with the model and sampling parameters."""

from __future__ import annotations

import io
import json

from lmforge.chat import ChatSession, repl
from lmforge.generation import SamplingParams, load_model_for_inference
from lmforge.label.export import export
from lmforge.label.stage import open_store


def script(lines: list[str]):
    it = iter([*lines, "/quit"])
    return lambda _prompt: next(it)


def test_chat_good_bad_fix(tmp_path, tiny_model_dir):
    model, tok = load_model_for_inference(tiny_model_dir, device="cpu")
    session = ChatSession(model, tok, SamplingParams(temperature=0, max_new_tokens=8), system="Be brief.")
    out = io.StringIO()
    repl(session, read=script(["/good", "Hello there!", "/good"]), out=out)
    assert "no feedback store" in out.getvalue()  # without --feedback, ratings are not silently dropped
    session.feedback, session.model_name = open_store(tmp_path / "labels"), "tiny"
    session.last = None
    repl(session, read=script(["/good", "Hello there!", "/good", "What is two plus two?", "/fix Four.", "/bad", "/fix"]),
         out=out)
    text = out.getvalue()
    assert "nothing to rate yet" in text and text.count("(saved: ") == 3 and "write the better reply" in text
    st = export(session.feedback, tmp_path / "out")
    kto = [json.loads(x) for x in (tmp_path / "out/kto.jsonl").read_text().splitlines()]
    assert [(k["label"], k["prompt"][-1]["content"]) for k in kto] == [
        ("good", "Hello there!"), ("bad", "What is two plus two?"), ("bad", "What is two plus two?")]
    assert kto[0]["prompt"][0] == {"role": "system", "content": "Be brief."} and kto[0]["provenance"]["model"] == "tiny"
    assert kto[0]["provenance"]["sampling"]["temperature"] == 0 and kto[0]["provenance"]["annotator"] == "feedback:chat"
    sft = [json.loads(x) for x in (tmp_path / "out/sft.jsonl").read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in sft] == ["Four."]
    assert st["feedback_from_use"] == {"good": 1, "bad": 2, "corrections": 1}
