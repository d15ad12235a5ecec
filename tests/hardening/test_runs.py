"""Issue 13 items 11, 12 and 14, and the umask: run folders are locked, names stay inside the run
folder, a single-stage command never deletes checkpoints silently, artifacts keep the umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import types

import pytest
import yaml
from pydantic import Field

from lmforge import pipeline
from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.rundir import RunDir, atomic_write_json, keyed_cache, read_manifest, staged_dir

RUNS: list[bool] = []


@pytest.fixture()
def toy(monkeypatch):
    """A stage `toy` that writes a checkpoint, then fails if asked to (an interrupted run)."""
    RUNS.clear()
    mod = types.ModuleType("toy_stage")

    class Config(Schema):
        fail: bool = Field(False, description="Stop with an error after writing a checkpoint.")
        value: int = Field(1, description="Written into the artifact.")

    def run(cfg, rd, resume=False):
        RUNS.append(resume)
        (rd.checkpoints / "step-000001").mkdir(parents=True, exist_ok=True)
        if cfg.fail:
            raise RuntimeError("interrupted")
        with staged_dir(rd.artifact) as tmp:
            (tmp / "out.txt").write_text(str(cfg.value))
        return {}

    mod.Config, mod.run, mod.ARTIFACT, mod.PROVIDES, mod.INPUTS = Config, run, "art", ("toy",), {}
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(pipeline.STAGES, "toy", mod.__name__)


def recipe(tmp_path, name="t", stages=({"stage": "toy"},)):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": name, "out_dir": str(tmp_path / "runs"), "stages": list(stages)}))
    return p


def hold_lock(folder):
    """Another process holding `folder`'s lock until it is killed."""
    code = ("import sys, time; from lmforge.rundir import exclusive\n"
            "with exclusive(sys.argv[1], what='x'):\n    print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


# --------------------------------------------------------------------------------------------
# 11. one process per run folder and per stage folder


def test_a_second_recipe_run_on_a_locked_run_folder_is_refused_naming_the_holder(tmp_path, toy):
    holder = hold_lock(tmp_path / "runs" / "t")
    try:
        with pytest.raises(LmforgeError, match=rf"Run folder .*runs/t is in use by another lmforge process "
                                               rf"\(PID {holder.pid}\)"):
            pipeline.run_recipe(recipe(tmp_path), echo=lambda *_: None)
        assert RUNS == [] and not (tmp_path / "runs" / "t" / "toy").exists()
    finally:
        holder.kill()
        holder.wait()
    pipeline.run_recipe(recipe(tmp_path), echo=lambda *_: None)  # a killed holder leaves no stale lock
    assert RUNS == [False]


def test_a_stage_folder_is_locked_for_single_stage_commands(tmp_path, toy):
    out = tmp_path / "runs" / "t" / "one"
    holder = hold_lock(out)
    try:
        with pytest.raises(LmforgeError, match=rf"Stage folder {out} is in use .*\(PID {holder.pid}\)"):
            pipeline.run_single("toy", None, [], out=str(out), force=False, resume=False, echo=lambda *_: None)
        # ... and a recipe run whose stage writes that folder is refused too
        with pytest.raises(LmforgeError, match=rf"Stage folder {out} is in use .*\(PID {holder.pid}\)"):
            pipeline.run_recipe(recipe(tmp_path, stages=[{"stage": "toy", "name": "one"}]), echo=lambda *_: None)
    finally:
        holder.kill()
        holder.wait()
    assert RUNS == []


def test_only_process_0_locks_under_torchrun(tmp_path, toy, monkeypatch):
    holder = hold_lock(tmp_path / "one")
    try:
        monkeypatch.setenv("RANK", "1")  # the other ranks run the stage's collectives, never the lock
        pipeline.run_single("toy", None, [], out=str(tmp_path / "one"), force=False, resume=False)
        assert RUNS == [False]
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_file_holds_the_pid_and_survives_a_fresh_start(tmp_path, toy):
    out = tmp_path / "one"
    pipeline.run_single("toy", None, [], out=str(out), force=False, resume=False, echo=lambda *_: None)
    pipeline.run_single("toy", None, [], out=str(out), force=True, resume=False, echo=lambda *_: None)
    assert (out / ".lock").read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------------------------
# 12. names are plain names


@pytest.mark.parametrize("name", ["../../evil", "a/b", "/abs", "..", ".hidden", "", "a\\b"])
def test_recipe_names_that_would_leave_the_run_folder_are_refused(tmp_path, toy, name):
    with pytest.raises(LmforgeError, match=r"Config key name is invalid .* is not a plain name"):
        pipeline.run_recipe(recipe(tmp_path, name=name), echo=lambda *_: None)
    assert RUNS == [] and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("name", ["../../evil", "x/../../y", "..", "/tmp/x"])
def test_stage_names_that_would_leave_the_run_folder_are_refused(tmp_path, toy, name):
    with pytest.raises(LmforgeError, match=r"stages\.0\.name: .* is not a plain name"):
        pipeline.run_recipe(recipe(tmp_path, stages=[{"stage": "toy", "name": name}]), echo=lambda *_: None)
    assert RUNS == [] and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_run_name_from_the_command_line_is_checked_too(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "run", "quick", "--name", "../escape",
                        "--out-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'../escape' is not a plain name" in r.stderr
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# 14. a single-stage command without --resume keeps existing checkpoints


def test_rerunning_a_stage_without_resume_keeps_its_checkpoints_and_says_how_to_go_on(tmp_path, toy):
    out = tmp_path / "one"
    with pytest.raises(RuntimeError, match="interrupted"):
        pipeline.run_single("toy", None, ["fail=true"], out=str(out), force=False, resume=False)
    with pytest.raises(LmforgeError, match=r"holds checkpoints of an earlier run \(newest step-000001\), which starting "
                                           r"afresh would delete; add --resume to continue from them, or add --force"):
        pipeline.run_single("toy", None, ["fail=true"], out=str(out), force=False, resume=False)
    assert (out / "checkpoints" / "step-000001").is_dir() and RUNS == [False]
    # Another config: they cannot be resumed, still not deleted without --force.
    with pytest.raises(LmforgeError, match="its config or inputs changed since, so they cannot be resumed"):
        pipeline.run_single("toy", None, [], out=str(out), force=False, resume=False)
    with pytest.raises(RuntimeError):  # --resume continues (the stage is told to resume)
        pipeline.run_single("toy", None, ["fail=true"], out=str(out), force=False, resume=True)
    assert RUNS == [False, True]
    pipeline.run_single("toy", None, [], out=str(out), force=True, resume=False, echo=lambda *_: None)
    assert RUNS == [False, True, False] and read_manifest(out)["status"] == "complete"


def test_a_recipe_still_starts_a_changed_stage_afresh(tmp_path, toy):
    r = recipe(tmp_path)
    pipeline.run_recipe(r, echo=lambda *_: None)
    pipeline.run_recipe(r, ["toy.value=2"], echo=lambda *_: None)  # a recipe re-runs what changed, as before
    assert RUNS == [False, False]
    assert (tmp_path / "runs" / "t" / "toy" / "art" / "out.txt").read_text() == "2"


# --------------------------------------------------------------------------------------------
# umask: artifacts get the modes the user's umask gives ordinary files and folders


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_artifacts_keep_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        rd = RunDir(tmp_path / "stage", stage="x", artifact="model")
        with staged_dir(rd.artifact) as tmp:
            (tmp / "w.safetensors").write_bytes(b"w")
        atomic_write_json(rd.path / "manifest.json", {})
        keyed_cache(rd.path / "tokens" / "train.bin", {"k": 1}, lambda t: t.write_bytes(b"ids"))
        keyed_cache(rd.path / "base", {"k": 1}, lambda t: t.mkdir())
        rd.log_metrics({"step": 1})
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    files = [rd.path / "manifest.json", rd.path / "tokens" / "train.bin", rd.path / "tokens" / "train.bin.cache.json",
             rd.artifact / "w.safetensors", rd.metrics_path]
    assert {str(f.relative_to(rd.path)): mode(f) for f in files} == {str(f.relative_to(rd.path)): 0o666 & ~mask for f in files}
    assert mode(rd.artifact) == mode(rd.path / "base") == 0o777 & ~mask


def test_umask_is_read_without_changing_it():
    from lmforge.rundir import umask

    old = os.umask(0o027)
    try:
        assert umask() == 0o027 and umask() == 0o027
    finally:
        os.umask(old)


def test_kill_of_a_run_releases_its_lock(tmp_path):
    holder = hold_lock(tmp_path / "f")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    from lmforge.rundir import exclusive

    with exclusive(tmp_path / "f", what="Run folder"):
        pass
