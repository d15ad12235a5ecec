"""Retrieval in generate, chat and serve: the exact prompt the model gets, and the passages reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.chat import encode, render
from lmforge.data.tokenizer import load_tokenizer
from lmforge.generation import SamplingParams, load_model_for_inference
from lmforge.retrieval.augment import RetrievalConfig, open_retriever
from lmforge.retrieval.documents import read_documents
from lmforge.retrieval.index import open_index, sync
from lmforge.retrieval.prompt import with_context
from tests.conftest import build_tiny_model

QUESTION = "What is the capital of Belor?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("wide"), context=512)  # room for passages


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, model_dir) -> Path:
    root = tmp_path_factory.mktemp("rag")
    (root / "docs").mkdir()
    (root / "docs" / "belor.md").write_text("Belor is a hill country. The capital of Belor is Mosk.")
    (root / "docs" / "corin.md").write_text("Corin lies by the sea. Its capital is Tavi.")
    docs, _ = read_documents([str(root / "docs")])
    sync(root / "ix", docs, load_tokenizer(model_dir), str(model_dir), embedder=None, chunk_tokens=64, overlap=8,
         log=lambda _m: None)
    return root / "ix"


def _expected_messages(index_dir: Path, k: int) -> list[dict]:
    return with_context([{"role": "user", "content": QUESTION}], open_index(index_dir).search(QUESTION, k))


def test_generate_with_index_prompts_with_the_context_section(tmp_path, model_dir, index_dir):
    from lmforge.generation import generate_file

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION, "id": "q1"}) + "\n")
    out = tmp_path / "out.jsonl"
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    generate_file(model_dir, prompts, out, params, chat=True, retrieval=RetrievalConfig(index=str(index_dir), k=2))
    line = json.loads(out.read_text())
    tok = load_tokenizer(model_dir)
    expected = encode(tok, _expected_messages(index_dir, 2), add_generation_prompt=True)
    assert line["prompt_tokens"] == len(expected)
    got = line["retrieval"]
    assert [p["id"] for p in got["passages"]] == [1, 2] and "Mosk" in got["passages"][0]["text"]
    assert got["passages"][0]["source"].endswith("belor.md line 1") and got["passages_dropped"] == 0


def test_chat_session_puts_passages_in_the_newest_turn_only(model_dir, index_dir):
    from lmforge.chat import ChatSession

    model, tok = load_model_for_inference(model_dir, device="cpu")
    retriever = open_retriever(RetrievalConfig(index=str(index_dir), k=1), tok, str(model_dir))
    session = ChatSession(model, tok, SamplingParams(temperature=0, max_new_tokens=3), retriever=retriever)
    ids, _ = session.fit(QUESTION)
    assert ids == encode(tok, _expected_messages(index_dir, 1), add_generation_prompt=True)
    written: list[str] = []
    session.reply(QUESTION, written.append)
    assert session.history[0] == {"role": "user", "content": QUESTION}  # history keeps the plain question
    assert any("belor.md line 1" in w for w in written)


def test_index_built_with_another_tokenizer_is_refused_by_generate(tmp_path, tiny_model_dir, index_dir):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="was built with the tokenizer of"):
        open_retriever(RetrievalConfig(index=str(index_dir)), _other_tokenizer(tiny_model_dir), "other")


def _other_tokenizer(path):
    tok = load_tokenizer(path)
    tok.add_tokens(["zebra"])
    return tok


@pytest.fixture(scope="module")
def client_for(model_dir):
    from fastapi.testclient import TestClient

    from lmforge.serve import ServeConfig, create_app

    model, tok = load_model_for_inference(model_dir, device="cpu")

    def make(indexes: dict) -> TestClient:
        cfg = ServeConfig(model=str(model_dir), served_name="tiny", allowed_hosts=["*"], indexes=indexes,
                          retrieval_k=2)
        return TestClient(create_app(cfg, model, tok))

    return make


def test_server_answers_with_passages_and_names_a_missing_index(client_for, model_dir, index_dir):
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3}
    with client_for({"docs": str(index_dir)}) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ret = r.json()["retrieval"]
        assert ret["index"] == "docs" and [p["id"] for p in ret["passages"]] == [1, 2]
        expected = encode(load_tokenizer(model_dir), _expected_messages(index_dir, 2), add_generation_prompt=True)
        assert r.json()["usage"]["prompt_tokens"] == len(expected)
        r = c.post("/v1/chat/completions", json={**body, "index": "nope"})
        assert r.status_code == 404
        err = r.json()["error"]
        assert "'nope'" in err["message"] and "'docs'" in err["message"] and err["param"] == "index"
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            first = json.loads(next(s.iter_lines()).removeprefix("data: "))
        assert first["retrieval"]["passages"][0]["source"].endswith("belor.md line 1")
    with client_for({}) as c:
        r = c.post("/v1/chat/completions", json={**body, "index": "docs"})
        assert r.status_code == 404 and "no" in r.json()["error"]["message"]
        assert "retrieval" not in c.post("/v1/chat/completions", json=body).json()


def test_rendered_prompt_is_the_documented_one(model_dir, index_dir):
    tok = load_tokenizer(model_dir)
    text = render(tok, _expected_messages(index_dir, 1), add_generation_prompt=True)
    assert text.startswith("<|user|>Answer the question from the passages below.")
    assert "Passages:\n[1] Belor is a hill country. The capital of Belor is Mosk.\n\nQuestion: " + QUESTION in text


def test_eval_stage_with_retrieval_answers_the_augmented_prompt(tmp_path, model_dir, index_dir):
    from lmforge.generation import generate
    from lmforge.pipeline import run_single

    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"prompt": QUESTION, "answer": "Mosk"}) + "\n")
    task = {"name": "facts", "file": str(rows), "scorers": ["fact_match"], "max_new_tokens": 5}
    overrides = [f"models={{rag: {model_dir}}}", f"tasks=[{json.dumps(task)}]",
                 f"retrieval={json.dumps({'index': str(index_dir), 'k': 2})}"]
    run_single("eval", None, overrides, out=str(tmp_path / "ev"), force=False, resume=False)
    answer = json.loads((tmp_path / "ev" / "eval" / "answers.jsonl").read_text())
    model, tok = load_model_for_inference(model_dir, device="cpu")
    ids = encode(tok, _expected_messages(index_dir, 2), add_generation_prompt=True)
    plain = encode(tok, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    with_passages, without = (generate(model, tok, [x], params)[0].text for x in (ids, plain))
    assert with_passages != without  # the check below can tell the two prompts apart
    assert answer["output"] == with_passages
