"""Checkpoints from someone else: loading one never runs code, and a damaged one fails closed.

The hashes in state.json guard against accidents only (anyone can rewrite them), so each case
below rewrites them to match its tampered file: what must stop it is the loader itself.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.rundir import file_sha256, read_manifest
from lmforge.train import checkpoint as ckpt

from ..train.conftest import pretrain_config, run_cli, write_curated, write_yaml

LOOP_STATE = {"best": math.inf, "best_step": None, "bad_evals": 0}
LOOP_KEYS = ("best", "best_step", "bad_evals")


class Payload:
    """Unpickling this runs a shell command (what a hostile optimizer.pt would carry)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def setup_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def trained_checkpoint(root):
    model, opt, sched = setup_training()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    path = ckpt.save(root, step=1, model=model, optimizer=opt, scheduler=sched, state=dict(LOOP_STATE), rank=0,
                     world=1, is_main=True, barrier=lambda: None, keep=2)
    return path, model, opt


def load_fresh(path):
    model, opt, sched = setup_training(seed=1)
    return ckpt.load(path, model=model, optimizer=opt, scheduler=sched, rank=0, world=1, require=LOOP_KEYS), model, opt


def rewrite_hash(path, name):
    state = json.loads((path / "state.json").read_text())
    state["files"][name] = file_sha256(path / name)
    (path / "state.json").write_text(json.dumps(state))


def assert_one_sentence(e: LmforgeError, *parts: str):
    msg = str(e)
    assert "\n" not in msg and msg.count(". ") == 0, msg
    for p in parts:
        assert p in msg, msg


# ------------------------------------------------------------------------- item 9: no code runs

def test_round_trip_restores_weights_optimizer_and_every_rng(tmp_path):
    random.gauss(0, 1)  # python's cached second gaussian is part of its state
    np.random.standard_normal()  # so is numpy's
    path, model, opt = trained_checkpoint(tmp_path)
    expect = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    state, loaded, loaded_opt = load_fresh(path)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:4] == expect[:4] and torch.equal(got[4], expect[4])
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)
    a, b = opt.state_dict()["state"], loaded_opt.state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert state["step"] == 1 and state["best"] == math.inf and state["best_step"] is None


@pytest.mark.parametrize("name", ["optimizer.pt", "rng-0.pt"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, name):
    path, _, _ = trained_checkpoint(tmp_path / "c")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, path / name)
    # The payload is live: an unsafe load runs it (this is what resuming did before).
    torch.load(path / name, weights_only=False)
    assert marker.exists()
    marker.unlink()
    rewrite_hash(path, name)
    with pytest.raises(LmforgeError) as e:
        load_fresh(path)
    assert_one_sentence(e.value, str(path), name, "was not loaded")
    assert not marker.exists()


def test_cli_resume_refuses_a_payload_and_a_bare_state_json(tmp_path):
    """End to end: `pretrain --resume` on a run whose newest checkpoint carries a payload (its hash
    rewritten) exits 2 with one sentence and the command never runs; state.json = {} likewise."""
    from lmforge.data.corpus import iter_texts
    from lmforge.data.tokenizer import Config, train_tokenizer

    data = write_curated(tmp_path / "data", n_train=60, n_val=10)
    train_tokenizer(iter_texts(data, "train"), Config(vocab_size=280)).save_pretrained(str(tmp_path / "tok"))
    cfg = pretrain_config(str(data), str(tmp_path / "tok"), max_steps=2, checkpoint_every=1, eval_every=0, keep_checkpoints=2)
    cfg_path = write_yaml(tmp_path / "c.yaml", cfg)
    ref = tmp_path / "ref"
    r = run_cli("pretrain", str(cfg_path), "--out", str(ref))
    assert r.returncode == 0, r.stderr

    def resumable_copy(name):
        out = tmp_path / name
        shutil.copytree(ref, out)
        m = read_manifest(out)
        (out / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
        return out, ckpt.latest(out / "checkpoints")

    out, last = resumable_copy("payload")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, last / "optimizer.pt")
    rewrite_hash(last, "optimizer.pt")
    r = run_cli("pretrain", str(cfg_path), "--out", str(out), "--resume")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: Checkpoint {last}: optimizer.pt holds"), r.stderr
    assert not marker.exists()

    out, last = resumable_copy("bare")
    (last / "state.json").write_text("{}")
    r = run_cli("pretrain", str(cfg_path), "--out", str(out), "--resume")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: Checkpoint {last} is corrupted"), r.stderr


# ------------------------------------------------------------------------- item 10: fail closed

def _edit_state(**changes):
    def edit(state):
        for k, v in changes.items():
            if v is ...:
                state.pop(k)
            else:
                state[k] = v
        return state
    return edit


def _edit_files(fn):
    def edit(state):
        fn(state["files"])
        return state
    return edit


