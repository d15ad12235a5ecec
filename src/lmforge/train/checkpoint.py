"""Resumable training checkpoints, written atomically and validated on load.

    checkpoints/step-000120/
        trainable.safetensors   every parameter with requires_grad (all of them for full
                                training, only the adapter for LoRA), by name
        optimizer.pt            optimizer + LR scheduler state
        rng-<rank>.pt           torch / CUDA / python / numpy RNG states of each process
        state.json              step, early-stopping state, sha256 of every file above

A checkpoint is written into `.tmp-step-000120/` and renamed when complete, so a process
killed mid-write leaves only a `.tmp-*` folder, which is ignored and cleaned up. Loading
checks every file's hash, so a corrupted checkpoint is refused with a clear message instead
of silently resuming from garbage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json, file_sha256
from lmforge.train import fsdp


def trainable_state(model, *, is_main: bool = True) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, on CPU, for process 0 ({} for the others). A sharded
    (FSDP) model's shards are gathered: a collective that every process must call."""
    if fsdp.is_sharded(model):
        full = fsdp.full_model_state(model)  # {} on processes other than 0
        return {n: full[n] for n, p in model.named_parameters() if p.requires_grad and n in full}
    if not is_main:
        return {}
    # named_parameters() lists a tied weight once, so safetensors never sees shared storage.
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, path: Path, *, is_main: bool = True) -> None:
    """Load a trainable-parameter file (full tensors, by name) into the model's parameters. A
    sharded model: process 0 alone reads it and scatters it into the shards (a collective)."""
    if fsdp.is_sharded(model):
        fsdp.load_model_state(model, load_file(str(path)) if is_main else {})
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(str(path)).items():
            params[n].copy_(t)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name)


def save(root: Path, *, step: int, model, optimizer, scheduler, state: dict, rank: int, world: int,
         is_main: bool, barrier, keep: int) -> Path:
    """Write checkpoint `step` (every rank writes its RNG file; rank 0 writes the rest).
    Every rank must call it: a sharded model's weights and optimizer state are gathered here."""
    sharded = fsdp.is_sharded(model)
    weights = trainable_state(model, is_main=is_main)
    opt_state = fsdp.full_optimizer_state(model, optimizer) if sharded else None
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if is_main:
        save_file(weights, str(tmp / "trainable.safetensors"))
        opt = opt_state if sharded else optimizer.state_dict()
        torch.save({"optimizer": opt, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        atomic_write_json(tmp / "state.json", {**state, "step": step, "world_size": world, "fsdp": sharded,
                                               "files": files})
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        for old in step_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1] if dirs else None


def validate(ckpt: Path) -> dict:
    """state.json of `ckpt` after checking every listed file's hash; one sentence on failure."""
    state_path = ckpt / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise LmforgeError(
            f"Checkpoint {ckpt} is incomplete or corrupted (state.json unreadable); delete that folder to resume "
            "from the previous checkpoint, or re-run with --force to start over."
        ) from None
    for name, digest in state.get("files", {}).items():
        f = ckpt / name
        if not f.is_file() or file_sha256(f) != digest:
            raise LmforgeError(
                f"Checkpoint {ckpt} is corrupted ({name} is missing or does not match its recorded hash); delete "
                "that folder to resume from the previous checkpoint, or re-run with --force to start over."
            )
    return state


def load(ckpt: Path, *, model, optimizer, scheduler, rank: int, world: int) -> dict:
    state = validate(ckpt)
    if state.get("world_size", 1) != world:
        raise LmforgeError(
            f"Checkpoint {ckpt} was written by {state.get('world_size')} processes but this run has {world}; "
            "resume with the same number of processes."
        )
    # Same world size and same config (the pipeline resumes only then) => same train.fsdp.
    # Sharded: process 0 alone reads the tensors and scatters them; every process checks the names.
    sharded = fsdp.is_sharded(model)
    with safe_open(str(ckpt / "trainable.safetensors"), framework="pt") as f:
        names = set(f.keys())
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in names]
    unknown = [n for n in names if n not in params]
    if missing or unknown:
        raise LmforgeError(
            f"Checkpoint {ckpt} does not match this model ({len(missing)} trainable parameters missing, "
            f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]}); was the model or adapter config changed?"
        )
    reader = not sharded or rank == 0
    load_trainable(model, ckpt / "trainable.safetensors", is_main=rank == 0)
    # mmap: a process that is not the reader touches only the scheduler's few bytes.
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False, mmap=not reader)
    if sharded:
        fsdp.load_optimizer_state(model, optimizer, opt["optimizer"] if reader else {})
    else:
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    set_rng_state(torch.load(ckpt / f"rng-{rank}.pt", weights_only=False))
    return state
