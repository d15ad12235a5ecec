"""The one training loop every training stage shares (pretrain, sft, reward, dpo, ...).

A stage hands it a model, a data source and a loss function:

    data.batch(start, size) -> dict   samples at global positions start..start+size-1, with
                                      "n" = how many items (tokens, pairs) the loss sums over
    loss_fn(model, batch) -> LossOut  the SUM of the per-item losses (not the mean)

Summing and dividing once by the number of items in the whole optimizer step (all
micro-batches, all processes) makes "batch 8 x accumulation 1" and "batch 2 x accumulation
4" and "2 processes x batch 4" the same update, also when micro-batches hold different
numbers of supervised tokens — the mean-of-means that a naive loop takes is not.

Everything stateful (weights, optimizer, scheduler, RNG, step) is checkpointed, and the data
order is a pure function of the sample position, so a resumed run is bitwise the same run.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lmforge.config import TrainConfig
from lmforge.errors import LmforgeError, Preempted, StopRun
from lmforge.estimate.predict import compile_choice
from lmforge.progress import Progress
from lmforge.rundir import RunDir, atomic_write_json
from lmforge.train import checkpoint as ckpt
from lmforge.train import fsdp


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar: SUM over the batch's items
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)  # summed over items too


class DataSource(Protocol):
    def batch(self, start: int, size: int) -> dict: ...


@dataclass
class TrainResult:
    step: int
    best_val_loss: float | None
    best_step: int | None
    last_eval: dict
    stopped_early: bool
    tokens_per_s: float
    wall_seconds: float
    train_loss: float | None


def make_accelerator(cfg: TrainConfig):
    """accelerate handles devices, mixed precision and DDP/FSDP under `accelerate launch`/`torchrun`."""
    from accelerate import Accelerator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = torch.cuda.is_available()
    if cfg.precision == "auto":
        mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    else:
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    return Accelerator(mixed_precision=mp, cpu=not cuda)


def _no_decay_ids(model) -> set[int]:
    """Norms, biases (ndim < 2) and embeddings: decaying them usually hurts (GPT-2/nanoGPT practice)."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, get, lambda: None)()
        if mod is not None and getattr(mod, "weight", None) is not None:
            ids.add(id(mod.weight))
    return ids


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LmforgeError("The model has no trainable parameters; check the adapter / freezing settings.")
    skip = set() if cfg.decay_norms_and_embeddings else _no_decay_ids(model)
    decay = [p for p in params if id(p) not in skip]
    no_decay = [p for p in params if id(p) in skip]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused AdamW updates each parameter in one kernel, on CUDA and (torch >= 2.4) on CPU. Without
    # it torch's CPU default is a Python loop of ~10 ops per parameter: 3.2 ms vs 0.9 ms per step
    # for the 0.8M-parameter bench model, whose whole step is ~40 ms. Same math, deterministic.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup, then decay to min_lr_ratio."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks at each step boundary (main thread only)."""

    def __init__(self):
        self.set = False
        self._old: Any = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a server): no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _save_best(root: Path, model, step: int, metrics: dict, is_main: bool) -> None:
    from safetensors.torch import save_file

    from lmforge.rundir import replace_dir

    weights = ckpt.trainable_state(model, is_main=is_main)  # every process: a collective if sharded
    if not is_main:
        return
    tmp = root / ".tmp-best"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    atomic_write_json(tmp / "best.json", {"step": step, **metrics})
    replace_dir(tmp, root / "best")


def _load_best(root: Path, model, is_main: bool) -> None:
    ckpt.load_trainable(model, root / "best" / "trainable.safetensors", is_main=is_main)


