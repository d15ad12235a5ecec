"""Pre-training throughput: lmforge's pretrain stage against a plain Hugging Face `Trainer`.

    python bench/bench_pretrain.py                          # both sizes, 3 interleaved rounds
    python bench/bench_pretrain.py --size small --rounds 5  # one size
    python bench/bench_pretrain.py --compile                # also lmforge with train.compile=true
    python bench/bench_pretrain.py --threads 1              # OMP_NUM_THREADS for every run
    python bench/bench_pretrain.py --precision bf16         # both sides in bf16 autocast (CPUs with AMX)

Both sides train the identical model (lmforge's `build_model`: a `transformers` Llama, same
config, same seeded initialisation) on the same tokens (tinyshakespeare's first 90%, byte-level
tokenizer: 256 bytes + lmforge's special tokens), with the same batch, sequence length,
optimizer settings (AdamW, betas, weight decay, warmup + cosine, clipping at 1.0) and steps.

  reference  `transformers.Trainer`, configured fairly: use_cpu=True, fp32, no eval, no saving,
             report_to=[], dataloader_num_workers=0, logging every `warmup` steps, its default
             optimizer (adamw_torch_fused), the default collator over a Dataset of blocks, the
             model computing its own loss from `labels` (the usual HF recipe).
  lmforge    the real `lmforge pretrain CONFIG.yaml` CLI, logging every `warmup` steps, no
             checkpoints, no evaluation split, no TensorBoard. Its run folder starts with the
             reference's token file (the stage reuses a token file it finds), so both sides train
             on the same tokens and neither process spends time or memory tokenising.

Each side runs in its own subprocess, so its peak RSS (`wait4` rusage of that child alone) is
its own. Sides alternate (ref, lmforge, ref, lmforge, ...) and medians are reported, so a busy
neighbour on a shared machine hurts both alike; the load average around each run and the
spread over rounds are printed as the noise. Timing covers `steps` optimizer steps after
`warmup` untimed ones, from timestamps taken once per step inside each child (the Trainer: a
callback at each step end; lmforge: when the loop fetches each step's batch). Besides wall-clock
tokens/s, tokens per CPU-second of the child is reported: with --threads 1 it barely moves
when other processes share the cores, so it is the steadier figure on a busy machine.

MFU = tokens/s x 6 x parameters / peak FLOP/s, the peak being the best of several timed
2048x2048 matmuls in the run's precision (fp32, or bf16 with --precision bf16) with the
children's thread count.

--precision bf16 runs both sides under bf16 autocast (the Trainer with bf16=True, lmforge with
train.precision=bf16; fp32 master weights and optimizer on both). It is a separate comparison,
not the fp32 one the targets are stated for: on a CPU with AMX (Sapphire Rapids and later) bf16
matmuls run several times faster than fp32 ones. 6N counts the matmul
FLOPs of forward + backward, not attention's T^2 part (work the model does that MFU does not
credit: ~16% on top of 6N for the medium model).

Results go to bench/out/bench_pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
DEFAULT_TEXT = REPO / ".." / "shared" / "data" / "tinyshakespeare.txt"
SEED = 1337

# name -> (model spec, seq_len, batch, default timed steps, default warmup steps)
SIZES = {
    # nanoGPT's CPU shakespeare_char example: 4 layers, 4 heads, 128 wide, context 64, batch 12.
    "small": ({"n_layers": 4, "d_model": 128, "n_heads": 4, "context_length": 64}, 64, 12, 150, 10),
    "medium": ({"n_layers": 8, "d_model": 256, "n_heads": 4, "context_length": 256}, 256, 12, 20, 4),
}
OPTIM = {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0, "warmup_steps": 5, "eps": 1e-8}


# ------------------------------------------------------------------------------ shared inputs


def prepare(work: Path, text_path: Path) -> tuple[Path, Path]:
    """Curated folder (a train split only: neither side evaluates) and the byte tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmforge.data.chat import SPECIAL_TOKENS
    from lmforge.data.packing import token_file
    from lmforge.data.tokenizer import N_BYTES, Config, load_tokenizer, train_tokenizer

    data, tok_dir = work / "data", work / "tokenizer"
    text = text_path.read_text(encoding="utf-8")
    train_text = text[: int(0.9 * len(text))]  # nanoGPT's split: the first 90% trains
    data.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": [train_text]}), data / "train-00000.parquet")
    # vocab 256 + specials: a pure byte tokenizer (no merges), as nanoGPT's char model.
    tok = train_tokenizer(iter([train_text]), Config(vocab_size=N_BYTES + len(SPECIAL_TOKENS)))
    tok.save_pretrained(str(tok_dir))
    shutil.rmtree(work / "tokens", ignore_errors=True)
    token_file(data, "train", load_tokenizer(tok_dir), work / "tokens")  # what the reference reads
    return data, tok_dir


