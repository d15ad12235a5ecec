"""DPO throughput and memory: lmforge's dpo stage against TRL's DPOTrainer, full and LoRA.

    python bench/bench_dpo.py                 # full + LoRA, one round
    python bench/bench_dpo.py --rounds 3      # medians of 3 interleaved rounds
    python bench/bench_dpo.py --only lora --steps 20

Every side trains the identical model (lmforge's `build_model`: a seeded Llama, 4 layers, 256
wide, context 256, with a 2048-token byte-level BPE trained on the world's tokenizer corpus) on
the identical data (the first steps x batch pairs of the world's preference/train.jsonl, TRL's
conversational format), with the same batch (8 pairs), beta 0.1, learning rate, AdamW and
number of steps; dropout is off on every side.

  lmforge          `lmforge dpo` (the real stage, in-process in its own child): reference
                   log-probs precomputed once, chosen + rejected in one packed forward, LM head
                   applied only at response positions.
  trl              `DPOTrainer`, configured fairly: use_cpu=True, bf16=False, report_to=[], no
                   saving, no evaluation, dataloader_num_workers=0; a reference model in memory
                   (full) or the adapter disabled (LoRA) at every step.
  trl+precompute   the same with precompute_ref_log_probs=True (its reference pass happens in the
                   trainer's constructor, before train()).

Each side runs in its own subprocess, so its peak RSS (the child's `ru_maxrss`) is its own.
Sides alternate round by round and medians are reported, so a busy neighbour on a shared
machine hurts all alike. Two speeds per side, each in wall-clock and in CPU time (with one
thread per side, CPU time hardly moves when other jobs share the cores; wall time does):

  steady pairs/s   pairs per second over `steps` optimizer steps after `warmup` untimed ones,
                   between the beginnings of steps warmup and warmup + steps (TRL: a callback's
                   on_step_begin; lmforge: when the loop asks for that step's batch)
  end-to-end       seconds from "files on disk" to "trained": loading, tokenising, the reference
                   pass, training (what a user waits for); the ratio printed is TRL / lmforge

Results go to bench/out/bench_dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
SEED = 1234
SPEC = {"n_layers": 4, "d_model": 256, "n_heads": 4, "n_kv_heads": 4, "context_length": 256}
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}
BETA, LR = 0.1, 5e-6


# ------------------------------------------------------------------------------ shared inputs


def prepare(work: Path, pairs: int) -> tuple[Path, Path]:
    """The world's preference data (first `pairs` rows) and a seeded model folder with its tokenizer."""
    from lmforge.config import ModelSpec
    from lmforge.data.formats import iter_texts
    from lmforge.data.tokenizer import Config as TokConfig
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.demo import world
    from lmforge.models import build_model, save_model

    wdir, model_dir, data = work / "world", work / "model", work / "pairs.jsonl"
    if not (wdir / "preference" / "train.jsonl").is_file():
        world.generate(world.Config(seed=7), wdir)
    rows = (wdir / "preference" / "train.jsonl").read_text().splitlines()
    if len(rows) < pairs:
        raise SystemExit(f"the world has {len(rows)} preference pairs; ask for at most that many (steps x batch)")
    data.write_text("\n".join(rows[:pairs]) + "\n")
    if not (model_dir / "config.json").is_file():
        tok = train_tokenizer(iter_texts(str(wdir / "tokenizer" / "corpus.jsonl")), TokConfig(vocab_size=2048))
        model = build_model(ModelSpec(**SPEC), tok, seed=SEED)
        save_model(model, tok, model_dir)
    return data, model_dir


# ------------------------------------------------------------------------------ the children


def child_lmforge(args) -> dict:
    import yaml

    from lmforge.data.preference import PreferenceBatches
    from lmforge.pipeline import run_single

    t0 = time.time()
    stamps: list[tuple[float, float]] = []
    original = PreferenceBatches.batch

    def stamped(self, start, size):  # the loop asks for step k's batch when step k begins
        stamps.append((time.time(), time.process_time()))
        return original(self, start, size)

    PreferenceBatches.batch = stamped
    out = Path(args.work) / f"run-lmforge-{args.mode}"
    cfg = {"model": args.model, "data": args.data, "val_fraction": 0.0, "beta": BETA, "probe_prompts": 0,
           "train": {"max_steps": args.warmup + args.steps + 1, "batch_size": args.batch, "lr": LR,
                     "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "eval_every": 0,
                     "checkpoint_every": 0, "log_every": args.warmup, "tensorboard": False, "threads": args.threads,
                     "seed": SEED, "keep_best": False}}
    if args.mode == "lora":
        cfg["adapter"] = {"method": "lora", **LORA}
    path = Path(args.work) / f"lmforge-{args.mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    m = run_single("dpo", str(path), [], out=str(out), force=True, resume=False, echo=lambda *a: None)
    return {**_rates(stamps, args), "e2e_s": time.time() - t0, "e2e_cpu_s": time.process_time(),
            "reference_s": m["summary"]["reference_seconds"], "final_loss": m["summary"]["train_loss"]}


