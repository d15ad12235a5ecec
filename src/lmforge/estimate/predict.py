"""A workload on a device: memory breakdown, FLOPs, step time, wall time, fit and advice.

Peak memory is the sum of what is resident at the end of a training forward: the runtime,
weights, gradients (conservatively: they exist while the last activations are still held),
optimizer states, autocast's bf16 weight copies, the micro-batch's activations, a frozen
reference copy and a reward model. An RL stage's rollout KV cache and its training activations
are never alive together, so the larger counts.

Time = FLOPs / (device FLOP/s x MATMUL_EFFICIENCY) + per-layer launch overhead per forward and
backward + the optimizer's memory traffic; wall time adds start-up, evaluations and checkpoints.
`--probe` replaces the efficiency and the activation figure with measured ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.estimate import formulas as F
from lmforge.estimate.devices import Device
from lmforge.estimate.workload import Workload

MATMUL_EFFICIENCY = {"cuda": 0.45, "cpu": 0.6}  # share of the matmul peak a training step reaches
DISK_BYTES_PER_S = 1e9  # loading weights, writing checkpoints
COMPILE_SPEEDUP = 0.15  # share of step time torch.compile saves (measured 1.14-1.21x on the 6.3M pretrain)
COMPILE_SECONDS = {"cuda": 40.0, "cpu": 30.0}  # one-off compile of forward + backward


@dataclass
class Calibration:
    """What --probe measured on the present device for one stage."""

    step_seconds: float
    peak_bytes: float
    startup_seconds: float


@dataclass
class Estimate:
    stage: str
    kind: str
    device: str
    precision: str
    params: int
    trainable: int
    memory: dict[str, float]
    peak_memory_bytes: float
    device_memory_bytes: float
    fits: bool
    tokens_per_step: int
    flops_per_step: float
    step_seconds: float
    steps: int
    wall_seconds: float
    tokens_total: int
    advice: str = ""
    smallest_device: str | None = None
    serve: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    probe: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def precision_on(w: Workload, dev: Device) -> str:
    if w.precision == "auto":
        return "bf16" if dev.kind == "cuda" else "fp32"
    return "bf16" if w.precision in ("bf16", "fp16") else "fp32"


def _weights_bytes(w: Workload, dev: Device) -> float:
    """The resident weights: fp32 everywhere, but QLoRA's frozen linear layers in 4-bit NF4."""
    s = w.shape
    if w.method != "qlora":
        return (s.params + (w.trainable if w.method != "none" else 0)) * F.FP32
    quantised = s.matmul_params - s.head_params
    return quantised * F.NF4_DOUBLE_QUANT_BYTES + (s.params - quantised + w.trainable) * F.FP32


def memory(w: Workload, dev: Device, *, activations: float | None = None) -> dict[str, float]:
    """The breakdown of peak memory (bytes) per process."""
    prec = precision_on(w, dev)
    act_b = F.BF16 if prec == "bf16" else F.FP32
    shard = w.processes if (w.fsdp and w.processes > 1) else 1
    st = F.state_bytes(0, w.trainable, weight_bytes=F.FP32, grad_bytes=F.FP32)
    out = {"runtime": dev.runtime_bytes, "weights": _weights_bytes(w, dev) / shard,
           "gradients": st["gradients"] / shard, "optimizer": st["optimizer"] / shard}
    if shard > 1:  # one block gathered whole at a time
        out["fsdp_gathered_block"] = (w.shape.params / max(w.shape.n_layers, 1)) * F.FP32
    if prec == "bf16" and w.method == "none":
        out["autocast_copies"] = w.shape.matmul_params * F.BF16 / shard
    if activations is None:
        head_tokens = int(w.micro_tokens * w.head_share)
        activations = F.activation_bytes(w.shape, w.micro_tokens, head_tokens, act_b, checkpointing=w.checkpointing)
        if not w.checkpointing:
            activations += w.micro_tokens * w.adapter_act * act_b
    out["activations"] = activations
    if w.rollout is not None:
        kv = F.kv_bytes_per_token(w.shape, act_b) * min(w.rollout.max_batch, w.rollout.rows) * (
            w.rollout.prompt_tokens + w.rollout.new_tokens)
        out["rollout_kv_cache"] = kv
        # never alive with the training activations: count only what exceeds them
        out["activations"], out["rollout_kv_cache"] = (activations, 0.0) if activations >= kv else (0.0, kv)
    if w.reference == "copy":
        out["reference_model"] = w.shape.params * F.FP32
    if w.value_head:
        out["value_head"] = (w.shape.d_model + 1) * (F.FP32 * 2 + F.ADAMW_STATE_BYTES)
    if w.reward_model is not None:
        out["reward_model"] = w.reward_model.params * F.FP32
    return out


