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

A checkpoint folder may come from someone else, and anyone can rewrite the hashes in
state.json, so the hashes guard against accidents only. What guards against a hostile file:
the `.pt` files hold tensors and plain containers only (the RNG states are converted to
them) and are read with `torch.load(weights_only=True)`, which refuses to unpickle anything
else, so loading one never runs code; and state.json is checked field by field, so a
missing or mistyped field fails closed with one sentence instead of resuming half-loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError, reason
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
    sharded model: process 0 alone reads it and scatters it into the shards (a collective).
    Every process first checks the names and shapes (the header only): one sentence on a mismatch."""
    _check_trainable(path, model)
    try:
        if fsdp.is_sharded(model):
            fsdp.load_model_state(model, load_file(str(path)) if is_main else {})
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in load_file(str(path)).items():
                params[n].copy_(t)
    except SafetensorError as e:  # a valid header over a truncated or damaged body
        raise _corrupted(path.parent, f"{path.name} cannot be read: {reason(e)}") from None


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so `torch.load(weights_only=True)` reads it."""
    version, mt, gauss = random.getstate()
    np_st = np.random.get_state(legacy=False)
    st = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_st["state"]["key"].astype(np.int64)), "pos": np_st["state"]["pos"],
                  "has_gauss": np_st["has_gauss"], "gauss": np_st["gauss"]},
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = st["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                              "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name)


def save(root: Path, *, step: int, model, optimizer, scheduler, state: dict, rank: int, world: int,
         is_main: bool, barrier, keep: int) -> Path:
    """Write checkpoint `step` (every rank writes its RNG file; rank 0 writes the rest).
    Every rank must call it: a sharded model's weights and optimizer state are gathered here.
    `state`: the caller's own numbers (or None), e.g. early-stopping state; loading refuses others."""
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


RESERVED = ("step", "world_size", "fsdp", "files")  # what save() itself writes into state.json
SHA256_HEX = 64


def _corrupted(ckpt: Path, what: str) -> LmforgeError:
    return LmforgeError(
        f"Checkpoint {ckpt} is corrupted ({what}); delete that folder to resume from the previous checkpoint, "
        "or re-run with --force to start over."
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(ckpt: Path, state, require: tuple[str, ...]) -> None:
    """Fail closed on a state.json that save() could not have written: wrong shape, wrong types,
    a field the caller needs missing, a file list that is absent, incomplete or names other files."""
    if not isinstance(state, dict):
        raise _corrupted(ckpt, f"state.json holds a {type(state).__name__}, not an object")
    step, world = state.get("step"), state.get("world_size")
    if not _is_int(step) or f"step-{step:06d}" != ckpt.name:
        raise _corrupted(ckpt, f"state.json's step is {step!r}, not the folder's step number")
    if not _is_int(world) or world < 1:
        raise _corrupted(ckpt, f"state.json's world_size is {world!r}, not a process count")
    if not isinstance(state.get("fsdp"), bool):
        raise _corrupted(ckpt, f"state.json's fsdp is {state.get('fsdp')!r}, not true or false")
    files = state.get("files")
    expected = {"trainable.safetensors", "optimizer.pt", *(f"rng-{r}.pt" for r in range(world))}
    if not isinstance(files, dict) or set(files) != expected or not all(
            isinstance(d, str) and len(d) == SHA256_HEX for d in files.values()):
        raise _corrupted(ckpt, f"state.json's file list is not the sha256 of each of {', '.join(sorted(expected))}")
    for key in require:
        if key not in state:
            raise _corrupted(ckpt, f"state.json has no {key}")
    for key, v in state.items():
        if key not in RESERVED and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _corrupted(ckpt, f"state.json's {key} is {v!r}, not a number")


def validate(ckpt: Path, *, require: tuple[str, ...] = ()) -> dict:
    """state.json of `ckpt` after checking its fields (`require`: the caller's own keys, each a
    number or null) and every listed file's hash; one sentence on failure."""
    state_path = ckpt / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise LmforgeError(
            f"Checkpoint {ckpt} is incomplete or corrupted (state.json unreadable); delete that folder to resume "
            "from the previous checkpoint, or re-run with --force to start over."
        ) from None
    _check_fields(ckpt, state, require)
    for name, digest in state["files"].items():
        f = ckpt / name
        if not f.is_file() or file_sha256(f) != digest:
            raise _corrupted(ckpt, f"{name} is missing or does not match its recorded hash")
    return state


def _load_tensors_only(ckpt: Path, name: str, **kw):
    """torch.load that cannot run code: weights_only refuses any pickled object other than
    tensors and plain containers (a hostile file's hash can be rewritten in state.json)."""
    try:
        return torch.load(ckpt / name, weights_only=True, **kw)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, OSError):
        raise LmforgeError(
            f"Checkpoint {ckpt}: {name} holds something other than tensors and plain values (tampered with, or "
            "written by an older lmforge), so it was not loaded; delete that folder to resume from the previous "
            "checkpoint, or re-run with --force to start over."
        ) from None