# ------------------------------------------------------------------------------ the two sides


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_reference(args) -> dict:
    """A plain `transformers.Trainer` run (runs inside its own subprocess)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from lmforge.config import ModelSpec
    from lmforge.data.packing import load_tokens
    from lmforge.models import build_model  # the same HF config and seeded init as lmforge's side

    spec, seq_len, batch, _, _ = SIZES[args.size]
    tok = AutoTokenizer.from_pretrained(str(args.work / "tokenizer"))
    model = build_model(ModelSpec(**spec), tok, seed=SEED)
    tokens = load_tokens(args.work / "tokens" / "train.bin")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return (len(tokens) - 1) // seq_len

        def __getitem__(self, i):
            ids = torch.from_numpy(tokens[i * seq_len : (i + 1) * seq_len].astype(np.int64))
            return {"input_ids": ids, "labels": ids}  # the model shifts labels itself

    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            stamps.append(stamp())

    total = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=str(args.work / "hf-out"), use_cpu=True, fp16=False, seed=SEED,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=total,
        learning_rate=OPTIM["lr"], adam_beta1=OPTIM["betas"][0], adam_beta2=OPTIM["betas"][1],
        adam_epsilon=OPTIM["eps"], weight_decay=OPTIM["weight_decay"], max_grad_norm=OPTIM["grad_clip"],
        lr_scheduler_type="cosine", warmup_steps=OPTIM["warmup_steps"],
        bf16=args.precision == "bf16",
        dataloader_num_workers=0, eval_strategy="no", save_strategy="no", report_to=[],
        logging_steps=args.warmup, disable_tqdm=True,
    )
    Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[Stamp()]).train()
    (w0, c0), (w1, c1) = stamps[args.warmup - 1], stamps[total - 1]  # ends of steps warmup and total
    return {"wall_s": w1 - w0, "cpu_s": c1 - c0, "optim": targs.optim, "threads": torch.get_num_threads()}


def run_lmforge(args) -> dict:
    """`lmforge pretrain CONFIG --out RUN` as the CLI runs it, plus one timestamp per step.

    The stamp is taken when the loop fetches a step's batch (PackedBlocks.batch, once per step at
    grad_accum 1); the run has one extra step so that the stamps at the starts of steps
    warmup+1 and warmup+steps+1 bound exactly `steps` steps.
    """
    from lmforge import cli
    from lmforge.data import packing

    stamps: list[tuple[float, float]] = []
    fetch = packing.PackedBlocks.batch

    def timed_batch(self, start, size):
        stamps.append(stamp())
        return fetch(self, start, size)

    packing.PackedBlocks.batch = timed_batch
    sys.argv = ["lmforge", "pretrain", str(args.config), "--out", str(args.run_dir), "--force"]
    try:
        cli.main()
    except SystemExit as e:
        if e.code:
            raise
    import torch

    (w0, c0), (w1, c1) = stamps[args.warmup], stamps[args.warmup + args.steps]
    return {"wall_s": w1 - w0, "cpu_s": c1 - c0, "threads": torch.get_num_threads()}


def lmforge_config(args, data: Path, tok_dir: Path, compile_: bool) -> dict:
    spec, seq_len, batch, _, _ = SIZES[args.size]
    train = {
        "seed": SEED, "max_steps": args.warmup + args.steps + 1, "batch_size": batch, "grad_accum": 1,
        "lr": OPTIM["lr"], "betas": OPTIM["betas"], "eps": OPTIM["eps"], "weight_decay": OPTIM["weight_decay"],
        "grad_clip": OPTIM["grad_clip"], "warmup_steps": OPTIM["warmup_steps"], "schedule": "cosine",
        "precision": args.precision, "eval_every": 0, "checkpoint_every": 0, "log_every": args.warmup,
        # the plain side keeps the default, train.compile auto (compiles if the predicted run repays it)
        "tensorboard": False, "compile": True if compile_ else "auto",
    }
    return {"data": str(data), "tokenizer": str(tok_dir), "model": spec, "seq_len": seq_len, "train": train}


# ------------------------------------------------------------------------------ orchestration


def child(cmd: list[str], env: dict, log: Path) -> tuple[int, str, str, float]:
    """Run `cmd`; return (exit code, stdout, stderr, its own peak RSS in MiB).

    wait4 gives the rusage of this child alone (RUSAGE_CHILDREN would be the maximum over every
    child so far). Output goes to files, not pipes: `communicate()` would reap the child first.
    """
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), out_path.read_text(), err_path.read_text(), usage.ru_maxrss / 1024


def peak_matmul_flops(precision: str = "fp32", n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """Best FLOP/s of an n x n matmul in `precision`: the machine's practical peak for these threads."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t))
    return best