def _rates(stamps: list[tuple[float, float]], args) -> dict:
    """Pairs per wall second and per CPU second between the beginnings of steps warmup and warmup + steps."""
    (w0, c0), (w1, c1) = stamps[args.warmup], stamps[args.warmup + args.steps]
    pairs = args.steps * args.batch
    return {"steady_pairs_s": pairs / (w1 - w0), "steady_pairs_per_cpu_s": pairs / (c1 - c0)}


def child_trl(args, precompute: bool) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    t0 = time.time()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = load_dataset("json", data_files=args.data, split="train").remove_columns(["kind"])
    peft_config = None
    if args.mode == "lora":
        from peft import LoraConfig

        from lmforge.adapters import DEFAULT_TARGETS

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=DEFAULT_TARGETS["llama"], task_type="CAUSAL_LM", bias="none")
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            stamps.append((time.time(), time.process_time()))

    cfg = DPOConfig(output_dir=str(Path(args.work) / f"trl-{args.mode}"), per_device_train_batch_size=args.batch,
                    max_steps=args.warmup + args.steps + 1, learning_rate=LR, lr_scheduler_type="constant",
                    warmup_steps=0, weight_decay=0.0, beta=BETA, use_cpu=True, bf16=False, report_to=[],
                    save_strategy="no", eval_strategy="no", logging_steps=args.warmup, dataloader_num_workers=0,
                    seed=SEED, max_length=256, precompute_ref_log_probs=precompute, disable_dropout=True)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[Stamp()])
    out = trainer.train()
    return {**_rates(stamps, args), "e2e_s": time.time() - t0, "e2e_cpu_s": time.process_time(),
            "final_loss": out.training_loss}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.side == "lmforge":
        r = child_lmforge(args)
    else:
        r = child_trl(args, precompute=args.side == "trl+precompute")
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(r), flush=True)


# ------------------------------------------------------------------------------ the parent


SIDES = ("lmforge", "trl", "trl+precompute")


def run_child(side: str, mode: str, data: Path, model: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--mode", mode, "--data", str(data), "--model", str(model),
           "--work", str(args.work), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
           str(args.batch), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{side} ({mode}) failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=SIDES, dest="side")
    ap.add_argument("--mode", default="full", choices=("full", "lora"))
    ap.add_argument("--only", choices=("full", "lora"))
    ap.add_argument("--data")
    ap.add_argument("--model")
    ap.add_argument("--work", default=str(ROOT / "out" / "dpo-work"))
    ap.add_argument("--steps", type=int, default=30, help="Timed optimizer steps.")
    ap.add_argument("--warmup", type=int, default=5, help="Untimed steps before them.")
    ap.add_argument("--batch", type=int, default=8, help="Pairs per step.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (1: CPU time is then a "
                    "stable measure even on a busy machine).")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if args.side:
        child_main(args)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = (args.warmup + args.steps + 1) * args.batch  # one epoch: the reference pass covers what is trained
    data, model = prepare(work, pairs)
    modes = [args.only] if args.only else ["full", "lora"]
    results: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in SIDES} for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            for side in SIDES:
                res = run_child(side, mode, data, model, args)
                results[mode][side].append(res)
                print(f"round {r + 1} {mode:4s} {side:15s} steady {res['steady_pairs_s']:7.2f} pairs/s "
                      f"({res['steady_pairs_per_cpu_s']:7.2f} per CPU s)  end-to-end {res['e2e_s']:6.1f} s "
                      f"({res['e2e_cpu_s']:6.1f} CPU s)  peak RSS {res['peak_rss_mb']:7.1f} MB", flush=True)
    report = {"model": SPEC, "lora": LORA, "pairs": pairs, "steps": args.steps, "warmup": args.warmup,
              "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "results": {}}
    print(f"\nDPO, {pairs} world preference pairs, batch {args.batch}, {args.steps} timed steps, "
          f"{args.threads} threads, medians of {args.rounds} round(s)")
    for mode in modes:
        keys = ("steady_pairs_s", "steady_pairs_per_cpu_s", "e2e_s", "e2e_cpu_s", "peak_rss_mb")
        med = {s: {k: statistics.median(x[k] for x in results[mode][s]) for k in keys} for s in SIDES}
        report["results"][mode] = {"median": med, "runs": results[mode]}
        lm = med["lmforge"]
        for ref in ("trl", "trl+precompute"):
            t = med[ref]
            print(f"  {mode:4s} lmforge vs {ref:15s} pairs/s {lm['steady_pairs_s'] / t['steady_pairs_s']:5.2f}x "
                  f"(per CPU s {lm['steady_pairs_per_cpu_s'] / t['steady_pairs_per_cpu_s']:5.2f}x)  end-to-end "
                  f"{t['e2e_s'] / lm['e2e_s']:5.2f}x (CPU {t['e2e_cpu_s'] / lm['e2e_cpu_s']:5.2f}x)  peak RSS "
                  f"{lm['peak_rss_mb'] / t['peak_rss_mb']:5.2f}x ({lm['peak_rss_mb']:.0f} vs {t['peak_rss_mb']:.0f} MB)")
    out = ROOT / "out" / "bench_dpo.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")
    shutil.rmtree(work / "run-lmforge-full", ignore_errors=True)
    shutil.rmtree(work / "run-lmforge-lora", ignore_errors=True)


if __name__ == "__main__":
    main()
