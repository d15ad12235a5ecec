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
from typing import Literal

import torch

from lmforge.adapters import (
    AdapterConfig,
    adapter_base,
    check_base,
    is_adapter,
    is_prompt_learning,
    nf4_settings,
    prepare_nf4,
    qlora_unsupported,
    quiet_bitsandbytes,
)
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


Head = Literal["causal_lm", "reward"]


def load_model(path: str | Path, *, head: Head = "causal_lm", keep_adapter: bool = False,
               qlora: AdapterConfig | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, base: str | Path | None = None) -> torch.nn.Module:
    """THE way lmforge loads a model, for every use: a training start, a reference, a reward
    model, inference, serving, evaluation. Never downloads. Returns it in eval mode.

    path: a Hugging Face model folder, a stage folder, or a peft adapter folder. An adapter is
        put on its recorded base (or `base`) after the base-fingerprint check (one sentence when
        they do not belong together) and merged in, unless `keep_adapter` (a `peft.PeftModel`).
    head: causal_lm (`AutoModelForCausalLM`) or reward (`AutoModelForSequenceClassification`
        with one label: a reward model loads as it is; a causal LM keeps its backbone and gets a
        fresh head, initialised from torch's RNG, so the caller seeds it).
    qlora: QLoRA settings: the base in 4-bit NF4 on `device`, frozen, ready for LoRA.
    device: where the weights go (None = left on the CPU, for the caller to place).
    dtype: of the weights (None = fp32; a 4-bit base: its compute dtype).
    """
    p = resolve_artifact(path, "model folder")
    if is_adapter(p):
        model = _adapter_model(p, base, head=head, keep=keep_adapter, quantized=qlora is not None, dtype=dtype)
    else:
        model = _full_model(p, head=head, qlora=qlora, device=device, dtype=dtype)
    if keep_adapter and is_adapter(p):
        return (model.to(device) if device is not None else model).eval()
    if qlora is None:
        model.requires_grad_(True)  # peft froze a merged base; a training start trains it whole
        if device is not None:
            model.to(device)
    return model.eval()


def _full_model(p: Path, *, head: Head, qlora: AdapterConfig | None, device, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if not (p / "config.json").is_file():
        raise LmforgeError(f"{p} is not a Hugging Face model folder (no config.json); point to a saved model.")
    kw: dict = {"dtype": dtype or torch.float32}
    if qlora is not None:
        # The reward head stays in full precision: it is trained whole, and quantising a 1-row layer saves nothing.
        kw = nf4_settings(qlora, torch.device(device or "cpu"), skip=["score", "classifier"] if head == "reward" else None)
    cls = AutoModelForCausalLM
    if head == "reward":
        cls, kw["num_labels"] = AutoModelForSequenceClassification, 1
    level = hf_logging.get_verbosity()
    if head == "reward":
        hf_logging.set_verbosity_error()  # "some weights are newly initialised": a fresh head is the point
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, **kw)
    except Exception as e:  # transformers/safetensors raise many types for a folder they cannot use
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if qlora is not None and isinstance(e, (RuntimeError, NotImplementedError, ValueError)):
            raise qlora_unsupported(torch.device(device or "cpu"), why) from None
        raise LmforgeError(f"The model in {p} cannot be loaded{' as a reward model' if head == 'reward' else ''} "
                           f"({why}).") from None
    finally:
        hf_logging.set_verbosity(level)
    return prepare_nf4(model) if qlora is not None else model


def _adapter_model(p: Path, base: str | Path | None, *, head: Head, keep: bool, quantized: bool, dtype):
    quiet_bitsandbytes()
    from peft import PeftModel

    if quantized:
        raise LmforgeError(f"{p} is an adapter; QLoRA needs a full base model: run `lmforge merge` on it first.")
    b = resolve_artifact(base if base is not None else adapter_base(p), "base model folder")
    check_base(p, b)
    # A reward model's adapter (peft task SEQ_CLS, its head saved whole) goes on a reward-model base.
    reward_adapter = json.loads((p / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    if reward_adapter and head != "reward":
        raise LmforgeError(f"{p} is a reward model's adapter; load it as a reward model (lmforge score, reward_model).")
    model = _full_model(b, head="reward" if reward_adapter else "causal_lm", qlora=None, device=None, dtype=dtype)
    try:
        model = PeftModel.from_pretrained(model, str(p), is_trainable=False)
    except Exception as e:  # size mismatches (RuntimeError), missing targets (ValueError subclasses), ...
        raise LmforgeError(f"Adapter {p} does not fit the base model {b} ({str(e).splitlines()[0]}); load it "
                           "with the base model it was trained on.") from None
    if keep:
        return model
    if is_prompt_learning(model):
        raise LmforgeError(f"{p} is a prefix-tuning adapter, which cannot be merged into the weights; "
                           "start from its base model instead.")
    model = model.merge_and_unload()
    if head == "reward" and not reward_adapter:
        model = _with_reward_head(model)
    return model


def _with_reward_head(lm) -> torch.nn.Module:
    """A one-label sequence-classification model with `lm`'s backbone and a fresh head (torch's RNG)."""
    from transformers import AutoModelForSequenceClassification

    lm.config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(lm.config)
    getattr(model, model.base_model_prefix).load_state_dict(getattr(lm, lm.base_model_prefix).state_dict())
    return model


def load_config(path: str | Path):
    """A model folder's transformers config without its weights (a stage folder: its artifact's;
    an adapter: its base's). Never downloads."""
    from transformers import AutoConfig

    p = resolve_artifact(path, "model folder")
    if is_adapter(p):
        p = resolve_artifact(adapter_base(p), "base model folder")
    if not (p / "config.json").is_file():
        raise LmforgeError(f"{p} is not a Hugging Face model folder (no config.json); point to a saved model.")
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # a config.json transformers cannot read
        raise LmforgeError(f"The model in {p} has no usable config.json ({str(e).splitlines()[0]}).") from None


def context_length(model) -> int | None:
    """The model's longest sequence, from its config (a model, or a config from `load_config`);
    None when the config does not say."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_compatible(model, tokenizer, seq_len: int, *, where: str) -> None:
    ctx = context_length(model)
    if ctx is not None and seq_len > ctx:
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
        tokenizer.model_max_length = context_length(model) or tokenizer.model_max_length
        tokenizer.save_pretrained(str(out))
    if extra:
        (out / "lmforge.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