STATE_CASES = {
    "empty object": (lambda s: {}, "step"),
    "a list": (lambda s: [s], "not an object"),
    "no file list": (_edit_state(files=...), "file list"),
    "empty file list": (_edit_state(files={}), "file list"),
    "file list a string": (_edit_state(files="all"), "file list"),
    "optimizer not listed": (_edit_files(lambda f: f.pop("optimizer.pt")), "file list"),
    "a path outside the folder": (_edit_files(lambda f: f.update({"../../x": "0" * 64})), "file list"),
    "hash not a sha256": (_edit_files(lambda f: f.update({"optimizer.pt": 5})), "file list"),
    "hash mismatch": (_edit_files(lambda f: f.update({"optimizer.pt": "0" * 64})), "does not match its recorded hash"),
    "step a string": (_edit_state(step="1"), "step"),
    "step not the folder's": (_edit_state(step=7), "step"),
    "step missing": (_edit_state(step=...), "step"),
    "world_size zero": (_edit_state(world_size=0), "world_size"),
    "world_size a float": (_edit_state(world_size=1.0), "world_size"),
    "fsdp a string": (_edit_state(fsdp="no"), "fsdp"),
    "best a string": (_edit_state(best="low"), "best"),
    "bad_evals a list": (_edit_state(bad_evals=[0]), "bad_evals"),
    "bad_evals missing": (_edit_state(bad_evals=...), "bad_evals"),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_damaged_state_json_fails_closed(tmp_path, case):
    edit, named = STATE_CASES[case]
    path, _, _ = trained_checkpoint(tmp_path)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps(edit(state)))
    with pytest.raises(LmforgeError) as e:
        load_fresh(path)
    assert_one_sentence(e.value, f"Checkpoint {path} is corrupted", named)


def test_missing_file_fails_closed(tmp_path):
    path, _, _ = trained_checkpoint(tmp_path)
    (path / "rng-0.pt").unlink()
    with pytest.raises(LmforgeError) as e:
        load_fresh(path)
    assert_one_sentence(e.value, "rng-0.pt is missing")


def _opt_wrong_shape(path):
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    opt["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5, 5)
    return opt


def _sched_wrong_type(path):
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    opt["scheduler"]["base_lrs"] = ["fast"]
    return opt


FILE_CASES = {
    "optimizer state of another shape": ("optimizer.pt", _opt_wrong_shape, "exp_avg has shape [5, 5]"),
    "scheduler field mistyped": ("optimizer.pt", _sched_wrong_type, "scheduler field base_lrs"),
    "optimizer.pt without its keys": ("optimizer.pt", lambda p: {"x": 1}, "optimizer.pt does not hold"),
    "optimizer.pt not a dict": ("optimizer.pt", lambda p: [1, 2], "optimizer.pt does not hold"),
    "rng file of other content": ("rng-0.pt", lambda p: {"torch": torch.zeros(3)}, "rng-0.pt does not hold"),
    "weights of another shape": ("trainable.safetensors", None, "weight has shape [7, 3]"),
    "bytes that are no pickle": ("optimizer.pt", b"\x00not a pickle", "was not loaded"),
    "weights file of other bytes": ("trainable.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "cannot be read"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_tampered_file_with_rewritten_hash_fails_closed(tmp_path, case):
    from safetensors.torch import save_file

    name, make, named = FILE_CASES[case]
    path, model, _ = trained_checkpoint(tmp_path)
    if name == "trainable.safetensors" and make is None:
        save_file({"weight": torch.zeros(7, 3), "bias": torch.zeros(2)}, str(path / name))
    elif isinstance(make, bytes):
        (path / name).write_bytes(make)
    else:
        torch.save(make(path), path / name)
    rewrite_hash(path, name)
    with pytest.raises(LmforgeError) as e:
        load_fresh(path)
    assert_one_sentence(e.value, str(path), named)


def test_best_weights_of_another_model_are_refused(tmp_path):
    """checkpoints/best/ (loaded at the end of a run with keep_best) has no state.json; its weights
    are still checked by name and shape before any is copied into the model."""
    from safetensors.torch import save_file

    best = tmp_path / "best"
    best.mkdir()
    save_file({"weight": torch.zeros(2, 5), "bias": torch.zeros(2)}, str(best / "trainable.safetensors"))
    model, _, _ = setup_training()
    before = model.weight.detach().clone()
    with pytest.raises(LmforgeError) as e:
        ckpt.load_trainable(model, best / "trainable.safetensors")
    assert_one_sentence(e.value, str(best), "weight has shape [2, 5]")
    assert torch.equal(model.weight, before)
    (best / "trainable.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LmforgeError) as e:
        ckpt.load_trainable(model, best / "trainable.safetensors")
    assert_one_sentence(e.value, str(best), "trainable.safetensors cannot be read")