def _check_trainable(path: Path, model) -> None:
    """The safetensors file holds exactly the trainable parameters, each with the model's shape."""
    ckpt = path.parent
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except (OSError, SafetensorError) as e:  # missing, or not a safetensors file
        raise _corrupted(ckpt, f"{path.name} cannot be read: {reason(e)}") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in shapes]
    unknown = [n for n in shapes if n not in params]
    if missing or unknown:
        raise LmforgeError(
            f"Checkpoint {ckpt} does not match this model ({len(missing)} trainable parameters missing, "
            f"{len(unknown)} unknown, e.g. {(missing + unknown)[0]}); was the model or adapter config changed?"
        )
    for n, shape in shapes.items():
        if shape != tuple(params[n].shape):
            raise LmforgeError(
                f"Checkpoint {ckpt} does not match this model ({n} has shape {list(shape)}, the model's "
                f"{list(params[n].shape)}); was the model or adapter config changed?"
            )


def _check_optimizer_shapes(ckpt: Path, optimizer) -> None:
    # load_state_dict checks group sizes but not tensor shapes; a wrong shape would only fail
    # (or broadcast silently) at the first step.
    for g in optimizer.param_groups:
        for p in g["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    raise _corrupted(ckpt, f"optimizer.pt's {k} has shape {list(v.shape)} for a parameter of "
                                           f"shape {list(p.shape)}")


def load(ckpt: Path, *, model, optimizer, scheduler, rank: int, world: int, require: tuple[str, ...] = ()) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNGs from `ckpt`; its state.json
    (with `require`, the caller's own keys, checked present). Never unpickles code."""
    state = validate(ckpt, require=require)
    if state["world_size"] != world:
        raise LmforgeError(
            f"Checkpoint {ckpt} was written by {state['world_size']} processes but this run has {world}; "
            "resume with the same number of processes."
        )
    # Same world size and same config (the pipeline resumes only then) => same train.fsdp.
    # Sharded: process 0 alone reads the tensors and scatters them; every process checks the names.
    sharded = fsdp.is_sharded(model)
    reader = not sharded or rank == 0
    # mmap: a process that is not the reader touches only the scheduler's few bytes.
    opt = _load_tensors_only(ckpt, "optimizer.pt", mmap=not reader)
    rng = _load_tensors_only(ckpt, f"rng-{rank}.pt")
    load_trainable(model, ckpt / "trainable.safetensors", is_main=rank == 0)
    try:
        if sharded:
            fsdp.load_optimizer_state(model, optimizer, opt["optimizer"] if reader else {})
        else:
            optimizer.load_state_dict(opt["optimizer"])
            _check_optimizer_shapes(ckpt, optimizer)
        _check_like(ckpt, scheduler.state_dict(), opt["scheduler"])
        scheduler.load_state_dict(opt["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise _corrupted(ckpt, f"optimizer.pt does not hold this run's optimizer and scheduler state: "
                               f"{reason(e)}") from None
    try:
        set_rng_state(rng)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
        raise _corrupted(ckpt, f"rng-{rank}.pt does not hold random-generator states: {reason(e)}") from None
    return state


def _same_kind(a, b) -> bool:
    def num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if num(a):
        return num(b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_kind(x, y) for x, y in zip(a, b))
    return type(a) is type(b)


def _check_like(ckpt: Path, current: dict, loaded) -> None:
    # A scheduler's load_state_dict copies every key into its attributes unchecked; a mistyped
    # one would fail only at the next step (or not at all). Same keys, same kinds of value.
    if not isinstance(loaded, dict) or set(loaded) != set(current):
        raise _corrupted(ckpt, "optimizer.pt's scheduler state has other fields than this run's scheduler")
    for k, v in current.items():
        if not _same_kind(v, loaded[k]):
            raise _corrupted(ckpt, f"optimizer.pt's scheduler field {k} is {loaded[k]!r:.60}, not like {v!r:.60}")
