"""`lmforge estimate`: memory, time and fit of every training stage before anything runs.

    recipe / stage config ──pipeline.plan (validated)──> stage configs
        ──workload (model shape on the meta device, tokens per step)──> Workload
        ──predict (formulas x device)──> memory breakdown, FLOPs, step and wall time, serving figures
        ──advice──> "fits" or the first change that makes it fit
        ──probe (optional: three real steps here)──> calibrated figures and the static error

Modules: formulas (pure arithmetic, unit-tested), devices (table + the measured present one),
workload (configs -> workloads), predict, advice, probe.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.estimate.advice import advise, smallest_device
from lmforge.estimate.devices import GB, Device, lookup
from lmforge.estimate.predict import Estimate, estimate
from lmforge.estimate.workload import Sources, Workload, workload

__all__ = ["planned_stages", "estimate_target", "estimate_planned", "render", "stage_estimate", "Estimate"]


def planned_stages(target: str | Path, overrides: list[str], stage_kind: str | None):
    """(name, kind, cfg, stage folder) for every stage of a recipe, or for one stage config."""
    from lmforge.config import apply_overrides, load_yaml, validate
    from lmforge.pipeline import Recipe, plan, stage_module

    data = load_yaml(target)
    if "stages" in data:
        recipe = validate(Recipe, data, where=str(target))
        return [(p.name, p.kind, p.cfg, str(p.rd.path)) for p in plan(recipe, where=str(target), overrides=overrides)]
    kind = stage_kind or data.pop("stage", None)
    if kind is None:
        raise LmforgeError(f"{target} is a single stage's config; say which stage with --stage (pretrain, sft, dpo, "
                           "reward, ppo, grpo) or a top-level `stage:` key.")
    data.pop("name", None)
    module = stage_module(str(kind))
    cfg = validate(module.Config, apply_overrides(data, list(overrides)), where=str(target))
    return [(str(kind), str(kind), cfg, None)]


def _register(src: Sources, kind: str, cfg, folder: str | None, w: Workload | None) -> None:
    """What a planned stage will write, for the stages after it."""
    if folder is None:
        return
    if kind == "tokenizer":
        src.vocab[folder] = cfg.vocab_size if cfg.reuse is None else src.vocab_size(cfg.reuse)
    elif w is not None:
        src.models[folder] = w.shape


def workloads(target: str | Path, overrides: list[str] = (), *, stage_kind: str | None = None,
              processes: int = 1) -> list[tuple[str, str, Workload | None]]:
    src = Sources()
    out = []
    for name, kind, cfg, folder in planned_stages(target, list(overrides), stage_kind):
        w = workload(name, kind, cfg, src)
        if w is not None and processes > 1:
            w = w.with_(processes=processes)
        _register(src, kind, cfg, folder, w)
        out.append((name, kind, w))
    return out


def estimate_planned(w: Workload, dev: Device, *, context: int | None = None) -> Estimate:
    e = estimate(w, dev, context=context)
    e.advice = advise(w, dev)
    e.smallest_device = smallest_device(w)
    return e


def estimate_target(target: str | Path, overrides: list[str] = (), *, device: str | None = None,
                    stage_kind: str | None = None, probe: bool = False, processes: int = 1,
                    only: str | None = None, context: int | None = None) -> list[Estimate]:
    planned = workloads(target, overrides, stage_kind=stage_kind, processes=processes)
    if only is not None and only not in [n for n, _k, _w in planned]:
        raise LmforgeError(f"--only {only!r} names no stage of {target}; its stages: "
                           f"{', '.join(n for n, _k, _w in planned)}.")
    dev = lookup(device)  # after planning: the present device's runtime memory includes the stages' imports
    out = []
    for name, _kind, w in planned:
        if w is None or (only is not None and name != only):
            continue
        e = estimate_planned(w, dev, context=context)
        if probe:
            from lmforge.estimate.probe import calibrate

            e = calibrate(e, w, dev, target=target, overrides=list(overrides), stage_kind=stage_kind)
        out.append(e)
    return out


# --------------------------------------------------------------------------------------------
# Text


def _b(x: float) -> str:
    if x >= GB:
        return f"{x / GB:.2f} GB"
    return f"{x / 1e6:.1f} MB"


def _t(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{s:.1f} s"


def render(estimates: list[Estimate]) -> str:
    if not estimates:
        return "No training stage to estimate (data, tokenizer, eval and report stages train nothing)."
    lines = [f"device: {estimates[0].device}"]
    for e in estimates:
        lines.append("")
        lines.append(f"[{e.stage}] {e.kind}: {e.params:,} parameters, {e.trainable:,} trainable; {e.precision}")
        parts = ", ".join(f"{k.replace('_', ' ')} {_b(v)}" for k, v in e.memory.items() if v)
        lines.append(f"  memory: {parts}")
        lines.append(f"  peak {_b(e.peak_memory_bytes)} of {_b(e.device_memory_bytes)}: {e.advice}")
        lines.append(f"  smallest listed device it fits: {e.smallest_device}")
        lines.append(f"  {e.tokens_per_step:,} tokens and {e.flops_per_step / 1e12:.3g} TFLOP per step; step "
                     f"{e.step_seconds * 1e3:.1f} ms x {e.steps} steps; wall {_t(e.wall_seconds)} "
                     f"({e.tokens_total:,} tokens)")
        s = e.serve
        lines.append(f"  serving: KV cache {s['kv_bytes_per_token'] / 1e3:.1f} kB/token; at context {s['context']} up "
                     f"to {s['max_batch']:,} sequences; {s['tokens_per_s_batch1']:,.0f} tokens/s at batch 1, "
                     f"{s['tokens_per_s_max_batch']:,.0f} at {s['max_batch']:,}")
        if e.probe:
            p = e.probe
            lines.append(f"  probe ({p['steps']} real steps here): step {p['measured_step_seconds'] * 1e3:.1f} ms vs "
                         f"{p['static_step_seconds'] * 1e3:.1f} ms predicted ({p['step_error']:+.0%}); peak "
                         f"{_b(p['measured_peak_bytes'])} vs {_b(p['static_peak_bytes'])} ({p['peak_error']:+.0%})")
        for n in e.notes:
            lines.append(f"  note: {n}")
    return "\n".join(lines)


def stage_estimate(kind: str, cfg, *, name: str | None = None) -> tuple[dict | None, str | None]:
    """What a training stage prints at its start (predicted peak memory and wall time here) and records
    in its manifest for the report; (None, None) for a stage that trains nothing. A model this
    module cannot read gives the reason instead of stopping the run: the estimate is advice, not work."""
    try:
        w = workload(name or kind, kind, cfg, Sources())
        if w is None:
            return None, None
        # the process has started already: what is left is loading the model, the steps and evaluations
        e = estimate(w, replace(lookup(None), startup_s=0.0))
    except Exception as err:  # noqa: BLE001 - any failure here must not stop the training it describes
        return None, f"estimate unavailable ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    line = (f"estimate: peak memory {_b(e.peak_memory_bytes)} of {_b(e.device_memory_bytes)}, wall "
            f"{_t(e.wall_seconds)} ({e.steps} steps of {e.step_seconds * 1e3:.0f} ms)")
    return {"peak_memory_bytes": e.peak_memory_bytes, "wall_seconds": e.wall_seconds, "device": e.device}, line