def bench_size(args, data: Path, tok_dir: Path, params: int, env: dict) -> dict:
    import yaml

    _, seq_len, batch, _, _ = SIZES[args.size]
    sides = ["reference", "lmforge"] + (["lmforge+compile"] if args.compile else [])
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    common = ["--size", args.size, "--steps", str(args.steps), "--warmup", str(args.warmup), "--work", str(args.work),
              "--precision", args.precision]
    tokens = batch * seq_len * args.steps
    for r in range(args.rounds):
        for side in sides:
            if side == "reference":
                cmd = [sys.executable, __file__, "--child", "reference", *common]
            else:
                cfg = args.work / f"{args.size}-{side}.yaml"
                cfg.write_text(yaml.safe_dump(lmforge_config(args, data, tok_dir, side.endswith("compile"))))
                run_dir = args.work / f"run-{args.size}-{side}"
                shutil.rmtree(run_dir, ignore_errors=True)
                # The reference's token file, where the stage looks for its own: both sides train on
                # the same tokens and neither tokenises inside the measured process.
                shutil.copytree(args.work / "tokens", run_dir / "tokens")
                cmd = [sys.executable, __file__, "--child", "lmforge", *common, "--config", str(cfg),
                       "--run-dir", str(run_dir)]
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            rc, out, err, rss = child(cmd, env, args.work / f"{args.size}-{side}")
            if rc != 0:
                sys.exit(f"{side} failed (exit {rc}):\n{err[-3000:]}")
            res = json.loads(out.strip().splitlines()[-1])
            res.update(peak_rss_mib=rss, process_s=time.perf_counter() - t, load=[load0, os.getloadavg()[0]])
            runs[side].append(res)
            print(f"  [{args.size} round {r + 1}] {side:16s} {tokens / res['wall_s']:9.0f} tok/s "
                  f"{tokens / res['cpu_s']:9.0f} tok/CPU-s  peak RSS {rss:5.0f} MiB  whole run {res['process_s']:5.1f} s  "
                  f"load {load0:.1f}->{res['load'][1]:.1f}", flush=True)
    out = {"params": params, "seq_len": seq_len, "batch": batch, "steps": args.steps, "warmup": args.warmup,
           "tokens_timed": tokens, "sides": {}}
    for s in sides:
        tps = [tokens / x["wall_s"] for x in runs[s]]
        med = statistics.median(tps)
        out["sides"][s] = {
            "tokens_per_s": med,
            "tokens_per_cpu_s": statistics.median(tokens / x["cpu_s"] for x in runs[s]),
            "spread": (max(tps) - min(tps)) / med,  # the noise: (max - min) / median over rounds
            "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in runs[s]),
            "whole_run_s": statistics.median(x["process_s"] for x in runs[s]),
            "runs": runs[s],
        }
    ref = out["sides"]["reference"]
    for s in sides[1:]:
        v = out["sides"][s]
        v["speedup"] = v["tokens_per_s"] / ref["tokens_per_s"]
        v["speedup_cpu"] = v["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"]
        v["rss_ratio"] = v["peak_rss_mib"] / ref["peak_rss_mib"]
    return out


