"""Online RL speed: lmforge's rollouts, GRPO and PPO steps against plain `transformers` and TRL.

    python bench/bench_rl.py                        # everything, ~5 minutes on 2 CPU cores
    python bench/bench_rl.py --steps 6 --threads 2 --only grpo

Every side gets the same model (a random Llama: hidden 256, 4 layers, ~5M parameters, word-level
vocabulary of 2048 with lmforge's chat template), the same 64 chat prompts (8..24 words), and the
same sampling (temperature 1, no top-p/top-k):

    rollout  tokens/s of lmforge's generation path (`generate`, as the RL stages call it: seeded
             per-row streams, per-token log-probs) vs `model.generate(do_sample=True)` on the same
             batch of 32 prompts, 64 new tokens each (min_new_tokens = max_new_tokens on both sides)
    grpo     steps/s of the `grpo` stage vs TRL's GRPOTrainer (`trl` installed in the venv for this
             bench only): 8 prompts x group 4 = 32 completions of up to 32 tokens per step, one
             optimizer step per rollout, beta 0.04 (both keep a frozen reference), token-level loss
             (TRL's "dapo" = lmforge's), group-std scaled advantages, the same reward function
    ppo      steps/s of the `ppo` stage (32 prompts, 2 epochs); TRL 1.x no longer ships a PPO
             trainer, so there is no reference side and no ratio

Timing: each configuration is run `--repeats` times, alternating sides; a side's time is its best
run (the machine may be shared; the best run is the least disturbed one). Step times are the
median step of a run after its first step (warm-up). Printed: each side's figure and lmforge's
ratio (target >= 1.5x for the GRPO step). Results also go to bench/out/bench_rl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def reward_value(text: str) -> float:
    """Share of the completion's words whose number is even (a dense reward: every group varies)."""
    words = [w for w in text.split() if w[:1] == "t" and w[1:].isdigit()]
    return sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)


def lmforge_reward(prompt, response, row) -> float:  # lmforge's score-function contract
    return reward_value(response)


