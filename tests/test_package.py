"""An installable package: the wheel carries every file lmforge reads at run time (recipes, the
eval suite, the principles, the labelling page), so `pip install` without `-e` gives an `lmforge
run` that works from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (dependencies from this interpreter's
    site-packages through a .pth line: no network, no second torch)."""
    tmp = tmp_path_factory.mktemp("pkg")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout (and a
    # stale build/ could put deleted modules into the next wheel).
    src = tmp / "src-copy"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp / "wheel"), str(src)], check=True, env=env, timeout=600)
    wheel = next((tmp / "wheel").glob("lmforge-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = Path(subprocess.check_output([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())
    # A plain path line: the shared site-packages' own .pth files (an editable lmforge) are not run.
    (site / "shared-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, env=env, timeout=600)
    return venv


def test_the_wheel_holds_every_file_read_at_run_time(installed):
    names = set(zipfile.ZipFile(next(installed.parent.glob("wheel/lmforge-*.whl"))).namelist())
    for f in ("default.yaml", "quick.yaml", "eval_suite.yaml", "principles.yaml", "shakespeare.yaml"):
        assert f"lmforge/recipes/{f}" in names
    assert any(n.startswith("lmforge/label/static/") for n in names)


@pytest.mark.slow
def test_lmforge_run_quick_from_an_unrelated_folder_uses_the_installed_copy(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.check_output([str(installed / "bin" / "python"), "-c",
                                     "import lmforge.pipeline as p; print(p.__file__); print(p.builtin_recipe('quick'))"],
                                    text=True, cwd=tmp_path, env=env).split()
    assert all(Path(w).is_relative_to(installed) for w in where), where  # not the checkout's src/
    # The quick recipe by name, shortened: what is checked is that every file is found, not training.
    short = ["pretrain.train.max_steps=4", "pretrain.train.eval_every=2", "pretrain.train.checkpoint_every=0",
             "sft.train.max_steps=2", "sft.train.eval_every=0", "sft.train.checkpoint_every=0",
             "dpo.train.max_steps=2", "dpo.train.eval_every=0", "dpo.train.checkpoint_every=0",
             "grpo.train.max_steps=1", "grpo.train.checkpoint_every=0"]
    r = subprocess.run([str(installed / "bin" / "lmforge"), "run", "quick", "--out-dir", "out", *short],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "out" / "quick" / "report.md").read_text()
    assert report.startswith("# lmforge run report: quick") and "| eval | eval | complete |" in report
