"""Generation speed: lmforge's sampler against plain `transformers` `model.generate`.

    python bench/bench_generation.py                  # the 5M-parameter Llama, batch 1 and 16
    python bench/bench_generation.py --model runs/default/sft --new 128
    python bench/bench_generation.py --threads 1 --repeats 5

Both sides get the same model, the same prompts (batch 16: lengths 8..32, so left padding is
exercised), the same sampling settings (temperature 0.7, top-p 0.9, top-k off) and exactly
`--new` tokens per row (`min_new_tokens` = `max_new_tokens`, so EOS cannot end a row early).
Each configuration is run `--repeats` times alternating the two sides; the best run of each is
compared (the machine may be shared, and the best run is the least disturbed one). Printed:
tokens/s of each side and the ratio (target: >= 1.5x at batch 1 and at batch 16), and, with
`--profile`, where one lmforge step spends its time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def tiny_llama(vocab: int, seed: int = 0):
    """The reference model: a random Llama with ~5.3M parameters (hidden 256, 4 layers, vocab 8192)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def word_tokenizer(vocab: int):
    """A tokenizer whose token i is the word `t{i}` (lets the random model's output be decoded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def hf_generate(model, tokenizer, prompts: list[list[int]], new: int, args) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (ids != pad).long() if len({len(p) for p in prompts}) > 1 else torch.ones_like(ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                             top_p=args.top_p, top_k=0, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    dt = time.perf_counter() - t0
    return dt, (out.shape[1] - width) * len(prompts)


def lmforge_generate(model, tokenizer, prompts: list[list[int]], new: int, args) -> tuple[float, int]:
    from lmforge.generation import SamplingParams, generate

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=0, max_new_tokens=new,
                            min_new_tokens=new)
    t0 = time.perf_counter()
    outs = generate(model, tokenizer, prompts, params, max_batch=len(prompts))
    dt = time.perf_counter() - t0
    return dt, sum(o.completion_tokens for o in outs)


def profile_steps(model, tokenizer, prompts: list[list[int]], new: int, args) -> None:
    """Time one lmforge generation with torch's profiler and print the top operators."""
    from torch.profiler import profile

    with profile() as prof:
        lmforge_generate(model, tokenizer, prompts, new, args)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="A local HF model folder (default: a random 5M-parameter Llama).")
    ap.add_argument("--vocab", type=int, default=8192, help="Vocabulary of the random model.")
    ap.add_argument("--batches", default="1,16", help="Comma-separated batch sizes.")
    ap.add_argument("--new", type=int, default=64, help="Tokens generated per row.")
    ap.add_argument("--repeats", type=int, default=5, help="Timed runs per side and batch size.")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    ap.add_argument("--profile", action="store_true", help="Also profile one lmforge run per batch size.")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from lmforge.generation import load_model_for_inference

        model, tokenizer = load_model_for_inference(args.model, device="cpu", dtype="fp32")
    else:
        model, tokenizer = tiny_llama(args.vocab), word_tokenizer(args.vocab)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {vocab}; threads {torch.get_num_threads()}; "
          f"{args.new} new tokens per row; temperature {args.temperature}, top-p {args.top_p}, top-k off")
    gen = torch.Generator().manual_seed(0)
    ratios = {}
    for batch in (int(b) for b in args.batches.split(",")):
        lengths = [16] if batch == 1 else torch.randint(8, 33, (batch,), generator=gen).tolist()
        prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
        hf_generate(model, tokenizer, prompts, 4, args)  # warm-up (first-call allocations)
        lmforge_generate(model, tokenizer, prompts, 4, args)
        hf_t, lf_t = [], []
        for _ in range(args.repeats):
            dt, n_hf = hf_generate(model, tokenizer, prompts, args.new, args)
            hf_t.append(n_hf / dt)
            dt, n_lf = lmforge_generate(model, tokenizer, prompts, args.new, args)
            lf_t.append(n_lf / dt)
            assert n_hf == n_lf == batch * args.new, (n_hf, n_lf)
        ratios[batch] = max(lf_t) / max(hf_t)
        print(f"batch {batch:>3}: transformers generate {max(hf_t):8.0f} tok/s (median {statistics.median(hf_t):.0f})"
              f" | lmforge {max(lf_t):8.0f} tok/s (median {statistics.median(lf_t):.0f})"
              f" | ratio {ratios[batch]:.2f}x (target >= 1.5x)")
        if args.profile:
            profile_steps(model, tokenizer, prompts, args.new, args)
    print("ratios: " + ", ".join(f"batch {b}: {r:.2f}x" for b, r in ratios.items()))


if __name__ == "__main__":
    main()