def print_table(results: dict, peak: float, precision: str) -> None:
    print(f"\npeak {precision} matmul (2048x2048, best of 10 trials): {peak / 1e9:.1f} GFLOP/s")
    head = (f"{'size':7s} {'params':>9s} {'side':16s} {'tok/s':>8s} {'noise':>6s} {'speedup':>8s} {'tok/CPU-s':>10s} "
            f"{'speedup':>8s} {'peak RSS':>9s} {'RSS ratio':>9s} {'MFU':>6s}")
    print(head + "\n" + "-" * len(head))
    for size, r in results.items():
        for s, v in r["sides"].items():
            sp = f"{v['speedup']:.2f}x" if "speedup" in v else ""
            spc = f"{v['speedup_cpu']:.2f}x" if "speedup_cpu" in v else ""
            rr = f"{v['rss_ratio']:.2f}" if "rss_ratio" in v else ""
            print(f"{size:7s} {r['params']:9,d} {s:16s} {v['tokens_per_s']:8.0f} {v['spread']:6.0%} {sp:>8s} "
                  f"{v['tokens_per_cpu_s']:10.0f} {spc:>8s} {v['peak_rss_mib']:7.0f}Mi {rr:>9s} {v['mfu']:6.1%}")
    print("tok/s and peak RSS are medians over rounds; noise = (max - min) / median of tok/s over rounds.")
    print(f"MFU = tok/s x 6 x params / peak {precision} matmul FLOP/s.")


def run_setup(args) -> dict:
    """Data, tokenizer, token file, parameter counts and the matmul peak (inside a subprocess)."""
    import torch

    from lmforge.config import ModelSpec
    from lmforge.models import build_model, count_parameters

    data, tok_dir = prepare(args.work, args.text)
    from lmforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    params = {k: count_parameters(build_model(ModelSpec(**v[0]), tok, seed=SEED))[0] for k, v in SIZES.items()}
    return {"data": str(data), "tokenizer": str(tok_dir), "params": params, "peak_flops": peak_matmul_flops(args.precision),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=[*SIZES, "both"], default="both")
    ap.add_argument("--steps", type=int, default=None, help="Timed steps per run (default per size).")
    ap.add_argument("--warmup", type=int, default=None, help="Untimed steps before timing (default per size).")
    ap.add_argument("--rounds", type=int, default=3, help="Interleaved runs of each side; medians are reported.")
    ap.add_argument("--compile", action="store_true", help="Also run lmforge with train.compile=true.")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: torch's).")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="Both sides' precision (bf16 = autocast; a separate comparison from the fp32 targets).")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="Plain-text training data.")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "pretrain-work")
    ap.add_argument("--child", choices=["reference", "lmforge", "setup", "peak"], help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        run = {"reference": run_reference, "lmforge": run_lmforge, "setup": run_setup,
               "peak": lambda a: {"peak_flops": peak_matmul_flops(a.precision)}}[args.child]
        print(json.dumps(run(args)))
        return

    # This process imports neither torch nor transformers: a child's peak RSS (ru_maxrss) starts
    # from what it inherits at fork, so a heavy parent would set every child's floor.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    helper = [sys.executable, __file__, "--work", str(args.work), "--text", str(args.text), "--precision",
              args.precision, "--child"]
    rc, out, err, _ = child([*helper, "setup"], env, args.work / "setup")
    if rc != 0:
        sys.exit(f"setup failed (exit {rc}):\n{err[-3000:]}")
    setup = json.loads(out.strip().splitlines()[-1])
    data, tok_dir = Path(setup["data"]), Path(setup["tokenizer"])
    results = {}
    for size in (list(SIZES) if args.size == "both" else [args.size]):
        sub = argparse.Namespace(**vars(args))
        sub.size = size
        sub.steps = args.steps or SIZES[size][3]
        sub.warmup = args.warmup or SIZES[size][4]
        params = setup["params"][size]
        print(f"{size}: {params:,} parameters, batch {SIZES[size][2]} x {SIZES[size][1]} tokens, "
              f"{sub.steps} timed steps after {sub.warmup}, {setup['threads']} threads", flush=True)
        results[size] = bench_size(sub, data, tok_dir, params, env)
    rc, out, _, _ = child([*helper, "peak"], env, args.work / "peak")  # again after the runs: the better
    peak = max(setup["peak_flops"], json.loads(out.strip().splitlines()[-1])["peak_flops"] if rc == 0 else 0.0)
    for r in results.values():
        for v in r["sides"].values():
            v["mfu"] = v["tokens_per_s"] * 6 * r["params"] / peak
    print_table(results, peak, args.precision)
    out_path = ROOT / "out" / f"bench_pretrain{'' if args.precision == 'fp32' else '-' + args.precision}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"precision": args.precision, "peak_flops": peak, "threads": setup["threads"],
                                    "results": results}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
