"""Models: build from a spec, load from a local folder, save in Hugging Face format.

Model classes are `transformers`' own; lmforge only maps its small `ModelSpec` onto their
configs and checks what would otherwise fail deep inside a forward pass (a context longer
than the model's positions, a tokenizer larger than the embedding table).
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import torch

from lmforge.config import ModelSpec
from lmforge.errors import LmforgeError
from lmforge.rundir import resolve_artifact


def hf_config(spec: ModelSpec, *, vocab_size: int, bos_id: int | None, eos_id: int, pad_id: int | None):
    from transformers import AutoConfig

    d_ff = spec.d_ff or 32 * round(8 / 3 * spec.d_model / 32)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        max_position_embeddings=spec.context_length,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if spec.architecture == "gpt2":
        kw.update(n_inner=d_ff, attn_pdrop=spec.dropout, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout)
    else:
        kw.update(
            intermediate_size=d_ff,
            num_key_value_heads=spec.n_kv_heads or spec.n_heads,
            attention_dropout=spec.dropout,
            rope_theta=spec.rope_theta,
        )
    kw.update(spec.extra)
    try:
        return AutoConfig.for_model(spec.architecture, **kw)
    except ValueError as e:
        raise LmforgeError(
            f"model.architecture {spec.architecture!r} is not a transformers model type ({str(e).splitlines()[0]})."
        ) from None


def build_model(spec: ModelSpec, tokenizer, *, seed: int) -> torch.nn.Module:
    """A freshly initialised causal LM; initialisation is seeded so runs reproduce."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(
        spec, vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except ValueError:
        return AutoModelForCausalLM.from_config(cfg)


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A causal LM from a local HF folder or an lmforge stage folder (never downloads)."""
    from transformers import AutoModelForCausalLM

    p = resolve_artifact(path, "model folder")
    if not (p / "config.json").is_file():
        raise LmforgeError(f"{p} is not a Hugging Face model folder (no config.json); point to a saved model.")
    try:
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype or torch.float32, local_files_only=True)
    except Exception as e:  # many error types from transformers/safetensors for a bad folder
        raise LmforgeError(f"The model in {p} cannot be loaded ({str(e).splitlines()[0]}).") from None


def context_length(model) -> int:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30


def check_compatible(model, tokenizer, seq_len: int, *, where: str) -> None:
    ctx = context_length(model)
    if seq_len > ctx:
        raise LmforgeError(
            f"{where}: sequence length {seq_len} is longer than the model's context of {ctx} positions; "
            f"lower it to at most {ctx}."
        )
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > emb:
        raise LmforgeError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding table has {emb} rows; "
            "use the tokenizer the model was trained with."
        )


def cache_kwarg(model) -> str:
    """The forward keyword that takes a key/value cache: `cache` in recent transformers 5.x
    (which deprecates `past_key_values` with a warning on every call), `past_key_values` in
    earlier 5.x releases and in architectures not moved yet."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return _cache_kwarg_of(type(getattr(m, "_orig_mod", m)))  # _orig_mod: under torch.compile


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls: type) -> str:
    # Once per model class: RL rollouts ask on every forward.
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out):
    """The key/value cache a forward returned (named `cache` or `past_key_values` by version)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (modules and attention): preference and RL stages compare log-probs
    of the same text under two models or two passes, which dropout noise would blur."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def add_stop_token(model, token_id: int) -> None:
    """Add `token_id` to the model's generation_config.eos_token_id (saved with the model), so
    `generate` stops at it as well as at EOS."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    gc = getattr(base, "generation_config", None)
    if gc is None:
        return
    eos = gc.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if token_id not in ids:
        gc.eos_token_id = [*ids, int(token_id)] if ids else int(token_id)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def save_model(model, tokenizer, out: Path, *, extra: dict | None = None, state_dict: dict | None = None) -> None:
    """HF format (safetensors) + tokenizer in `out` (the caller makes `out` a temp folder and renames).
    `state_dict`: the weights to write instead of the model's own (a sharded model's gathered ones)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.model_max_length = context_length(model)
        tokenizer.save_pretrained(str(out))
    if extra:
        (out / "lmforge.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