def trl_reward(completions, **kwargs) -> list[float]:  # TRL's reward-function contract
    return [reward_value(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


def build_model(out: Path, vocab: int = 2048) -> Path:
    """The bench model + a word-level tokenizer ("t5 t17 ...") carrying lmforge's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmforge.data.chat import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, UNK

    if (out / "config.json").is_file():
        return out
    words = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    words.update({f"t{i}": i for i in range(len(words), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   extra_special_tokens=list(ROLE_TOKENS.values()), chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


def write_prompts(path: Path, n: int = 64, seed: int = 0) -> Path:
    import random

    r = random.Random(seed)
    rows = [{"prompt": [{"role": "user", "content": " ".join(f"t{r.randrange(8, 2048)}" for _ in range(
        r.randint(8, 24)))}]} for _ in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


# --------------------------------------------------------------------------------------------
# rollout generation


def bench_rollout(model_dir: Path, prompts: Path, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.chat import render
    from lmforge.generation import SamplingParams, encode_prompts, generate

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    rows = [json.loads(x) for x in prompts.read_text().splitlines()][: args.batch]
    ids = encode_prompts(tok, [render(tok, r["prompt"], add_generation_prompt=True) for r in rows],
                         add_special_tokens=False)
    new = args.new_tokens

    def lmforge_side() -> tuple[float, int]:
        params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, seed=0,
                                logprobs=True)
        t0 = time.perf_counter()
        outs = generate(model, tok, ids, params, max_batch=len(ids))
        return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)

    def hf_side() -> tuple[float, int]:
        width = max(len(p) for p in ids)
        x = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return time.perf_counter() - t0, (out.shape[1] - width) * len(ids)

    best = {"lmforge": float("inf"), "transformers": float("inf")}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in (("lmforge", lmforge_side), ("transformers", hf_side)):
            dt, n = fn()
            best[name] = min(best[name], dt)
            tokens[name] = n
    res = {k: tokens[k] / best[k] for k in best}
    print(f"rollout  batch {len(ids)} x {new} tokens: lmforge {res['lmforge']:,.0f} tok/s, model.generate "
          f"{res['transformers']:,.0f} tok/s -> {res['lmforge'] / res['transformers']:.2f}x")
    return {"tokens_per_s": res, "ratio": res["lmforge"] / res["transformers"], "batch": len(ids), "new_tokens": new}


# --------------------------------------------------------------------------------------------
# GRPO / PPO steps


def _median_step(times: list[float]) -> float:
    """Median of the per-step durations after the first step."""
    d = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(d[1:] if len(d) > 2 else d)


def lmforge_stage(kind: str, model_dir: Path, prompts: Path, work: Path, args, **over) -> float:
    from lmforge.pipeline import run_single

    train = {"max_steps": args.steps, "lr": 2e-4, "threads": args.threads, "tensorboard": False,
             "checkpoint_every": 0, "log_every": 1, "seed": 1, **over.pop("train", {})}
    cfg = {"model": str(model_dir), "prompts": str(prompts),
           "rewards": [{"kind": "function", "function": f"{Path(__file__).resolve()}:lmforge_reward"}],
           "rollout": {"temperature": 1.0, "max_new_tokens": args.completion_tokens, "max_batch": 64},
           "sample_every": 0, "train": train, **over}
    path = work / f"{kind}.json"
    path.write_text(json.dumps(cfg))
    out = work / f"{kind}-run"
    run_single(kind, str(path), [], out=str(out), force=True, resume=False, echo=lambda *a: None)
    ms = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return _median_step([0.0] + [m["elapsed_s"] for m in ms])


def trl_grpo(model_dir: Path, prompts: Path, work: Path, args) -> float:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = GRPOConfig(output_dir=str(work / "trl"), max_steps=args.steps, per_device_train_batch_size=32,
                     gradient_accumulation_steps=1, num_generations=4, max_completion_length=args.completion_tokens,
                     temperature=1.0, top_p=1.0, top_k=0, beta=0.04, num_iterations=1, learning_rate=2e-4,
                     loss_type="dapo", scale_rewards="group", logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=not torch.cuda.is_available(), bf16=False, disable_dropout=True, seed=1,
                     dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Stamp()])
    for cb in (PrinterCallback, ProgressCallback):  # its per-step dicts would bury the results
        trainer.remove_callback(cb)
    trainer.train()
    return _median_step(stamps)


def bench_steps(model_dir: Path, prompts: Path, args) -> dict:
    res: dict = {}
    torch.set_num_threads(args.threads)
    grpo_over = {"prompts_per_step": 8, "group_size": 4, "beta": 0.04, "train": {"batch_size": 32}}
    best = {"lmforge": float("inf"), "trl": float("inf")}
    have_trl = True
    try:
        import trl  # noqa: F401
    except ImportError:
        have_trl = False
        print("trl is not installed: pip install trl (bench only) for the GRPO reference side")
    if args.only in (None, "grpo"):
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                over = json.loads(json.dumps(grpo_over))  # a fresh copy: lmforge_stage pops from it
                best["lmforge"] = min(best["lmforge"], lmforge_stage("grpo", model_dir, prompts, Path(d), args, **over))
            if have_trl:
                with tempfile.TemporaryDirectory() as d:
                    best["trl"] = min(best["trl"], trl_grpo(model_dir, prompts, Path(d), args))
        sps = {k: 1 / v for k, v in best.items() if v < float("inf")}
        line = f"grpo     8 prompts x 4, {args.completion_tokens} tokens: lmforge {sps['lmforge']:.2f} steps/s"
        if "trl" in sps:
            line += f", TRL GRPOTrainer {sps['trl']:.2f} steps/s -> {sps['lmforge'] / sps['trl']:.2f}x"
        print(line)
        res["grpo"] = {"steps_per_s": sps, "ratio": sps["lmforge"] / sps["trl"] if "trl" in sps else None}
    if args.only in (None, "ppo"):
        t = float("inf")
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                t = min(t, lmforge_stage("ppo", model_dir, prompts, Path(d), args, prompts_per_step=32, epochs=2,
                                         train={"batch_size": 16}))
        print(f"ppo      32 prompts, 2 epochs, {args.completion_tokens} tokens: lmforge {1 / t:.2f} steps/s "
              "(TRL 1.x has no PPO trainer: no reference side)")
        res["ppo"] = {"steps_per_s": {"lmforge": 1 / t}, "ratio": None}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="RL steps per run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side; the best counts")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=32, help="rollout bench: prompts decoded together")
    ap.add_argument("--new-tokens", type=int, default=64, help="rollout bench: tokens per prompt")
    ap.add_argument("--completion-tokens", type=int, default=32, help="GRPO/PPO: max tokens per completion")
    ap.add_argument("--only", choices=["rollout", "grpo", "ppo"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    work = OUT / "rl"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(work / "model")
    prompts = write_prompts(work / "prompts.jsonl")
    print(f"bench_rl: threads {args.threads}, torch {torch.__version__}, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    res: dict = {"threads": args.threads, "steps": args.steps, "repeats": args.repeats}
    if args.only in (None, "rollout"):
        res["rollout"] = bench_rollout(model_dir, prompts, args)
    if args.only != "rollout":
        res.update(bench_steps(model_dir, prompts, args))
    (OUT / "bench_rl.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {OUT / 'bench_rl.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
