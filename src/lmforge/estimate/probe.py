"""`lmforge estimate --probe`: three real steps of a stage on this machine, to calibrate.

The stage runs as it is configured (same model, data, batch, adapter and precision) in a child
process, into a temporary folder, with train.max_steps 3, no checkpoints and no TensorBoard. The
child reports its peak memory (`devices.read_peak`: CUDA max_memory_allocated plus the context's
resident share; CPU: the process's peak RSS, which the static runtime + tensors predict), the
per-step time of steps 2-3 from the loop's own `elapsed_s` (step 1 pays one-off warm-up), and
everything else it spent (start-up, step 1's warm-up, the first and last evaluation, the save),
which a real run pays once too.

The calibrated estimate takes the measured step time and start-up, keeps the static figures for
the rest (evaluations scaled by the measured/static step ratio), and replaces the activation
term so the peak equals the measured one; the static error is reported beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.estimate.devices import Device
from lmforge.estimate.predict import MATMUL_EFFICIENCY, Calibration, Estimate, estimate
from lmforge.estimate.workload import Workload

PROBE_STEPS = 3


def calibrate(e: Estimate, w: Workload, dev: Device, *, target, overrides: list[str], stage_kind: str | None,
              timeout: float = 1800) -> Estimate:
    if not dev.measured:
        e.notes.append(f"--probe measures this machine; skipped for the named device {dev.name}")
        return e
    m = measure(target, overrides, stage_kind, w.name, timeout=timeout)
    if "error" in m:
        e.notes.append(f"probe skipped: {m['error']}")
        return e
    ratio = m["step_seconds"] / e.step_seconds
    eff = MATMUL_EFFICIENCY[dev.kind] / ratio
    cal = estimate(w, dev, calibration=Calibration(m["step_seconds"], m["peak_bytes"], m["startup_seconds"]),
                   efficiency=eff)
    probe = {"steps": PROBE_STEPS, "measured_step_seconds": m["step_seconds"], "static_step_seconds": e.step_seconds,
             "step_error": e.step_seconds / m["step_seconds"] - 1, "measured_peak_bytes": m["peak_bytes"],
             "static_peak_bytes": e.peak_memory_bytes, "peak_error": e.peak_memory_bytes / m["peak_bytes"] - 1,
             "static_wall_seconds": e.wall_seconds, "startup_seconds": m["startup_seconds"]}
    for k in ("memory", "peak_memory_bytes", "step_seconds", "wall_seconds"):
        setattr(e, k, getattr(cal, k))
    e.fits = e.peak_memory_bytes <= dev.memory_bytes
    e.probe = probe
    return e


def measure(target, overrides: list[str], stage_kind: str | None, name: str, *, timeout: float = 1800) -> dict:
    """Run the probe child; {step_seconds, peak_bytes, startup_seconds} or {error}."""
    with tempfile.TemporaryDirectory(prefix="lmforge-probe-") as tmp:
        out = Path(tmp) / "result.json"
        spec = {"target": str(target), "overrides": list(overrides), "stage_kind": stage_kind, "name": name,
                "folder": str(Path(tmp) / "stage"), "out": str(out), "t0": time.time()}
        try:
            proc = subprocess.run([sys.executable, "-m", "lmforge.estimate.probe", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"three steps took longer than {timeout:.0f}s"}
        if out.is_file():
            return json.loads(out.read_text())
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the probe process failed ({tail})"}


def _child(spec: dict) -> dict:
    from lmforge.estimate import planned_stages
    from lmforge.estimate.devices import read_peak, reset_peak
    from lmforge.pipeline import stage_module
    from lmforge.rundir import RunDir

    cfg = kind = None
    for n, k, c, _folder in planned_stages(spec["target"], spec["overrides"], spec["stage_kind"]):
        if n == spec["name"]:
            cfg, kind = c, k
    if cfg is None:
        return {"error": f"no stage named {spec['name']!r}"}
    t = cfg.train
    t.max_steps, t.checkpoint_every, t.tensorboard, t.log_every, t.eval_every = PROBE_STEPS, 0, False, 1, 0
    if hasattr(t, "compile"):
        t.compile = False  # three steps never repay a compile; the estimate says so separately
    if hasattr(cfg, "sample_every"):
        cfg.sample_every = 0
    module = stage_module(kind)
    rd = RunDir(spec["folder"], stage=kind, artifact=module.ARTIFACT)
    reset_peak()
    module.run(cfg, rd, resume=False)
    rows = [json.loads(x) for x in rd.metrics_path.read_text().splitlines() if '"elapsed_s"' in x]
    el = [r["elapsed_s"] for r in rows]
    if len(el) < PROBE_STEPS:
        return {"error": f"the stage logged {len(el)} of {PROBE_STEPS} steps"}
    step = (el[-1] - el[0]) / (len(el) - 1)
    peak = read_peak()
    # everything but three steady steps: start-up, step 1's warm-up, the first and last evaluation, the save
    fixed = time.time() - spec["t0"] - PROBE_STEPS * step
    return {"step_seconds": step, "peak_bytes": float(peak), "startup_seconds": fixed, "elapsed": el}


def main() -> None:
    spec = json.loads(sys.argv[1])
    from lmforge.errors import LmforgeError

    try:
        result = _child(spec)
    except LmforgeError as e:
        result = {"error": str(e)}
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
