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


def test_serve_feedback_endpoint(tmp_path, tiny_model_dir):
    import httpx

    from ..test_serve import in_process_server

    model, tok = load_model_for_inference(tiny_model_dir, device="cpu")
    msgs = [{"role": "user", "content": "Hello there!"}]
    with in_process_server(model, tok, feedback=str(tmp_path / "labels")) as base:
        c = httpx.Client(base_url=base, timeout=60)
        r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0,
                                                  "n": 2, "seed": 1}).json()
        text1 = r["choices"][1]["message"]["content"]
        assert c.post("/v1/feedback", json={"id": r["id"], "index": 1, "rating": "good"}).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 8,
                                                           "temperature": 0, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        sid = chunks[0]["id"]
        streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
        r2 = c.post("/v1/feedback", json={"id": sid, "correction": "Hi! How can I help?"})
        assert r2.status_code == 200 and r2.json()["object"] == "feedback"
        for body, status, word in (({"id": "chatcmpl-nope", "rating": "good"}, 404, "No recent chat completion"),
                                   ({"id": r["id"], "index": 2, "rating": "good"}, 404, "choice 2"),
                                   ({"id": r["id"], "rating": "meh"}, 400, "'good' or 'bad'"),
                                   ({"id": r["id"]}, 400, "needs `rating`"),
                                   ({"id": r["id"], "rating": "good", "extra": 1}, 400, "Unknown feedback field")):
            e = c.post("/v1/feedback", json=body)
            assert e.status_code == status and word in e.json()["error"]["message"], (body, e.text)
    st = export(open_store(tmp_path / "labels"), tmp_path / "out")
    kto = [json.loads(x) for x in (tmp_path / "out/kto.jsonl").read_text().splitlines()]
    assert [(k["completion"], k["label"], k["prompt"]) for k in kto] == [(text1.strip(), "good", msgs),
                                                                          (streamed.strip(), "bad", msgs)]
    assert kto[0]["provenance"]["sampling"]["seed"] == 1 and kto[0]["provenance"]["annotator"] == "feedback:serve"
    sft = [json.loads(x) for x in (tmp_path / "out/sft.jsonl").read_text().splitlines()]
    assert sft[0]["messages"] == [*msgs, {"role": "assistant", "content": "Hi! How can I help?"}]
    assert st["feedback_from_use"] == {"good": 1, "bad": 1, "corrections": 1}
