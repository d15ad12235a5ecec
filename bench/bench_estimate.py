"""`lmforge estimate` against measurement: predicted vs measured peak memory and wall time.

    python bench/bench_estimate.py                         # three sizes, every stage, static + --probe
    python bench/bench_estimate.py --sizes tiny,small      # fewer sizes
    python bench/bench_estimate.py --no-probe              # the static estimate only

For each size (tiny 2x64, small 4x128, medium 8x256 Llamas) the stages pretrain, sft (full),
sft (LoRA), dpo (LoRA) and grpo (LoRA) run on the built-in world's data, each from its own
config (`lmforge <stage> CONFIG --out DIR`, the later ones starting from that size's pretrained
model) in a fresh process: that process's peak RSS (wait4's rusage of the child) and wall time
(start to exit, imports included — the estimate's wall includes start-up) are the measured
figures. Before it runs, the same config is estimated (`lmforge estimate CONFIG --stage KIND
--json`) statically and with `--probe` (three real steps in their own process). Targets (issue 18): peak memory within +-20% and wall
time within +-30% with the probe; the static error is reported as it is.

Results: bench/out/bench_estimate.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
SIZES = {
    "tiny": {"n_layers": 2, "d_model": 64, "n_heads": 4, "context_length": 128},
    "small": {"n_layers": 4, "d_model": 128, "n_heads": 4, "n_kv_heads": 2, "context_length": 256},
    "medium": {"n_layers": 8, "d_model": 256, "n_heads": 4, "context_length": 256},
}


def base_stages(work: Path) -> list[dict]:
    return [
        {"stage": "world", "seed": 1234},
        {"stage": "curate", "inputs": ["@world/pretrain/corpus.jsonl"],
         "splits": {"train": 0.95, "validation": 0.05, "test": 0.0},
         "quality": {"min_stop_words": 2, "max_top_ngram_frac": {2: 0.3, 3: 0.25, 4: 0.2}}},
        {"stage": "tokenizer", "corpus": ["@world/tokenizer/corpus.jsonl"], "vocab_size": 1024},
    ]


def size_stages(base: Path, out: Path, spec: dict, steps: dict) -> list[tuple[str, str, dict]]:
    """(name, stage type, config) per stage; every stage after pretrain starts from its model."""
    world = base / "world" / "world"
    model = str(out / "pretrain")
    common = {"log_every": 5, "checkpoint_every": 0, "tensorboard": False}
    lora = {"method": "lora", "r": 16, "alpha": 32}
    return [
        ("pretrain", "pretrain", {"data": str(base / "curate"), "tokenizer": str(base / "tokenizer"), "model": spec,
                                  "train": {"max_steps": steps["pretrain"], "batch_size": 16, "eval_every": 0,
                                            "eval_batches": 5, **common}}),
        ("sft_full", "sft", {"model": model, "data": [str(world / "sft" / "train.jsonl")],
                             "train": {"max_steps": steps["sft"], "batch_size": 16, "eval_every": 0, "eval_batches": 5,
                                       **common}}),
        ("sft_lora", "sft", {"model": model, "data": [str(world / "sft" / "train.jsonl")], "adapter": lora,
                             "train": {"max_steps": steps["sft"], "batch_size": 16, "eval_every": 0, "eval_batches": 5,
                                       **common}}),
        ("dpo", "dpo", {"model": model, "data": [str(world / "preference" / "train.jsonl")], "method": "rpo",
                        "adapter": lora, "train": {"max_steps": steps["dpo"], "batch_size": 8, "eval_every": 0,
                                                   "eval_batches": 5, **common}}),
        ("grpo", "grpo", {"model": model, "prompts": [str(world / "grpo" / "prompts.jsonl")],
                          "rewards": [{"kind": "answer"}], "group_size": 8, "prompts_per_step": 8,
                          "rollout": {"max_new_tokens": 16}, "adapter": lora, "sample_every": 0,
                          "train": {"max_steps": steps["grpo"], "batch_size": 32, **common}}),
    ]


def write_recipe(path: Path, name: str, out_dir: Path, stages: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "out_dir": str(out_dir), "stages": stages}, sort_keys=False))
    return path


def run_measured(args: list[str], env: dict) -> tuple[float, float, int]:
    """(peak RSS bytes, wall seconds, exit status) of `lmforge ARGS` in its own process."""
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t
    if status:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return usage.ru_maxrss * 1024.0, wall, status


def estimate_stage(cfg: Path, kind: str, probe: bool, env: dict) -> dict:
    """`lmforge estimate CONFIG --stage KIND --json` (and with --probe), as a user runs it."""
    def cli(*extra: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "lmforge.cli", "estimate", str(cfg), "--stage", kind, "--json",
                              *extra], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"estimate failed: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)[0]

    e = cli()
    out = {"static_peak": e["peak_memory_bytes"], "static_wall": e["wall_seconds"], "static_step": e["step_seconds"]}
    if probe:
        p = cli("--probe")
        out.update(probe_peak=p["peak_memory_bytes"], probe_wall=p["wall_seconds"], probe_step=p["step_seconds"],
                   probe_notes=p["notes"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small,medium")
    ap.add_argument("--work", default=str(ROOT / "out" / "estimate_work"))
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--steps", default="pretrain=40,sft=30,dpo=20,grpo=4", help="max_steps per stage kind.")
    args = ap.parse_args()
    steps = {k: int(v) for k, v in (x.split("=") for x in args.steps.split(","))}
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base = write_recipe(work / "base.yaml", "base", work, base_stages(work))
    _, _, st = run_measured(["run", str(base)], env)
    if st:
        raise SystemExit("the base stages (world, curate, tokenizer) failed")
    rows = []
    for size in args.sizes.split(","):
        for name, kind, cfg in size_stages(work / "base", work / size, SIZES[size], steps):
            path = work / f"{size}_{name}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            est = estimate_stage(path, kind, not args.no_probe, env)
            peak, wall, st = run_measured([kind, str(path), "--out", str(work / size / name), "--force"], env)
            row = {"size": size, "stage": name, "measured_peak": peak, "measured_wall": wall, "status": st,
                   "load": os.getloadavg()[0], **est}
            rows.append(row)
            print(_line(row), flush=True)
            out = ROOT / "out" / "bench_estimate.json"  # after every row: a long run interrupted keeps its rows
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {ROOT / 'out' / 'bench_estimate.json'}")


def _err(pred: float | None, real: float) -> str:
    return "   n/a" if pred is None else f"{pred / real - 1:+6.0%}"


def _line(r: dict) -> str:
    mb = 1e6
    return (f"{r['size']:7s} {r['stage']:9s} peak {r['measured_peak'] / mb:7.0f} MB: static {_err(r['static_peak'], r['measured_peak'])}"
            f" probe {_err(r.get('probe_peak'), r['measured_peak'])} | wall {r['measured_wall']:6.1f} s: static "
            f"{_err(r['static_wall'], r['measured_wall'])} probe {_err(r.get('probe_wall'), r['measured_wall'])}"
            f" | load {r['load']:.1f}{' FAILED' if r['status'] else ''}")


if __name__ == "__main__":
    main()
