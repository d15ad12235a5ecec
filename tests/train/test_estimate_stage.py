"""The estimate around a real training stage: the start-of-stage line, the manifest's predicted and
measured figures (the report's columns), and `lmforge estimate --probe` on the same stage."""

from __future__ import annotations

import json

from lmforge.pipeline import run_single
from tests.train.conftest import pretrain_config, run_cli, write_yaml


def test_stage_prints_and_records_its_estimate(tmp_path, curated_dir, tokenizer_dir):
    cfg = write_yaml(tmp_path / "p.yaml", pretrain_config(curated_dir, tokenizer_dir, max_steps=3))
    lines: list[str] = []
    m = run_single("pretrain", cfg, [], out=str(tmp_path / "run"), force=False, resume=False, echo=lines.append)
    line = next(x for x in lines if "estimate:" in x)
    assert line.startswith("[pretrain] estimate: peak memory ") and "3 steps of" in line
    est, peak = m["estimate"], m["peak_memory_bytes"]
    assert est["wall_seconds"] > 0 and peak > 0
    # on a CPU the process's resident memory dominates both figures; a factor of two catches a unit error
    assert 0.5 < est["peak_memory_bytes"] / peak < 2.0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "train.compile auto: predicted run" in log and "running eagerly" in log


def test_estimate_probe_runs_three_real_steps(tmp_path, curated_dir, tokenizer_dir):
    cfg = write_yaml(tmp_path / "p.yaml", {"stage": "pretrain", **pretrain_config(curated_dir, tokenizer_dir)})
    out = run_cli("estimate", str(cfg), "--json", "--probe")
    assert out.returncode == 0, out.stderr
    [e] = json.loads(out.stdout)
    p = e["probe"]
    assert p["steps"] == 3 and p["measured_step_seconds"] > 0 and p["measured_peak_bytes"] > 0
    # the calibrated figures are the measured ones; the static ones are kept beside them
    assert e["step_seconds"] == p["measured_step_seconds"]
    assert e["peak_memory_bytes"] == p["measured_peak_bytes"]
    assert p["step_error"] == p["static_step_seconds"] / p["measured_step_seconds"] - 1
