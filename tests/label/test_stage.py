"""The `label` stage and command: responses generated through lmforge.generation by several
models taking turns (model and sampling parameters kept), items never generated twice, bad rows
named in one sentence, and `wait: none` exporting what was labelled so far."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import LmforgeError
from lmforge.label.stage import STORE
from lmforge.label.store import Store
from lmforge.pipeline import run_single

from ..conftest import build_tiny_model
from ..train.conftest import run_cli, write_yaml


def test_generates_with_provenance_once(tmp_path, tiny_model_dir):
    second = build_tiny_model(tmp_path / "second", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Hello there {i}!"}) + "\n" for i in range(3)))
    cfg = {"prompts": str(prompts), "model": [str(tiny_model_dir), str(second)], "k": 3, "wait": "none",
           "sampling": {"max_new_tokens": 12, "temperature": 1.0, "seed": 5}}
    path = write_yaml(tmp_path / "label.yaml", cfg)
    m = run_single("label", str(path), [], out=str(tmp_path / "lab"), force=True, resume=False, echo=lambda *a: None)
    s = m["summary"]
    assert s["prompts"] == 3 and s["items_added"] + s["items_without_two_responses"] == 3 and s["items_added"] >= 1
    st = Store(tmp_path / "lab" / STORE)
    item = st.item(1)
    models = [r["model"] for r in item["responses"]]
    assert sorted(set(models)) == sorted({str(tiny_model_dir), str(second)})  # two from the first, one from the second
    r0 = item["responses"][0]
    assert r0["sampling"]["temperature"] == 1.0 and r0["sampling"]["seed"] == 5 and r0["sampling"]["n"] in (1, 2)
    assert "seed_stream" in r0["sampling"] and r0["finish_reason"] in ("stop", "length")
    before = [st.item(i)["responses"] for i in range(1, st.n_items() + 1)]
    st.close()
    m = run_single("label", str(path), [], out=str(tmp_path / "lab"), force=True, resume=False, echo=lambda *a: None)
    assert m["summary"]["items_added"] == 0  # already stored: not generated again
    st = Store(tmp_path / "lab" / STORE)
    assert [st.item(i)["responses"] for i in range(1, st.n_items() + 1)] == before
    assert (tmp_path / "lab/data/preference.jsonl").read_text() == ""


def test_ready_responses_bad_rows_and_export_so_far(tmp_path):
    resp = tmp_path / "r.jsonl"
    resp.write_text(json.dumps({"prompt": "Hi?", "responses": ["a", "b"]}) + "\n" + json.dumps({"prompt": "Yo?", "responses": ["only"]}) + "\n")
    cfg = {"responses": str(resp), "k": 2, "wait": "none"}
    with pytest.raises(LmforgeError, match=r"r.jsonl line 2 field 'responses' must list at least two"):
        run_single("label", str(write_yaml(tmp_path / "c.yaml", cfg)), [], out=str(tmp_path / "lab"), force=True,
                   resume=False, echo=lambda *a: None)
    r = run_cli("label", "--responses", str(resp), "--out", str(tmp_path / "lab"), "--no-wait")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "line 2" in r.stderr and "Traceback" not in r.stderr
    cfg["on_bad_rows"] = "skip"
    m = run_single("label", str(write_yaml(tmp_path / "c.yaml", cfg)), [], out=str(tmp_path / "lab"), force=True,
                   resume=False, echo=lambda *a: None)
    assert m["summary"]["skipped_response_rows"] == {"bad responses": 1} and m["summary"]["items"] == 1
    st = Store(tmp_path / "lab" / STORE)
    a = st.annotator(st.add_annotator("ann"))
    st.judge(a.id, 1, verdict="ranked", ranking=[r["id"] for r in st.item(1)["responses"]][::-1])
    st.close()
    m = run_single("label", str(write_yaml(tmp_path / "c.yaml", cfg)), [], out=str(tmp_path / "lab"), force=True,
                   resume=False, echo=lambda *a: None)
    rows = [json.loads(x) for x in (tmp_path / "lab/data/preference.jsonl").read_text().splitlines()]
    assert [(x["chosen"], x["rejected"]) for x in rows] == [("b", "a")] and m["summary"]["stopped"] == "wait: none"
    r = run_cli("label", "export", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "holds no labels.sqlite" in r.stderr


def test_pairwise_needs_two(tmp_path):
    with pytest.raises(LmforgeError, match="set k: 2"):
        run_single("label", None, ["mode=pairwise", "k=3", "responses=x.jsonl"], out=str(tmp_path / "l"), force=True,
                   resume=False, echo=lambda *a: None)


def test_serves_until_every_item_is_judged(tmp_path):
    import subprocess
    import sys

    import httpx

    resp = tmp_path / "r.jsonl"
    resp.write_text("".join(json.dumps({"prompt": f"Q{i}?", "responses": [f"a{i}", f"b{i}"]}) + "\n" for i in range(3)))
    p = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "label", "--responses", str(resp), "--out",
                          str(tmp_path / "lab"), "--add-annotator", "ann", "--port", "0", "--overlap", "0",
                          "--max-wait", "300"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        link = next(line for line in p.stdout if line.startswith("label: annotator ann: ")).split()[-1]
        base, token = link.split("?token=")
        c = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        for _ in range(3):
            item = c.get("/api/next").json()["item"]
            ids = [r["id"] for r in item["responses"]]
            assert c.post("/api/judgments", json={"item_id": item["id"], "verdict": "ranked", "ranking": ids}).status_code == 200
        out = p.communicate(timeout=120)[0]  # the last judgment completes the work: the server stops by itself
    finally:
        p.kill()
    assert p.returncode == 0 and "label: every item judged; 3 judgments" in out, out
    assert len((tmp_path / "lab/data/preference.jsonl").read_text().splitlines()) == 3
