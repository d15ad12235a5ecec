"""Quiet by default: a CLI run prints lmforge's own lines, not third-party noise (bitsandbytes'
kernel note, deprecation warnings, loading/saving progress bars); `--verbose` brings them back;
a config error is not preceded by "starting this stage afresh"."""

from __future__ import annotations

import re

from ..data.test_sft_data import arithmetic_rows, save_base, write_jsonl
from ..train.conftest import run_cli, write_yaml
from ..train.test_sft import sft_config

NOISE = re.compile(r"kernels|Warning|warn\(|deprecated|Loading weights|Writing|\d+%\|", re.IGNORECASE)


def test_cli_stderr_holds_no_third_party_noise_and_a_config_error_comes_alone(tmp_path):
    base = save_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(held_out=False)[:40])
    cfg = sft_config(data, base, max_steps=2, batch_size=4)
    cfg["adapter"] = {"method": "lora", "r": 4}
    p = run_cli("sft", str(write_yaml(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    assert not NOISE.search(p.stderr), p.stderr
    assert "sft: lora:" in p.stdout and "done in" in p.stdout  # lmforge's own progress stays
    loud = run_cli("sft", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "loud"), "--verbose")
    assert loud.returncode == 0 and NOISE.search(loud.stderr)  # the noise is real, and --verbose keeps it

    cfg["model"] = str(tmp_path / "missing")  # a changed config that fails: nothing about starting afresh
    p = run_cli("sft", str(write_yaml(tmp_path / "c.yaml", cfg)), "--out", str(tmp_path / "run"), "--force")
    assert p.returncode == 2
    assert "afresh" not in p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "missing" in p.stderr