def _step_seconds(w: Workload, dev: Device, prec: str, efficiency: float) -> tuple[float, float, int]:
    """(seconds, FLOPs, tokens) of one optimizer step (one rollout step for RL) per process."""
    s = w.shape
    flops_s = dev.flops(prec) * efficiency
    trainable_mm = None if w.method == "none" else w.trainable
    per_tok = F.train_flops_per_token(s, w.seq_len, trainable_matmul=trainable_mm, checkpointing=w.checkpointing)
    launch = 3 * s.n_layers * dev.layer_overhead_s  # forward + backward per micro-batch
    optim = w.trainable * (F.FP32 * 2 + F.ADAMW_STATE_BYTES) * 2 / dev.bandwidth
    if w.rollout is None:
        tokens = w.micro_tokens * w.grad_accum
        flops = tokens * per_tok
        return flops / flops_s + w.grad_accum * launch + optim, flops, tokens
    r = w.rollout
    seq_tokens = r.rows * (r.prompt_tokens + r.new_tokens)
    fwd = F.forward_flops_per_token(s, w.seq_len)
    batches = math.ceil(r.rows / r.max_batch)
    weight_read = (s.params * F.FP32) / dev.bandwidth
    decode = batches * r.new_tokens * (max(weight_read, 2 * s.matmul_params * min(r.rows, r.max_batch) / flops_s)
                                       + s.n_layers * dev.layer_overhead_s)
    prefill = r.rows * r.prompt_tokens * fwd / flops_s
    passes = int(r.reference) + int(r.old_pass)
    micro = r.rows // w.batch * r.epochs
    score = passes * (seq_tokens * fwd / flops_s + micro / r.epochs * s.n_layers * dev.layer_overhead_s)
    update = r.epochs * seq_tokens * per_tok / flops_s + micro * launch + (micro // w.grad_accum) * optim
    rm = 0.0
    if w.reward_model is not None:
        rm = seq_tokens * 2 * w.reward_model.matmul_params / flops_s
    flops = seq_tokens * (r.epochs * per_tok + passes * fwd) + r.rows * r.new_tokens * 2 * s.matmul_params
    return decode + prefill + score + update + rm, flops, seq_tokens


def _wall_seconds(w: Workload, dev: Device, step_s: float, prec: str, efficiency: float, startup: float | None) -> float:
    """Start-up + steps + evaluations + checkpoints. A probe's measured `startup` already holds the
    first and the last evaluation."""
    s = w.shape
    evals_paid = 0 if startup is None else 2
    if startup is None:
        startup = dev.startup_s + s.params * F.FP32 / DISK_BYTES_PER_S
    evals = 0.0
    if w.rollout is None and w.eval_batches:
        n_evals = max(0, 1 + (w.steps // w.eval_every if w.eval_every else 1) - evals_paid)
        per_eval = w.eval_batches * (w.micro_tokens * F.forward_flops_per_token(s, w.seq_len) / (dev.flops(prec) * efficiency)
                                     + s.n_layers * dev.layer_overhead_s)
        evals = n_evals * per_eval
    ckpts = (w.steps // w.checkpoint_every if w.checkpoint_every else 0) + 1
    ckpt_s = ckpts * w.trainable * (F.FP32 + F.ADAMW_STATE_BYTES) / DISK_BYTES_PER_S
    return startup + w.steps * step_s + evals + ckpt_s


def estimate(w: Workload, dev: Device, *, calibration: Calibration | None = None,
             efficiency: float | None = None, context: int | None = None) -> Estimate:
    prec = precision_on(w, dev)
    eff = efficiency or MATMUL_EFFICIENCY[dev.kind]
    mem = memory(w, dev)
    step_s, flops, tokens = _step_seconds(w, dev, prec, eff)
    startup = None
    if calibration is not None:
        step_s, startup = calibration.step_seconds, calibration.startup_seconds
        mem = memory(w, dev, activations=max(0.0, mem["activations"] + calibration.peak_bytes - sum(mem.values())))
    wall = _wall_seconds(w, dev, step_s, prec, eff, startup)
    peak = sum(mem.values())
    e = Estimate(stage=w.name, kind=w.kind, device=dev.name, precision=prec, params=w.shape.params,
                 trainable=w.trainable, memory=mem, peak_memory_bytes=peak, device_memory_bytes=dev.memory_bytes,
                 fits=peak <= dev.memory_bytes, tokens_per_step=tokens, flops_per_step=flops, step_seconds=step_s,
                 steps=w.steps, wall_seconds=wall, tokens_total=tokens * w.steps, notes=list(w.notes))
    e.serve = serving(w.shape, dev, context)
    return e


def serving(shape: F.Shape, dev: Device, context: int | None = None) -> dict:
    """Generation with the trained model: KV bytes per token, the largest batch at `context`, tokens/s."""
    dtype_b = F.BF16 if dev.kind == "cuda" else F.FP32
    ctx = context or shape.context
    kv = F.kv_bytes_per_token(shape, dtype_b)
    weights = shape.params * dtype_b
    free = dev.memory_bytes - dev.runtime_bytes - weights
    max_batch = max(0, int(free // (kv * ctx)))
    flops = dev.flops("bf16" if dev.kind == "cuda" else "fp32") * MATMUL_EFFICIENCY[dev.kind]

    def tok_s(batch: int) -> float:
        # each decode step reads every weight and, on average, half of each sequence's cache, and
        # attends over that half context (4 x layers x d_model x ctx/2 FLOPs per token)
        read = (weights + batch * kv * ctx / 2) / dev.bandwidth
        work = batch * (2 * shape.matmul_params + 2 * shape.n_layers * shape.d_model * ctx) / flops
        step = max(read, work) + shape.n_layers * dev.layer_overhead_s
        return batch / step

    return {"context": ctx, "kv_bytes_per_token": kv, "weights_bytes": weights, "max_batch": max_batch,
            "tokens_per_s_batch1": tok_s(1) if max_batch else 0.0,
            "tokens_per_s_max_batch": tok_s(max_batch) if max_batch else 0.0}


def compile_choice(cfg, model, data, *, device) -> tuple[bool, str | None]:
    """`train.compile`: True/False as set; "auto" compiles when the predicted run (this model, the
    first micro-batch's tokens, max_steps) is long enough that compiling saves more than it costs.
    Returns (compile?, the sentence to log, or None when the user decided)."""
    if cfg.compile != "auto":
        return bool(cfg.compile), None
    from lmforge.estimate.devices import TABLE, present
    from lmforge.estimate.workload import shape_of_model

    first = data.batch(0, cfg.batch_size)
    ids = first.get("input_ids")
    if ids is None:
        return False, "train.compile auto: the batches carry no input_ids to predict the run from; running eagerly"
    shape = shape_of_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    method = "none" if trainable >= shape.params else "lora"
    kind = "cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    w = Workload("train", "pretrain", shape, method, trainable, precision=cfg.precision, batch=1,
                 grad_accum=cfg.grad_accum, seq_len=int(ids.shape[-1]), seqs_per_item=int(ids.numel() // ids.shape[-1]),
                 head_share=1.0, steps=cfg.max_steps, checkpointing=False)
    # A table device bounds the run from below (the fastest of the kind): if even that is long
    # enough, or the slowest plausible is too short, the matmul probe is not needed.
    fastest = max((d for d in TABLE.values() if d.kind == kind), key=lambda d: d.flops("bf16"))
    runs = [_step_seconds(w, d, precision_on(w, d), MATMUL_EFFICIENCY[kind])[0] * cfg.max_steps
            for d in (fastest, TABLE["cpu-2core"] if kind == "cpu" else TABLE["l4"])]
    if compile_pays(runs[0], kind)[0] or not compile_pays(runs[1], kind)[0]:
        seconds = runs[0] if compile_pays(runs[0], kind)[0] else runs[1]
    else:
        dev = present()
        seconds = _step_seconds(w, dev, precision_on(w, dev), MATMUL_EFFICIENCY[kind])[0] * cfg.max_steps
    verdict, why = compile_pays(seconds, kind)
    return verdict, f"train.compile auto: {why}"


def compile_pays(predicted_seconds: float, device_kind: str) -> tuple[bool, str]:
    """Whether torch.compile repays its one-off compile time over a run predicted to take this long."""
    cost = COMPILE_SECONDS.get(device_kind, 30.0)
    saved = COMPILE_SPEEDUP * predicted_seconds
    verdict = saved > cost
    why = (f"predicted run {predicted_seconds:.0f}s: compiling saves ~{saved:.0f}s against ~{cost:.0f}s of compile "
           f"time, so {'compiling' if verdict else 'running eagerly'}")
    return verdict, why
