"""The one generation path: every place a model produces text samples through this module.

`lmforge generate`, `lmforge chat`, the HTTP server, evaluation, rejection sampling and PPO/GRPO
rollouts all call `generate()` / `stream()` (or the `Engine` underneath them), so what was
evaluated is exactly what is served.

    model, tok = load_model_for_inference("runs/default/sft")
    outs = generate(model, tok, ["Once upon a time"], SamplingParams(temperature=0.0, max_new_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

Modules, by concern (import from `lmforge.generation`; the names below are re-exported):

    params.py       SamplingParams, the validated knobs (temperature, top-p, ..., n, seed); sampling_params()
    logits.py       logits processing: small pure functions of (logits, ids), each tested on hand-built tensors
    text.py         stop strings and incremental detokenisation (pure helpers)
    cache.py        BufferedLayer, a KV-cache layer that writes into a preallocated buffer (no per-step cat)
    fast_decode.py  FastDecode, one decode step of a Llama/Mistral/Qwen2 model through its own modules,
                    minus transformers' per-call framework overhead (equal logits, tested)
    engine.py       Engine, the batched sampler: left-padded prefill, one decode loop, per-row stopping,
                    rows joining and leaving between steps (continuous batching)
    api.py          generate / stream, the function API
    loading.py      load_model_for_inference: local HF folder, a stage's output, or base + PEFT adapter
    files.py        `lmforge generate MODEL --prompts FILE`: read prompts, complete them, write JSONL

Why a hand-written loop instead of `model.generate`: on small models `generate`'s per-step
bookkeeping costs as much as the forward pass (a full vocabulary sort for top-p, an exponential
draw per vocabulary entry for multinomial sampling, a `torch.cat` of the whole KV cache per
layer per step). Here top-p is a radix select, sampling inverts the CDF with one uniform per
row, the cache is written in place, and prefill computes only the last position's logits.
`bench/bench_generation.py` measures the difference.
"""

from lmforge.generation.api import Chunk, encode_prompts, generate, stream
from lmforge.generation.engine import Completion, Engine, Row, context_length, end_of_turn_id, eos_token_ids
from lmforge.generation.files import generate_file, read_prompts
from lmforge.generation.loading import load_model_for_inference
from lmforge.generation.logits import (
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)
from lmforge.generation.params import (
    MAX_SAMPLES,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    sampling_params,
)
from lmforge.generation.text import decode_delta, find_stop, stop_holdback

__all__ = [
    "MAX_SAMPLES", "MAX_STOP_STRINGS", "MAX_STOP_TOKEN_IDS", "Chunk", "Completion", "Engine", "Row", "SamplingParams",
    "apply_presence_frequency_penalty", "apply_repetition_penalty", "apply_temperature", "context_length",
    "decode_delta", "encode_prompts", "end_of_turn_id", "eos_token_ids", "find_stop", "generate", "generate_file",
    "load_model_for_inference", "min_p_filter", "read_prompts", "sample_from_logits", "sampling_params",
    "stop_holdback", "stream", "top_k_filter", "top_p_filter",
]
