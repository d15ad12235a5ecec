"""tinyshakespeare end to end: run recipes/shakespeare.yaml, print val bits per character and wall time.

    python bench/bench_shakespeare.py                               # the recipe as it is
    python bench/bench_shakespeare.py --text /path/to/input.txt     # another plain-text file
    python bench/bench_shakespeare.py pretrain.train.max_steps=500  # any recipe override

The recipe runs through the real CLI (`lmforge run`) in a fresh run folder under bench/out/,
so every stage runs (none is skipped as unchanged). Bits per character equal bits per byte
for ASCII text such as tinyshakespeare; both are independent of the tokenizer, so the figure
compares with nanoGPT's shakespeare_char (val loss in nats per character / ln 2): about 2.7
bits (1.88 nats) for its CPU example, which this recipe's model and schedule follow.

Results go to bench/out/bench_shakespeare.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="Recipe overrides, stage.key.path=value.")
    ap.add_argument("--text", type=Path, default=None, help="Plain-text file to train on (default: the recipe's).")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "shakespeare.yaml")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "out" / "shakespeare-runs")
    args = ap.parse_args()

    overrides = list(args.overrides)
    if args.text is not None:
        overrides.append(f"curate.inputs=[{json.dumps(str(args.text.resolve()))}]")
    shutil.rmtree(args.out_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "lmforge.cli", "run", str(args.recipe), *overrides, "--out-dir", str(args.out_dir)]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # paths relative to the repo
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"the recipe failed (exit {r.returncode})")

    name = "shakespeare"
    stages = {}
    for d in sorted((args.out_dir / name).iterdir()):
        m = d / "manifest.json"
        if m.is_file():
            stages[d.name] = json.loads(m.read_text())
    pre = stages["pretrain"]["summary"]
    evals = [json.loads(x) for x in (args.out_dir / name / "pretrain" / "metrics.jsonl").read_text().splitlines()
             if x.strip() and "val_loss" in x]
    print()
    print(f"{'step':>6s} {'val loss (nats/token)':>22s} {'val ppl':>8s} {'val bits/char':>14s}")
    for e in evals:
        print(f"{e['step']:6d} {e['val_loss']:22.4f} {e['val_ppl']:8.3f} {e['val_bpb']:14.4f}")
    print()
    for s, m in stages.items():
        print(f"{s:10s} {m.get('wall_seconds', float('nan')):7.1f} s")
    print(f"{'total':10s} {wall:7.1f} s (wall, the whole `lmforge run`)")
    print(f"\nfinal val bits per character: {pre['val_bpb']:.4f}  (val loss {pre['val_loss']:.4f} nats/token, "
          f"ppl {pre['val_ppl']:.3f}; best val loss {pre['best_val_loss']:.4f} at step {pre['best_step']}); "
          f"train {pre['tokens_per_s']:.0f} tokens/s over {pre['steps']} steps")
    out = ROOT / "out" / "bench_shakespeare.json"
    out.write_text(json.dumps({
        "val_bits_per_char": pre["val_bpb"], "val_loss": pre["val_loss"], "val_ppl": pre["val_ppl"],
        "best_val_loss": pre["best_val_loss"], "best_step": pre["best_step"],
        "best_val_bits_per_char": min(e["val_bpb"] for e in evals) if evals else math.nan,
        "wall_seconds": wall, "stage_seconds": {s: m.get("wall_seconds") for s, m in stages.items()},
        "pretrain": pre, "evals": evals, "overrides": overrides,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