def train(
    model: torch.nn.Module,
    *,
    cfg: TrainConfig,
    rd: RunDir,
    data: DataSource,
    loss_fn: Callable[[torch.nn.Module, dict], LossOut],
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = False,
    label: str = "train",
    accelerator=None,
    shardable: bool = False,
) -> TrainResult:
    """Train `model` in place for cfg.max_steps optimizer steps (or until early stopping).

    `shardable`: the stage gathers a sharded model's weights on every process before saving
    (fsdp.full_model_state), so train.fsdp may shard it (see train/fsdp.py); others refuse it."""
    acc = accelerator or make_accelerator(cfg)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    sharded = cfg.fsdp and world > 1
    if sharded and not shardable:
        raise LmforgeError(f"{label}: train.fsdp shards full-model training only (pretrain, or sft without an "
                           "adapter); set train.fsdp: false to train this stage with DDP.")
    if sharded:
        fsdp.shard(model, acc)  # before the optimizer: it must hold the sharded parameters
    optimizer = make_optimizer(model, cfg)
    engine = model
    if not sharded:  # DDP (several processes) or nothing (one), and device placement
        engine, optimizer = acc.prepare(model, optimizer)
    # The scheduler is not prepared: accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    use_compile, why = compile_choice(cfg, model, data, device=acc.device)
    if why and main:
        print(f"[{label}] {why}")
        rd.log(why)
    if use_compile:
        engine = torch.compile(engine)
    params = [p for p in model.parameters() if p.requires_grad]

    step, best, best_step, bad_evals = 0, math.inf, None, 0
    latest = ckpt.latest(rd.checkpoints) if resume else None
    if latest is not None:
        state = ckpt.load(latest, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank, world=world,
                          require=("best", "best_step", "bad_evals"))
        step, best, best_step, bad_evals = state["step"], state["best"], state["best_step"], state["bad_evals"]
        if main:
            rd.truncate_metrics(step)
            rd.log(f"resumed from {latest.name}")
        if main:
            print(f"[{label}] resumed from checkpoint {latest} at step {step}")

    writer = None
    if main and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(rd.path / "tensorboard"), purge_step=step or None)

    def log(record: dict) -> None:
        if not main:
            return
        rd.log_metrics(record)
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(f"{label}/{k}", v, record["step"])

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            out = eval_fn(engine)
        model.train()
        return out

    def checkpoint_state() -> dict:
        return {"best": best, "best_step": best_step, "bad_evals": bad_evals}

    def save_checkpoint() -> None:
        ckpt.save(rd.checkpoints, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                  state=checkpoint_state(), rank=rank, world=world, is_main=main,
                  barrier=acc.wait_for_everyone, keep=cfg.keep_checkpoints)

    last_eval: dict = {}
    if eval_fn is not None and step == 0:
        last_eval = evaluate()  # fail fast: a broken eval must not surface after an hour of training
        log({"step": 0, **last_eval})

    per_rank = cfg.batch_size
    per_step = per_rank * cfg.grad_accum * world
    stopped_early = False
    t_start = time.time()
    t_log, tokens_since_log, tokens_total, train_loss = time.time(), 0, 0, None
    model.train()
    with SigtermFlag() as sigterm, Progress(label, cfg.max_steps, start=step, every=cfg.log_every, enabled=main) as prog:
        while step < cfg.max_steps:
            base = step * per_step
            micro = [
                data.batch(base + a * per_rank * world + rank * per_rank, per_rank) for a in range(cfg.grad_accum)
            ]
            n_items = float(sum(b["n"] for b in micro))
            if world > 1:  # every process divides by the global count
                n_items = acc.reduce(torch.tensor(n_items, device=acc.device), reduction="sum").item()
            if n_items == 0:
                raise LmforgeError(f"Step {step + 1} has no supervised items in any micro-batch; check the data masks.")
            loss_sum = torch.zeros((), device=acc.device)
            metric_sums: dict[str, torch.Tensor] = {}
            for a, b in enumerate(micro):
                b = _to_device(b, acc.device)
                sync = a == cfg.grad_accum - 1
                if sharded:  # FSDP: reduce-scatter gradients only after the last micro-batch
                    model.set_requires_gradient_sync(sync)
                with contextlib.nullcontext() if sync or sharded else acc.no_sync(engine):
                    out = loss_fn(engine, b)
                    # x world: DDP averages gradients over processes; we want the global sum / n_items.
                    acc.backward(out.loss * (world / n_items))
                loss_sum += out.loss.detach().float()
                for k, v in out.metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0) + (v.detach().float() if torch.is_tensor(v) else v)
                tokens_since_log += int(b["input_ids"].numel()) if "input_ids" in b else int(b["n"])
            if world > 1:
                loss_sum = acc.reduce(loss_sum, reduction="sum")
            step_loss = (loss_sum / n_items).item()  # one host sync per step (free on CPU)
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                raise StopRun(
                    f"Loss is {step_loss} at step {step + 1}; stopped before the optimizer update, so no checkpoint "
                    "holds it. Lower train.lr, check the data, or resume from the last checkpoint."
                )
            max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")
            if sharded:
                grad_norm = fsdp.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
            else:
                grad_norm = float(acc.clip_grad_norm_(params, max_norm))
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                raise StopRun(
                    f"Gradient norm is {grad_norm} at step {step + 1}; stopped before the optimizer update, so no "
                    "checkpoint holds it. Lower train.lr or enable train.grad_clip."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_loss = step_loss

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                dt = max(time.time() - t_log, 1e-9)
                tok_s = tokens_since_log * world / dt
                tokens_total += tokens_since_log * world
                rec = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": tok_s, "elapsed_s": time.time() - t_start}
                for k, v in metric_sums.items():
                    v = acc.reduce(v, reduction="sum") if world > 1 and torch.is_tensor(v) else v
                    rec[k] = float(v / n_items)
                log(rec)
                prog.update(step, loss=step_loss, tok_s=tok_s)
                t_log, tokens_since_log = time.time(), 0

            if eval_fn is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                last_eval = evaluate()
                log({"step": step, **last_eval})
                val = last_eval.get("val_loss")
                if val is not None and world > 1:  # one decision on every process (saving best is collective)
                    val = float(acc.reduce(torch.tensor(val, dtype=torch.float64, device=acc.device), reduction="mean"))
                if val is not None and val < best:
                    best, best_step, bad_evals = val, step, 0
                    if cfg.keep_best:
                        _save_best(rd.checkpoints, model, step, last_eval, main)
                elif val is not None:
                    bad_evals += 1
                if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                    stopped_early = True
                    msg = f"early stopping at step {step}: no better val_loss for {bad_evals} evaluations"
                    print(f"[{label}] {msg}")
                    if main:
                        rd.log(msg)

            at_end = step == cfg.max_steps or stopped_early
            preempted = sigterm.set
            if world > 1:  # a signal reaches processes at different steps; all stop at the same one
                preempted = acc.reduce(torch.tensor(float(preempted), device=acc.device), reduction="sum").item() > 0
            if preempted or (cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or at_end)):
                save_checkpoint()
            if preempted:
                raise Preempted(
                    f"Received SIGTERM; saved a checkpoint at step {step} in {rd.checkpoints}. "
                    "Re-run the same command with --resume (or re-run the recipe) to continue."
                )
            if stopped_early:
                break
    wall = time.time() - t_start
    if writer is not None:
        writer.close()
    # Every process reaches this barrier (no file-system-dependent branches before it), then
    # loads the best weights rank 0 saved: best_step is the same on all ranks.
    acc.wait_for_everyone()
    if cfg.keep_best and best_step is not None:
        _load_best(rd.checkpoints, model, main)
    return TrainResult(
        step=step, best_val_loss=None if best_step is None else best, best_step=best_step, last_eval=last_eval,
        stopped_early=stopped_early, tokens_per_s=(tokens_total + tokens_since_log * world) / max(wall, 1e-9),
        wall_seconds=wall, train_loss=train_loss,
    )
