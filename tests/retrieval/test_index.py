"""The index: chunking, incremental update equal to a rebuild, identity checks, bad input, quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.retrieval.chunking import chunk_spans
from lmforge.retrieval.dense import load_embedder
from lmforge.retrieval.documents import read_documents
from lmforge.retrieval.index import open_index, sync
from lmforge.retrieval.quality import read_questions, recall_mrr
from tests.conftest import build_tiny_model

DOCS = {
    "arvia.md": "# Arvia\n\nThe capital of Arvia is Lumen. Arvia trades in silver coins and speaks Arvish. " * 3,
    "belor.md": "Belor is a hill country. The capital of Belor is Mosk, a town of ships and rivers.",
    "corin.md": "Corin lies by the sea. Its capital is Tavi and its people count in shells.",
}


@pytest.fixture()
def docs_dir(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("other"), seed=1)


def _build(folder: Path, paths: list[Path], model_dir: Path, **kw):
    docs, _ = read_documents([str(p) for p in paths])
    return sync(folder, docs, load_tokenizer(model_dir), str(model_dir), embedder=kw.pop("embedder", None),
                chunk_tokens=24, overlap=6, log=lambda _m: None, **kw)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_chunks_are_token_windows_with_overlap(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    text = DOCS["arvia.md"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = chunk_spans(text, tok, chunk_tokens=24, overlap=6)
    # windows start at 0, 18, 36, ...; the last one ends at the last token
    assert [s.n_tokens for s in spans[:-1]] == [24] * (len(spans) - 1)
    assert len(spans) == 1 + -(-(len(ids) - 24) // 18)
    assert spans[0].start == 0 and spans[-1].end == len(text)
    second = tok(text[spans[1].start:spans[1].end], add_special_tokens=False)["input_ids"]
    assert second == ids[18:42]  # the chunk's text is exactly its tokens
    with pytest.raises(LmforgeError, match="overlap 24 must be"):
        chunk_spans(text, tok, chunk_tokens=24, overlap=24)


def test_update_equals_rebuild_and_embeds_only_new_documents(tmp_path, docs_dir, tiny_model_dir):
    emb = load_embedder(tiny_model_dir)
    a, b, c = (docs_dir / n for n in DOCS)
    first = _build(tmp_path / "inc", [a, b], tiny_model_dir, embedder=emb)
    assert (first.added, first.chunks_embedded) == (2, first.chunks)
    grown = _build(tmp_path / "inc", [a, b, c], tiny_model_dir, embedder=emb)
    n_c = len(chunk_spans(DOCS["corin.md"], load_tokenizer(tiny_model_dir), chunk_tokens=24, overlap=6))
    assert (grown.added, grown.unchanged, grown.chunks_embedded) == (1, 2, n_c)
    _build(tmp_path / "full", [a, b, c], tiny_model_dir, embedder=emb)
    assert _files(tmp_path / "inc") == _files(tmp_path / "full")

    # a changed and a removed document: still identical to a rebuild of what is left
    b.write_text("Belor moved its capital to Ostra, a port of glass.")
    changed = _build(tmp_path / "inc", [b, c], tiny_model_dir, embedder=emb)
    assert (changed.changed, changed.removed, changed.unchanged) == (1, 1, 1)
    _build(tmp_path / "full2", [b, c], tiny_model_dir, embedder=emb)
    assert _files(tmp_path / "inc") == _files(tmp_path / "full2")
    meta = json.loads((tmp_path / "inc" / "index.json").read_text())
    assert [d["key"] for d in meta["documents"]] == [f"{b} line 1", f"{c} line 1"]
    assert len(meta["documents"][0]["sha256"]) == 64


def test_search_bm25_dense_and_hybrid(tmp_path, docs_dir, tiny_model_dir):
    _build(tmp_path / "ix", sorted(docs_dir.iterdir()), tiny_model_dir, embedder=load_embedder(tiny_model_dir))
    ix = open_index(tmp_path / "ix")
    top = ix.search("Where is the capital Mosk?", 2, mode="bm25")
    assert top[0].doc.endswith("belor.md line 1") and "Mosk" in top[0].text
    dense = ix.search("Where is the capital Mosk?", 3, mode="dense")
    assert len(dense) == 3 and all(-1.0001 <= p.score <= 1.0001 for p in dense)
    hybrid = ix.search("Where is the capital Mosk?", 3, mode="hybrid")
    assert hybrid[0].chunk_id in {p.chunk_id for p in top + dense}
    assert ix.search("Mosk", 3) == ix.search("Mosk", 3, mode="hybrid")  # auto = hybrid with vectors


def test_other_tokenizer_or_embedding_model_is_refused(tmp_path, docs_dir, tiny_model_dir, other_model):
    _build(tmp_path / "ix", sorted(docs_dir.iterdir()), tiny_model_dir, embedder=load_embedder(tiny_model_dir))
    tok = load_tokenizer(tiny_model_dir)
    open_index(tmp_path / "ix", tokenizer=tok, embedding_model=tiny_model_dir)  # the same ones: fine
    tok.add_tokens(["zebra"])
    with pytest.raises(LmforgeError, match="was built with the tokenizer of .* uses another tokenizer"):
        open_index(tmp_path / "ix", tokenizer=tok, tokenizer_source="x")
    with pytest.raises(LmforgeError, match="was built with the embedding model .* not "):
        open_index(tmp_path / "ix", embedding_model=other_model)
    bm25_only = tmp_path / "bm25"
    _build(bm25_only, sorted(docs_dir.iterdir()), tiny_model_dir)
    with pytest.raises(LmforgeError, match="built without an embedding model"):
        open_index(bm25_only, embedding_model=tiny_model_dir)
    with pytest.raises(LmforgeError, match="has no dense vectors"):
        open_index(bm25_only).search("Mosk", 2, mode="dense")


def test_rebuilds_when_built_with_another_embedding_model(tmp_path, docs_dir, tiny_model_dir, other_model):
    paths = sorted(docs_dir.iterdir())
    _build(tmp_path / "ix", paths, tiny_model_dir, embedder=load_embedder(tiny_model_dir))
    r = _build(tmp_path / "ix", paths, tiny_model_dir, embedder=load_embedder(other_model))
    assert r.rebuilt_because and "embedding" in r.rebuilt_because and r.chunks_embedded == r.chunks


def test_missing_or_empty_document_folder_is_one_sentence(tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        read_documents([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="holds no readable files"):
        read_documents([str(tmp_path / "empty")])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.md").write_text("  \n")
    with pytest.raises(LmforgeError, match="hold no text to index"):
        read_documents([str(tmp_path / "blank")])


def test_malformed_question_rows_are_named_or_counted(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"question": "Capital of Belor?", "answer": "Mosk", "evidence": "capital of Belor is Mosk"}\n'
                 '{"answer": "x"}\n{"question": "Who?", "answer": 3}\n{"question": "Unknown land?"}\n')
    with pytest.raises(LmforgeError, match=r"q.jsonl line 2: field 'question' must be non-empty text"):
        read_questions(str(p))
    from lmforge.data.formats import ReadStats

    stats = ReadStats()
    qs = read_questions(str(p), on_bad_rows="skip", stats=stats)
    assert [q.answer for q in qs] == ["Mosk", None]
    assert stats.skipped == {"malformed question": 2}


def test_recall_and_mrr_by_hand():
    # first relevant ranks 1, 3, none, 2
    got = recall_mrr([1, 3, None, 2], [1, 2, 4])
    assert got == {"recall@1": 0.25, "recall@2": 0.5, "recall@4": 0.75, "mrr": pytest.approx((1 + 1 / 3 + 1 / 2) / 4),
                   "n": 4}


def test_cli_index_builds_updates_and_measures_quality(tmp_path, docs_dir, tiny_model_dir):
    from lmforge.retrieval.stage import cli_index

    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "What is the capital of Belor?", "answer": "Mosk", "evidence": "capital of Belor is Mosk"}\n'
                 '{"question": "Where do people count in shells?", "answer": "Corin", "source": "'
                 + str(docs_dir / "corin.md") + '"}\n{"question": "Capital of Zand?"}\n')
    m = cli_index([str(docs_dir)], out=str(tmp_path / "ix"), tokenizer=str(tiny_model_dir), embedding_model=None,
                  questions=str(q), chunk_tokens=64, overlap=16)
    s = m["summary"]
    assert (s["added"], s["documents"], s["dense"]) == (3, 3, False)
    assert s["quality"]["recall@1"] == 1.0 and s["quality"]["without_gold"] == 1
    (docs_dir / "dorn.md").write_text("Dorn is cold. The capital of Dorn is Pell.")
    m = cli_index([str(docs_dir)], out=str(tmp_path / "ix"), tokenizer=str(tiny_model_dir), embedding_model=None,
                  questions=None, chunk_tokens=64, overlap=16)
    assert (m["summary"]["added"], m["summary"]["unchanged"]) == (1, 3)
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["status"] == "complete"


def test_sentence_transformers_folder_embeds_as_sentence_transformers_does(tmp_path, docs_dir, tiny_model_dir):
    import numpy as np
    from sentence_transformers import SentenceTransformer, models

    tr = models.Transformer(str(tiny_model_dir))
    SentenceTransformer(modules=[tr, models.Pooling(tr.get_word_embedding_dimension())], device="cpu").save(
        str(tmp_path / "st"))
    emb = load_embedder(tmp_path / "st")
    texts = ["The capital of Belor is Mosk.", "Corin lies by the sea."]
    ref = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts)
    assert emb.kind == "sentence-transformers"
    np.testing.assert_allclose(emb.embed(texts), ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    _build(tmp_path / "ix", sorted(docs_dir.iterdir()), tiny_model_dir, embedder=emb)
    top = open_index(tmp_path / "ix").search("Mosk", 1, mode="dense")[0]  # the cosine of the two embeddings
    assert top.score == pytest.approx(float(emb.embed(["Mosk"])[0] @ emb.embed([top.text])[0]), abs=1e-5)
    # the same weights read as a causal LM are another embedding model: refused
    with pytest.raises(LmforgeError, match="was built with the embedding model"):
        open_index(tmp_path / "ix", embedding_model=tiny_model_dir)


def test_cli_index_skips_unchanged_documents_and_keeps_the_index_on_a_fresh_start(tmp_path, docs_dir, tiny_model_dir):
    from lmforge.retrieval.stage import cli_index

    kw = dict(out=str(tmp_path / "ix"), tokenizer=str(tiny_model_dir), embedding_model=None, questions=None,
              chunk_tokens=64, overlap=16)
    first = cli_index([str(docs_dir)], **kw)
    assert cli_index([str(docs_dir)], **kw)["output_id"] == first["output_id"]  # nothing changed: skipped
    (docs_dir / "belor.md").write_text("Belor moved its capital to Ostra.")
    s = cli_index([str(docs_dir)], **kw)["summary"]
    assert (s["changed"], s["unchanged"], s["chunks_embedded"]) == (1, 2, 0)
