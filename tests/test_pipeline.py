"""Recipe runner: inputs chained between stages, skip when unchanged, re-run on change, --force."""

from __future__ import annotations

import sys
import types

import pytest
import yaml
from pydantic import Field

from lmforge import pipeline
from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.rundir import read_manifest

CALLS: list[str] = []


def _make_stage(name: str, provides: str, needs: str | None):
    mod = types.ModuleType(f"fake_{name}")

    class Config(Schema):
        value: int = Field(1, description="A number written into the artifact.")
        source: str | None = Field(None, description="The upstream artifact folder.")

    def run(cfg, rd, resume=False):
        CALLS.append(f"{name}:resume={resume}")
        rd.artifact.mkdir(parents=True, exist_ok=True)
        upstream = ""
        if cfg.source:
            from lmforge.rundir import resolve_artifact

            upstream = (resolve_artifact(cfg.source) / "out.txt").read_text()
        (rd.artifact / "out.txt").write_text(f"{upstream}{name}{cfg.value};")
        return {"value": cfg.value}

    mod.Config, mod.run, mod.ARTIFACT, mod.PROVIDES = Config, run, "art", (provides,)
    mod.INPUTS = {"source": needs} if needs else {}
    sys.modules[mod.__name__] = mod
    return mod.__name__


@pytest.fixture()
def fake_stages(monkeypatch):
    CALLS.clear()
    monkeypatch.setitem(pipeline.STAGES, "first", _make_stage("first", "a", None))
    monkeypatch.setitem(pipeline.STAGES, "second", _make_stage("second", "b", "a"))
    monkeypatch.setitem(pipeline.STAGES, "raw", _make_stage("raw", "c", None))


def write_recipe(tmp_path, stages):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "out_dir": str(tmp_path / "runs"), "stages": stages}))
    return p


def test_inputs_chain_skip_rerun_and_force(tmp_path, fake_stages):
    r = write_recipe(tmp_path, [{"stage": "first", "value": 1}, {"stage": "second", "value": 2}])
    pipeline.run_recipe(r, echo=lambda *_: None)
    out = tmp_path / "runs" / "t" / "second" / "art" / "out.txt"
    assert out.read_text() == "first1;second2;"  # second read first's artifact
    assert CALLS == ["first:resume=False", "second:resume=False"]

    pipeline.run_recipe(r, echo=lambda *_: None)  # unchanged: both skipped
    assert len(CALLS) == 2

    pipeline.run_recipe(r, ["second.value=5"], echo=lambda *_: None)  # only second changed
    assert CALLS[2:] == ["second:resume=False"] and out.read_text() == "first1;second5;"

    pipeline.run_recipe(r, ["first.value=3", "second.value=5"], echo=lambda *_: None)
    # first changed -> its output id changes -> second's input hash changes -> both re-run
    assert CALLS[3:] == ["first:resume=False", "second:resume=False"]
    assert out.read_text() == "first3;second5;"

    pipeline.run_recipe(r, ["first.value=3", "second.value=5"], force=True, echo=lambda *_: None)
    assert len(CALLS) == 7
    m = read_manifest(tmp_path / "runs" / "t" / "second")
    assert m["status"] == "complete" and m["summary"] == {"value": 5} and m["artifact"] == "art"


def test_interrupted_stage_resumes_on_rerun(tmp_path, fake_stages):
    r = write_recipe(tmp_path, [{"stage": "first"}])
    pipeline.run_recipe(r, echo=lambda *_: None)
    d = tmp_path / "runs" / "t" / "first"
    m = read_manifest(d)
    m["status"] = "running"  # as if killed mid-stage
    (d / "manifest.json").write_text(__import__("json").dumps(m))
    pipeline.run_recipe(r, echo=lambda *_: None)
    assert CALLS == ["first:resume=False", "first:resume=True"]


def test_references_to_stage_artifacts(tmp_path, fake_stages):
    r = write_recipe(tmp_path, [{"stage": "raw", "name": "gen"}, {"stage": "second", "source": "@gen"}])
    pipeline.run_recipe(r, echo=lambda *_: None)
    assert (tmp_path / "runs" / "t" / "second" / "art" / "out.txt").read_text() == "raw1;second1;"
    bad = write_recipe(tmp_path, [{"stage": "second", "source": "@nothing"}])
    with pytest.raises(LmforgeError, match="no earlier stage is named 'nothing'"):
        pipeline.run_recipe(bad, echo=lambda *_: None)


