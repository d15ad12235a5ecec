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
from lmforge.train.guards import GuardConfig, Guards


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
    stopped_by: dict | None = None  # the guard that stopped the run (lmforge.train.guards)


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


_LOOP_STATE = ("best", "best_step", "bad_evals")  # what the Trainer keeps in a checkpoint's state.json


class Trainer:
    """The step machinery every training stage shares; a stage's loop drives it (torchtitan's
    shape: the stage owns its visible loop, this owns what each step must get right).

        with Trainer(model, cfg=..., rd=..., resume=..., label=...) as t:
            while t.step < cfg.max_steps:
                for each micro-batch:  with t.micro_step(last): t.backward(loss_sum, n_items)
                loss, grad_norm = t.update(loss_sum, n_items)  # non-finite checks, clip, optimizer step
                t.advance()                                    # the LR schedule, step + 1
                if t.log_due: t.log({...})                     # metrics.jsonl + TensorBoard
                t.evaluate_if_due(eval_fn)                     # best weights, early stopping
                t.boundary()                                   # checkpoint; SIGTERM -> Preempted
            t.finish()                                         # best weights back into the model

    Set up once: FSDP sharding or DDP/device placement (accelerate), the optimizer, the schedule,
    torch.compile, and the resume from the latest checkpoint (weights, optimizer, schedule, RNG,
    step, early-stopping state and the stage's own `state`, e.g. PPO's adaptive KL coefficient).
    `data`: the stage's batches, from which train.compile auto predicts the run (none: eager).
    `shardable`: the stage gathers a sharded model's weights on every process before saving
    (fsdp.full_model_state), so train.fsdp may shard it (see train/fsdp.py); others refuse it.
    """

    def __init__(self, model: torch.nn.Module, *, cfg: TrainConfig, rd: RunDir, resume: bool = False,
                 label: str = "train", accelerator=None, shardable: bool = False, data: DataSource | None = None,
                 guards: GuardConfig | None = None):
        acc = self.acc = accelerator or make_accelerator(cfg)
        self.cfg, self.rd, self.label, self.model = cfg, rd, label, model
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.sharded = cfg.fsdp and self.world > 1
        if self.sharded and not shardable:
            raise LmforgeError(f"{label}: train.fsdp shards full-model training only (pretrain, or sft without an "
                               "adapter); set train.fsdp: false to train this stage with DDP.")
        if self.sharded:
            fsdp.shard(model, acc)  # before the optimizer: it must hold the sharded parameters
        self.optimizer = make_optimizer(model, cfg)
        self.engine = model
        if not self.sharded:  # DDP (several processes) or nothing (one), and device placement
            self.engine, self.optimizer = acc.prepare(model, self.optimizer)
        # The scheduler is not prepared: accelerate would step it once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        if data is not None:  # "auto" predicts the run from the stage's first batch
            use_compile, why = compile_choice(cfg, model, data, device=acc.device)
        else:
            use_compile = cfg.compile is True
            why = f"train.compile auto: {label} has no fixed batch shape to predict from; running eagerly" if (
                cfg.compile == "auto") else None
        if why and self.main:
            print(f"[{label}] {why}")
            rd.log(why)
        if use_compile:
            self.engine = torch.compile(self.engine)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step, self.best, self.best_step, self.bad_evals = 0, math.inf, None, 0
        self.state: dict = {}  # the stage's own checkpointed numbers (state.json beside the loop's own)
        self.last_saved, self.stopped_early, self.last_eval = -1, False, {}
        self.resumed_from = ckpt.latest(rd.checkpoints) if resume else None
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self.guards = Guards(guards, self.state) if guards is not None and guards.enabled else None
        self.state = {k: v for k, v in self.state.items() if not k.startswith("guard_")}
        self.stopped_by: dict | None = None
        self.writer = None
        if self.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(rd.path / "tensorboard"), purge_step=self.step or None)
        self.t_start = time.time()

    def _load(self, path: Path) -> None:
        state = ckpt.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                          rank=self.rank, world=self.world, require=("best", "best_step", "bad_evals"))
        self.step = self.last_saved = state["step"]
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
        self.state = {k: v for k, v in state.items() if k not in (*ckpt.RESERVED, *_LOOP_STATE)}
        if self.main:
            self.rd.truncate_metrics(self.step)
            self.rd.log(f"resumed from {path.name}")
            print(f"[{self.label}] resumed from checkpoint {path} at step {self.step}")

    def __enter__(self) -> "Trainer":
        self._sigterm = SigtermFlag().__enter__()
        self.progress = Progress(self.label, self.cfg.max_steps, start=self.step, every=self.cfg.log_every,
                                 enabled=self.main).__enter__()
        self.model.train()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
        self._sigterm.__exit__(*exc)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ---- one optimizer step -------------------------------------------------------------------

    def global_sum(self, x: float) -> float:
        """x summed over processes (x itself with one)."""
        if self.world == 1:
            return x
        return self.acc.reduce(torch.tensor(x, device=self.acc.device), reduction="sum").item()

    def global_sums(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Scalar tensors summed over processes, as floats (one collective for all of them)."""
        if not sums:
            return {}
        x = torch.stack([v.float() for v in sums.values()])
        if self.world > 1:
            x = self.acc.reduce(x, reduction="sum")
        return dict(zip(sums, x.tolist()))

    def global_max(self, x: torch.Tensor) -> float:
        if self.world > 1:
            x = self.acc.gather(x.reshape(1)).max()
        return x.item()

    def micro_step(self, last: bool):
        """Context for one micro-batch's forward and backward: gradients are reduced over processes
        only after the step's last micro-batch (DDP no_sync, FSDP requires_gradient_sync)."""
        if self.sharded:  # FSDP: reduce-scatter gradients only after the last micro-batch
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.acc.no_sync(self.engine)

    def backward(self, loss_sum: torch.Tensor, n_items: float) -> None:
        """Backward of a micro-batch's SUMMED loss; `n_items` counts the items of the whole optimizer
        step on all processes. x world: DDP averages gradients over processes; we want sum / n_items."""
        self.acc.backward(loss_sum * (self.world / n_items))

    def update(self, loss_sum: torch.Tensor, n_items: float) -> tuple[float, float]:
        """(step loss, gradient norm) after the optimizer update. `loss_sum`: this process's summed
        loss over the step's micro-batches (detached). A non-finite loss or gradient norm stops the
        run before the update, naming the step, so no checkpoint ever holds it."""
        if self.world > 1:
            loss_sum = self.acc.reduce(loss_sum, reduction="sum")
        step_loss = (loss_sum / n_items).item()  # one host sync per step (free on CPU)
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise StopRun(
                f"Loss is {step_loss} at step {self.step + 1}; stopped before the optimizer update, so no "
                "checkpoint holds it. Lower train.lr, check the data, or resume from the last checkpoint."
            )
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        if self.sharded:
            grad_norm = fsdp.grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        else:
            grad_norm = float(self.acc.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise StopRun(
                f"Gradient norm is {grad_norm} at step {self.step + 1}; stopped before the optimizer "
                "update, so no checkpoint holds it. Lower train.lr or enable train.grad_clip."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm

    # ---- the step boundary ------------------------------------------------------------------------

    def advance(self) -> None:
        """One step done: the LR schedule moves on (once per step, whatever the updates in it)."""
        self.scheduler.step()
        self.step += 1

    @property
    def log_due(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def log(self, record: dict) -> None:
        """One metrics line (process 0): metrics.jsonl and TensorBoard (`<label>/<key>`)."""
        if self.guards is not None:  # every process sees the same record: one decision (see boundary)
            self.guards.observe(record)
        if not self.main:
            return
        self.rd.log_metrics(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{self.label}/{k}", v, record["step"])

    def evaluate(self, eval_fn: Callable[[torch.nn.Module], dict]) -> dict:
        self.model.eval()
        with torch.no_grad():
            out = eval_fn(self.engine)
        self.model.train()
        self.last_eval = out
        self.log({"step": self.step, **out})
        return out

    def evaluate_if_due(self, eval_fn: Callable[[torch.nn.Module], dict] | None) -> None:
        """Evaluate every eval_every steps and at the end; keep the best val_loss weights; early stopping."""
        cfg = self.cfg
        if eval_fn is None or not ((cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps):
            return
        val = self.evaluate(eval_fn).get("val_loss")
        if val is not None and self.world > 1:  # one decision on every process (saving best is collective)
            val = float(self.acc.reduce(torch.tensor(val, dtype=torch.float64, device=self.acc.device),
                                        reduction="mean"))
        if val is not None and val < self.best:
            self.best, self.best_step, self.bad_evals = val, self.step, 0
            if cfg.keep_best:
                _save_best(self.rd.checkpoints, self.model, self.step, self.last_eval, self.main)
        elif val is not None:
            self.bad_evals += 1
        if cfg.early_stopping_patience and self.bad_evals >= cfg.early_stopping_patience:
            self.stopped_early = True
            msg = f"early stopping at step {self.step}: no better val_loss for {self.bad_evals} evaluations"
            print(f"[{self.label}] {msg}")
            if self.main:
                self.rd.log(msg)

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (a collective with several processes)."""
        if self.world == 1:
            return flag
        return self.acc.reduce(torch.tensor(float(flag), device=self.acc.device), reduction="sum").item() > 0

    def boundary(self) -> None:
        """Checkpoint when due (every checkpoint_every steps and at the end) or when SIGTERM arrived;
        then stop with Preempted (exit 143) if it did. A signal reaches processes at different
        steps; all stop at the same one."""
        cfg = self.cfg
        self.check_guards()
        at_end = self.step == cfg.max_steps or self.stopped_early
        preempted = self.any_process(self._sigterm.set)
        if preempted or (cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or at_end)):
            self.save_checkpoint()
        if preempted:
            raise Preempted(
                f"Received SIGTERM; saved a checkpoint at step {self.step} in {self.rd.checkpoints}. "
                "Re-run the same command with --resume (or re-run the recipe) to continue."
            )

    def check_guards(self) -> None:
        """Process 0's guard decisions for all: keep this step's weights as the guards' best, or stop
        the run (logged with the values that fired it; finish() then restores that best)."""
        if self.guards is None:
            return
        improved, fired = self.guards.check(self.step)
        if self.any_process(improved and self.main):
            _save_best(self.rd.checkpoints / "guard", self.model, self.step, {}, self.main)
        if self.any_process(fired is not None and self.main):
            self.stopped_early = True
            self.stopped_by = {"guard": fired.guard, "step": self.step, "best_step": self.guards.best_step,
                               **fired.values} if fired else {"guard": "?", "step": self.step}
            msg = f"guard {fired.guard} stopped the run at step {self.step}: {fired.message}" if fired else ""
            if self.main:
                print(f"[{self.label}] {msg}; keeping the weights of step {self.guards.best_step}")
                self.rd.log(f"{msg}; keeping the weights of step {self.guards.best_step}")
                self.rd.log_metrics({"step": self.step, "guard": fired.guard,
                                     **{f"guard/{k}": v for k, v in fired.values.items()}})

    def save_checkpoint(self) -> None:
        """Every process calls it (gathering a sharded model is collective)."""
        ckpt.save(self.rd.checkpoints, step=self.step, model=self.model, optimizer=self.optimizer,
                  scheduler=self.scheduler, state={**self.state, "best": self.best, "best_step": self.best_step,
                                                   "bad_evals": self.bad_evals,
                                                   **(self.guards.state() if self.guards else {})},
                  rank=self.rank, world=self.world, is_main=self.main, barrier=self.acc.wait_for_everyone,
                  keep=self.cfg.keep_checkpoints)
        self.last_saved = self.step

    def finish(self) -> None:
        """After the last step: every process reaches this barrier (no file-system-dependent branches
        before it), then loads the best weights rank 0 saved (best_step is the same on all ranks)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.acc.wait_for_everyone()
        if self.stopped_by is not None and self.guards.best_step is not None:
            _load_best(self.rd.checkpoints / "guard", self.model, self.main)
        elif self.cfg.keep_best and self.best_step is not None:
            _load_best(self.rd.checkpoints, self.model, self.main)


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
    guards: GuardConfig | None = None,
) -> TrainResult:
    """Train `model` in place for cfg.max_steps optimizer steps (or until early stopping): the
    supervised stages' loop (pretrain, sft, reward, dpo) on the shared Trainer."""
    t = Trainer(model, cfg=cfg, rd=rd, resume=resume, label=label, accelerator=accelerator, shardable=shardable,
                data=data, guards=guards)
    world, rank, device = t.world, t.rank, t.acc.device
    if eval_fn is not None and t.step == 0:
        t.evaluate(eval_fn)  # fail fast: a broken eval must not surface after an hour of training

    per_rank = cfg.batch_size
    per_step = per_rank * cfg.grad_accum * world
    t_log, tokens_since_log, tokens_total, train_loss = time.time(), 0, 0, None
    with t:
        while t.step < cfg.max_steps:
            base = t.step * per_step
            micro = [
                data.batch(base + a * per_rank * world + rank * per_rank, per_rank) for a in range(cfg.grad_accum)
            ]
            n_items = t.global_sum(float(sum(b["n"] for b in micro)))  # every process divides by the global count
            if n_items == 0:
                raise LmforgeError(f"Step {t.step + 1} has no supervised items in any micro-batch; check the data masks.")
            loss_sum = torch.zeros((), device=device)
            metric_sums: dict[str, torch.Tensor] = {}
            for a, b in enumerate(micro):
                b = _to_device(b, device)
                with t.micro_step(last=a == cfg.grad_accum - 1):
                    out = loss_fn(t.engine, b)
                    t.backward(out.loss, n_items)
                loss_sum += out.loss.detach().float()
                for k, v in out.metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0) + (v.detach().float() if torch.is_tensor(v) else v)
                tokens_since_log += int(b["input_ids"].numel()) if "input_ids" in b else int(b["n"])
            step_loss, grad_norm = t.update(loss_sum, n_items)
            t.advance()
            train_loss = step_loss

            if t.log_due:
                dt = max(time.time() - t_log, 1e-9)
                tok_s = tokens_since_log * world / dt
                tokens_total += tokens_since_log * world
                rec = {"step": t.step, "loss": step_loss, "lr": t.lr, "grad_norm": grad_norm,
                       "tokens_per_s": tok_s, "elapsed_s": time.time() - t.t_start}
                for k, v in metric_sums.items():
                    v = t.acc.reduce(v, reduction="sum") if world > 1 and torch.is_tensor(v) else v
                    rec[k] = float(v / n_items)
                t.log(rec)
                t.progress.update(t.step, loss=step_loss, tok_s=tok_s)
                t_log, tokens_since_log = time.time(), 0

            t.evaluate_if_due(eval_fn)
            t.boundary()
            if t.stopped_early:
                break
    wall = time.time() - t.t_start
    t.finish()
    return TrainResult(
        step=t.step, best_val_loss=None if t.best_step is None else t.best, best_step=t.best_step,
        last_eval=t.last_eval, stopped_early=t.stopped_early,
        tokens_per_s=(tokens_total + tokens_since_log * world) / max(wall, 1e-9), wall_seconds=wall,
        train_loss=train_loss, stopped_by=t.stopped_by,
    )
