"""What to change when a stage does not fit: the first change (in order of how little it changes the
training) that brings the predicted peak under the device's memory, with its predicted effect.

    1. a smaller micro-batch with more accumulation (same update, more steps of work per update)
    2. gradient checkpointing (sft: ~1/3 more compute)
    3. bf16 autocast (halves activations)
    4. a LoRA adapter, then QLoRA (a 4-bit base)
    5. FSDP over N processes (pretrain and full-fine-tuning sft)

If no single change is enough, they are combined in that order; if even that is not enough, the
answer says so with the memory the stage needs.
"""

from __future__ import annotations

from typing import Callable

from lmforge.estimate.devices import GB, TABLE, Device
from lmforge.estimate.predict import estimate
from lmforge.estimate.workload import Workload

Change = tuple[str, Callable[[Workload], Workload | None]]


def _smaller_batch(w: Workload, factor: int) -> Workload | None:
    if w.batch < factor or w.batch % factor:
        return None
    return w.with_(batch=w.batch // factor, grad_accum=w.grad_accum * factor)


def _families(w: Workload) -> list[list[Change]]:
    """Changes in order; each family's options from the mildest to the strongest."""
    batch = [(f"train.batch_size={w.batch // f} train.grad_accum={w.grad_accum * f}",
              lambda x, f=f: _smaller_batch(x, f)) for f in (2, 4, 8, 16, 32, 64) if w.batch % f == 0 and w.batch >= f]
    out = [batch]
    if w.kind == "sft" and not w.checkpointing:
        out.append([("gradient_checkpointing=true", lambda x: x.with_(checkpointing=True))])
    if w.precision == "fp32":
        out.append([("train.precision=bf16", lambda x: x.with_(precision="bf16"))])
    if w.kind in ("sft", "dpo", "reward", "ppo", "grpo") and w.method in ("none", "lora"):
        out.append([(f"adapter.method={m}", lambda x, m=m: _adapter(x, m))
                    for m in ("lora", "qlora") if not (m == "lora" and w.method == "lora")])
    if w.kind in ("pretrain", "sft") and w.method == "none":
        out.append([(f"train.fsdp=true over {n} processes", lambda x, n=n: x.with_(fsdp=True, processes=n))
                    for n in (2, 4, 8, 16, 32, 64)])
    return [f for f in out if f]


def _adapter(w: Workload, method: str) -> Workload:
    from lmforge.adapters import AdapterConfig
    from lmforge.estimate.workload import adapter_activation, trainable_of

    ref = "adapter-off" if w.reference == "copy" else w.reference
    spec = AdapterConfig(method=method)
    return w.with_(method=method, trainable=trainable_of(w.shape, spec), adapter_act=adapter_activation(w.shape, spec),
                   reference=ref)


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


def advise(w: Workload, dev: Device) -> str:
    """One sentence: "fits", or the change that makes it fit and its effect, or what it needs."""
    base = estimate(w, dev)
    if base.fits:
        return f"fits ({_gb(base.peak_memory_bytes)} of {_gb(dev.memory_bytes)})"
    families = _families(w)
    for label, apply in (c for fam in families for c in fam):
        w2 = apply(w)
        if w2 is not None and (e := estimate(w2, dev)).fits:
            return (f"does not fit ({_gb(base.peak_memory_bytes)} > {_gb(dev.memory_bytes)}); set {label}: peak "
                    f"{_gb(e.peak_memory_bytes)}, step time x{e.step_seconds / base.step_seconds:.2f}")
    combined, labels = w, []
    for fam in families:  # together, in order: each family's mildest option that fits, else its strongest
        options = [(label, w2) for label, apply in fam if (w2 := apply(combined)) is not None]
        if not options:
            continue
        label, combined = next(((lb, x) for lb, x in options if estimate(x, dev).fits), options[-1])
        labels.append(label)
        e = estimate(combined, dev)
        if e.fits:
            return (f"does not fit ({_gb(base.peak_memory_bytes)} > {_gb(dev.memory_bytes)}); set "
                    f"{', '.join(labels)}: peak {_gb(e.peak_memory_bytes)}, step time "
                    f"x{e.step_seconds / base.step_seconds:.2f}")
    return f"does not fit ({_gb(base.peak_memory_bytes)} > {_gb(dev.memory_bytes)}) with any change listed here"


def smallest_device(w: Workload) -> str:
    """The smallest listed device the stage fits on as configured, or how much it needs."""
    fits = []
    for d in TABLE.values():
        e = estimate(w, d)
        if e.fits:
            fits.append((d.memory_bytes, d.name))
    if fits:
        return min(fits)[1]
    largest = max(TABLE.values(), key=lambda d: d.memory_bytes)
    need = estimate(w, largest).peak_memory_bytes
    return f"none listed (needs {_gb(need)}; the largest, {largest.name}, has {_gb(largest.memory_bytes)})"
