"""Fixtures for training tests: a small deterministic corpus, its tokenizer, stage configs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

SUBJECTS = ["the king", "a fox", "my sister", "the old miller", "our captain", "the river", "a child", "the queen"]
VERBS = ["sees", "loves", "follows", "fears", "greets", "carries", "finds", "remembers"]
OBJECTS = ["the bridge", "a lantern", "the northern hills", "three apples", "the ship", "a quiet song", "the gate"]


def make_corpus(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(s.capitalize() for s in sents))
    return docs


def write_curated(root: Path, n_train: int = 400, n_val: int = 40, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": make_corpus(n_train, seed)}), root / "train-00000.parquet")
    pq.write_table(pa.table({"text": make_corpus(n_val, seed + 1)}), root / "validation-00000.parquet")
    return root


@pytest.fixture(scope="session")
def curated_dir(tmp_path_factory) -> Path:
    return write_curated(tmp_path_factory.mktemp("curated"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, curated_dir) -> Path:
    from lmforge.data.corpus import iter_texts
    from lmforge.data.tokenizer import Config, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(iter_texts(curated_dir, "train"), Config(vocab_size=320))
    tok.save_pretrained(str(out))
    return out


def pretrain_config(curated_dir: Path, tokenizer_dir: Path, **train) -> dict:
    t = dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, eval_batches=2,
             checkpoint_every=0, log_every=1, tensorboard=False, threads=1, seed=7)
    t.update(train)
    return {
        "data": str(curated_dir),
        "tokenizer": str(tokenizer_dir),
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "context_length": 32, "dropout": 0.1},
        "train": t,
    }


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def lmforge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *args]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(lmforge_cmd(*args), capture_output=True, text=True, timeout=timeout, env=e)


# ---------------------------------------------------------------- interrupted runs (every training stage)


def start_stage(stage: str, cfg: Path, out: Path) -> subprocess.Popen:
    """`lmforge STAGE cfg --out out` in a child process, for a test to interrupt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(lmforge_cmd(stage, str(cfg), "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not (out / "checkpoints" / f"step-{step:06d}").exists():
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def sigkill_after_checkpoint(stage: str, cfg: Path, out: Path, step: int) -> Path:
    """Run the stage, SIGKILL it once checkpoint `step` exists; returns the newest checkpoint
    left behind (the run folder still says "running", as after a crash)."""
    from lmforge.rundir import read_manifest
    from lmforge.train import checkpoint as ckpt

    proc = start_stage(stage, cfg, out)
    wait_for_checkpoint(out, step, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -9
    assert read_manifest(out)["status"] == "running"
    killed_at = ckpt.latest(out / "checkpoints")
    assert killed_at is not None
    return killed_at


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def first_losses(run: Path, stage: str, n: int) -> list[float]:
    from lmforge.rundir import RunDir

    return [m["loss"] for m in RunDir(run, stage, "model").read_metrics() if "loss" in m][:n]
