"""Benchmark of the sft stage: lmforge against TRL's SFTTrainer, and LoRA against full fine-tuning.

    python bench/bench_sft.py               # the reference sizes (minutes on 2 idle CPU cores)
    python bench/bench_sft.py --quick       # fewer steps, smaller models
    python bench/bench_sft.py --part lora   # only LoRA vs full (or --part trl)

TRL is a benchmark-only dependency (not in pyproject): `pip install trl` into the venv first
(measured with trl 1.16).

Setup, identical for both trainers: a seeded Llama-style model, one tokenizer (lmforge's BPE with
its chat template), the same single-turn conversations (variable lengths), the same batch size,
sequence length, learning rate and optimizer steps, loss on the assistant tokens only (TRL:
conversational prompt/completion rows, whose completion mask is exactly that). TRL is
configured fairly for CPU: `use_cpu=True, bf16=False` (bf16 autocast on this CPU runs ~19x
slower), no evaluation, no checkpoints, no logging integrations, dataloader in-process.

The vocabulary is realistic (8k BPE tokens over a 4,000-word random lexicon): the output
layer and the loss over it are a large share of a small model's step, as they are in practice.

Each run is its own subprocess, so peak RSS (ru_maxrss) is that run's own (for LoRA vs full,
both processes import peft, so the comparison is of training state, not of libraries).
examples/s is training examples consumed per second of the training loop (tokenisation and model loading
excluded on both sides), from the median step time, since other jobs on a shared CPU stall
single steps for seconds. Two pairings, each at the same batch size in rows:

    pad   one example per row, padded to the longest in the batch (TRL's default)
    pack  several examples per row of seq_len tokens, attention kept inside each example
          (lmforge: position ids restart; TRL: packing=True, best-fit-decreasing, padding-free)

plus lmforge's length-grouped batching (group: one example per row, batches of similar length),
with packing and grouping each compared to padding, and lmforge's default (pack) against TRL's default (pad). Then LoRA (r=16, all projections)
against full fine-tuning on a larger model (d_model 768) at batch 2, where weights, gradients
and AdamW state rather than activations dominate memory: step time and peak RSS.

Figures from a shared CPU are noisy; the ratios are the result, printed once per run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out" / "sft"

def make_rows(n: int, seed: int) -> list[dict]:
    """Single-turn conversations of random words from a 4,000-word random vocabulary (so a BPE
    vocabulary of realistic size is used): prompts of 5-120 words, answers of 2-80 words."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + "?"
        a = " ".join(rng.choice(words) for _ in range(rng.randint(2, 80))).capitalize() + "."
        rows.append({"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]})
    return rows


def prepare(args) -> dict:
    """Tokenizer, models and data on disk, shared by every run."""
    from lmforge.config import ModelSpec
    from lmforge.data.tokenizer import Config, train_tokenizer
    from lmforge.models import build_model, save_model

    OUT.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.examples, seed=0)
    data = OUT / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = (r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in rows)
    tok = train_tokenizer(texts, Config(vocab_size=args.vocab))
    models = {}
    for name, (d, layers) in {"small": (args.d_model, args.layers), "large": (args.d_large, args.layers_large)}.items():
        spec = ModelSpec(n_layers=layers, d_model=d, n_heads=max(2, d // 64), context_length=args.seq_len)
        save_model(build_model(spec, tok, seed=0), tok, OUT / f"model-{name}")
        models[name] = str(OUT / f"model-{name}")
    return {"data": str(data), **models}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_lmforge(a) -> dict:
    import torch

    if a.import_peft:  # LoRA vs full: both processes hold the same libraries, so RSS compares training state
        import peft  # noqa: F401

    from lmforge.pipeline import run_single
    from lmforge.rundir import RunDir

    torch.set_num_threads(a.threads)
    out = OUT / f"run-lmforge-{a.mode}-{a.method}-{Path(a.model).name}"
    cfg = {"data": a.data, "model": a.model, "val_fraction": 0.0, "seq_len": a.seq_len, "batching": a.mode,
           "adapter": {"method": a.method, "r": 16, "alpha": 32, "dropout": 0.0},
           "train": {"max_steps": a.steps, "batch_size": a.batch_size, "lr": 2e-4, "warmup_steps": 0,
                     "weight_decay": 0.0, "betas": [0.9, 0.999], "schedule": "linear", "min_lr_ratio": 0.0,
                     "eval_every": 0, "checkpoint_every": 0, "log_every": 1, "tensorboard": False,
                     "threads": a.threads, "seed": 0}}
    path = OUT / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    m = run_single("sft", str(path), [], out=str(out), force=True, resume=False, echo=lambda *x: None)
    s = m["summary"]
    rows = [r for r in RunDir(out, "sft", "model").read_metrics() if "loss" in r]
    seen = s["examples_seen"]
    step_s = median_step([r["elapsed_s"] for r in rows])
    return {"examples_per_s": seen / s["steps"] / step_s, "step_s": step_s, "peak_rss_mb": peak_rss_mb(),
            "first_loss": rows[0]["loss"], "examples": seen}


def median_step(elapsed: list[float]) -> float:
    """Median time between consecutive steps (the first step, which warms up, is left out).

    The CPU is shared with other jobs: a median is robust to the seconds-long stalls they cause,
    which a mean over a few steps is not."""
    gaps = sorted(b - a for a, b in zip(elapsed, elapsed[1:]))
    return gaps[len(gaps) // 2]


def child_trl(a) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    packing = a.mode == "pack"
    cfg = SFTConfig(
        output_dir=str(OUT / f"run-trl-{a.mode}"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1, max_steps=a.steps,
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", max_length=a.seq_len, packing=packing, completion_only_loss=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", dataloader_num_workers=0,
        seed=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    rows_per_example = 1.0
    if packing:  # examples per packed row, from TRL's own packed dataset
        lens = trainer.train_dataset["seq_lengths"]
        rows_per_example = sum(len(x) for x in lens) / len(lens)
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.time())

    trainer.add_callback(Clock())
    trainer.train()
    seen = a.steps * a.batch_size * rows_per_example
    step_s = median_step(stamps)
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {"examples_per_s": seen / a.steps / step_s, "step_s": step_s, "peak_rss_mb": peak_rss_mb(),
            "first_loss": first, "examples": seen}


def run_child(kind: str, mode: str, method: str, model: str, args, data: str, import_peft: bool = False,
              batch_size: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--mode", mode, "--method", method, "--model", model,
           "--data", data, "--steps", str(args.steps), "--batch-size", str(batch_size or args.batch_size),
           "--seq-len", str(args.seq_len), "--threads", str(args.threads)] + (["--import-peft"] if import_peft else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} {mode} {method} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {kind:8s} {mode:4s} {method:5s} {Path(model).name:12s} {res['examples_per_s']:8.1f} ex/s  "
          f"{res['step_s']:6.3f} s/step  peak RSS {res['peak_rss_mb']:7.0f} MB  first loss {res['first_loss']:.3f}",
          flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Fewer steps and smaller models.")
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-large", type=int, default=768)
    p.add_argument("--layers-large", type=int, default=4)
    p.add_argument("--batch-large", type=int, default=2,
                   help="LoRA vs full batch size: small, so that weights and optimizer state dominate memory as "
                   "they do for the billion-parameter models LoRA is for")
    p.add_argument("--part", choices=["all", "trl", "lora"], default="all", help="Run only one comparison.")
    p.add_argument("--threads", type=int, default=2)
    # child-process arguments
    p.add_argument("--child", choices=["lmforge", "trl"])
    p.add_argument("--mode", default="pad")
    p.add_argument("--method", default="none")
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--import-peft", action="store_true")
    args = p.parse_args()
    if args.child:
        res = child_lmforge(args) if args.child == "lmforge" else child_trl(args)
        print(json.dumps(res))
        return
    if args.quick:
        args.steps, args.examples, args.d_large = 10, 600, 256
    import trl  # noqa: F401  (fail now, not after the lmforge runs)

    t0 = time.time()
    paths = prepare(args)
    print(f"sft benchmark: {args.examples} conversations, batch {args.batch_size}, seq_len {args.seq_len}, "
          f"{args.steps} steps, {args.threads} threads, trl {sys.modules['trl'].__version__}")
    res = {}
    if args.part in ("all", "trl"):
        for mode in ("pad", "pack"):
            for kind in ("lmforge", "trl"):
                res[kind, mode] = run_child(kind, mode, "none", paths["small"], args, paths["data"])
        res["lmforge", "group"] = run_child("lmforge", "group", "none", paths["small"], args, paths["data"])
        print("\nratios (lmforge / TRL; > 1 = lmforge faster; RSS < 1 = lmforge smaller)")
        for mode in ("pad", "pack"):
            a, b = res["lmforge", mode], res["trl", mode]
            print(f"  {mode:4s} vs {mode:4s}: examples/s x{a['examples_per_s'] / b['examples_per_s']:.2f}  "
                  f"peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
        for mode in ("group", "pack"):
            a, b = res["lmforge", mode], res["lmforge", "pad"]
            print(f"  lmforge {mode} vs lmforge pad: examples/s x{a['examples_per_s'] / b['examples_per_s']:.2f}  "
                  f"peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
        a, b = res["lmforge", "pack"], res["trl", "pad"]
        print(f"  defaults (lmforge pack vs TRL pad): examples/s x{a['examples_per_s'] / b['examples_per_s']:.2f}  "
              f"peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}   (target: >= 1.5x, RSS <= 1.0x)")
    if args.part in ("all", "lora"):
        print(f"\nLoRA (r=16, all projections) vs full fine-tuning, {Path(paths['large']).name}, batch {args.batch_large}:")
        for method in ("none", "lora"):
            res["large", method] = run_child("lmforge", "pack", method, paths["large"], args, paths["data"],
                                             import_peft=True, batch_size=args.batch_large)
        full, lora = res["large", "none"], res["large", "lora"]
        print(f"  LoRA / full: step time x{lora['step_s'] / full['step_s']:.2f}, peak RSS "
              f"x{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f} ({lora['peak_rss_mb']:.0f} MB vs "
              f"{full['peak_rss_mb']:.0f} MB)")
    print(f"(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