def test_external_input_change_reruns(tmp_path, fake_stages, monkeypatch):
    src = tmp_path / "ext"
    (src / "art").mkdir(parents=True)
    (src / "art" / "out.txt").write_text("ext;")
    r = write_recipe(tmp_path, [{"stage": "second", "source": str(src / "art")}])
    pipeline.run_recipe(r, echo=lambda *_: None)
    pipeline.run_recipe(r, echo=lambda *_: None)
    assert len(CALLS) == 1
    (src / "art" / "out.txt").write_text("changed;")
    pipeline.run_recipe(r, echo=lambda *_: None)
    assert len(CALLS) == 2


def test_duplicate_stage_names_rejected(tmp_path, fake_stages):
    r = write_recipe(tmp_path, [{"stage": "first"}, {"stage": "first"}])
    with pytest.raises(LmforgeError, match="two stages are named 'first'"):
        pipeline.run_recipe(r, echo=lambda *_: None)


# --------------------------------------------------------------------------------------------
# `lmforge plan`: what a run would do, and why, without running or writing anything


def _plan(r, *overrides, force=False):
    from lmforge.dryrun import outlook

    _, planned = pipeline.prepare(r, list(overrides))
    return {o.stage.name: (o.action, o.why, o.inputs) for o in outlook(planned, force=force)}


def test_plan_names_inputs_and_what_a_run_would_do(tmp_path, fake_stages):
    r = write_recipe(tmp_path, [{"stage": "first"}, {"stage": "second"}])
    p = _plan(r)
    assert {k: v[0] for k, v in p.items()} == {"first": "start", "second": "start"}
    run = tmp_path / "runs" / "t"
    assert p["second"][2] == [("source", str(run / "first"), "stage first (newest earlier stage providing 'a')")]
    assert not (tmp_path / "runs").exists() and CALLS == []  # nothing run, nothing written

    pipeline.run_recipe(r, echo=lambda *_: None)
    assert {k: v[0] for k, v in _plan(r).items()} == {"first": "skip", "second": "skip"}
    assert {k: v[0] for k, v in _plan(r, force=True).items()} == {"first": "afresh", "second": "afresh"}

    p = _plan(r, "second.value=5")  # only second's config changed
    assert p["first"][0] == "skip" and p["second"][:2] == ("afresh", "config changed (value)")

    cfg_file = run / "second" / "config.yaml"  # as if written by a version without the field `source`
    saved = cfg_file.read_text()
    cfg_file.write_text(saved.replace("source:", "old_source:"))
    m = read_manifest(run / "second")
    m["hashes"]["config"] = m["input_hash"] = "older"
    (run / "second" / "manifest.json").write_text(__import__("json").dumps(m))
    assert _plan(r)["second"][1] == "config changed (old_source (field removed), source (new field))"
    cfg_file.write_text(saved)

    p = _plan(r, "first.value=3")  # first re-runs, so second gets a new input
    assert p["first"][:2] == ("afresh", "config changed (value)")
    assert p["second"][:2] == ("afresh", "its input comes from stage first, which runs first")

    m = read_manifest(run / "first")
    m["status"] = "running"  # as if killed mid-stage
    (run / "first" / "manifest.json").write_text(__import__("json").dumps(m))
    assert _plan(r)["first"][0] == "resume"
    assert len(CALLS) == 2


def test_plan_names_the_input_file_whose_content_changed(tmp_path, fake_stages):
    src = tmp_path / "ext" / "art"
    src.mkdir(parents=True)
    (src / "out.txt").write_text("ext;")
    r = write_recipe(tmp_path, [{"stage": "second", "source": str(src)}])
    pipeline.run_recipe(r, echo=lambda *_: None)
    assert _plan(r)["second"][2] == [("source", str(src), "file")]
    (src / "out.txt").write_text("changed;")
    assert _plan(r)["second"][:2] == ("afresh", f"input source changed ({src} has another fingerprint)")


def test_plan_command_on_the_quick_recipe_writes_nothing(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "plan", "quick", "--out-dir", str(tmp_path / "runs"),
                        "tokenizer.vocab_size=512"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("would START - no earlier run in this folder" in x for x in lines) == 9
    assert f"    in   tokenizer = {tmp_path / 'runs' / 'quick' / 'tokenizer'}  <- stage tokenizer (newest earlier stage " \
           "providing 'tokenizer')" in lines
    assert not (tmp_path / "runs").exists()
