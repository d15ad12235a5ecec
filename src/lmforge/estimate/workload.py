"""From a validated stage config to a `Workload`: the model's shape and what one step processes.

Nothing here allocates weights: a model's shape comes from its transformers config, its exact
parameter count from an instance built on the `meta` device. A stage's model may not exist yet
(a recipe not run): then the config comes from the earlier stage that will write it (a pretrain
stage's `model:` spec and the tokenizer stage's vocabulary).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.estimate.formulas import Linear, Shape, lora_activation_elements, lora_params, prefix_params

TRAINING = ("pretrain", "sft", "dpo", "reward", "ppo", "grpo")
ASSUMED_PROMPT_TOKENS = 64  # RL prompts when the prompt file cannot be read yet


@dataclass(frozen=True)
class Rollout:
    rows: int  # responses per rollout step
    prompt_tokens: int
    new_tokens: int
    max_batch: int  # responses decoded together
    epochs: int
    reference: bool  # a score pass under the reference (KL term)
    old_pass: bool  # a separate pass for the old log-probs (several updates per rollout)


@dataclass(frozen=True)
class Workload:
    """What a training stage does per optimizer step, in the terms the formulas need."""

    name: str
    kind: str
    shape: Shape
    method: str  # adapter method: none, lora, dora, prefix, qlora
    trainable: int
    precision: str  # the config's train.precision (auto resolved per device)
    batch: int  # sequences (pairs for dpo/reward) per micro-batch per process
    grad_accum: int
    seq_len: int
    seqs_per_item: int  # 2 for preference pairs
    head_share: float  # share of tokens whose logits are computed (supervised / response tokens)
    steps: int
    checkpointing: bool
    processes: int = 1
    fsdp: bool = False
    eval_every: int = 0
    eval_batches: int = 0
    reference: str = "none"  # none | copy (a frozen copy in memory) | adapter-off | cached (log-probs precomputed)
    value_head: bool = False
    reward_model: Shape | None = None
    rollout: Rollout | None = None
    checkpoint_every: int = 0
    adapter_act: int = 0  # activation elements per token an adapter adds (LoRA's dropout copies and rank-r outputs)
    notes: tuple[str, ...] = field(default=())

    @property
    def micro_tokens(self) -> int:
        return self.batch * self.seqs_per_item * self.seq_len

    def with_(self, **kw) -> "Workload":
        return replace(self, **kw)


# --------------------------------------------------------------------------------------------
# Model shapes


@functools.lru_cache(maxsize=32)
def _shape_from_json(config_json: str) -> Shape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(config_json)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return shape_of_model(model)


def shape_of_model(model) -> Shape:
    """The shape of a built causal LM (on any device, `meta` included; a peft or compile wrapper is
    looked through: its adapter layers are not counted as the model's own)."""
    import torch

    m = model
    while getattr(m, "config", None) is None:  # DDP's .module, compile's ._orig_mod, a stage's wrapper's .lm, reward's RewardHead.model
        inner = next((getattr(m, a) for a in ("module", "_orig_mod", "lm", "model") if hasattr(m, a)), None)
        if inner is None:
            raise LmforgeError(f"cannot find the transformers config of a {type(model).__name__}")
        m = inner
    m = m.get_base_model() if hasattr(m, "get_base_model") else m
    cfg = m.config
    params = sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n)
    linears = []
    for name, mod in m.named_modules():
        if "lora_" in name:
            continue
        if isinstance(mod, torch.nn.Linear):
            linears.append(Linear(name, mod.in_features, mod.out_features))
        elif type(mod).__name__ == "Conv1D":  # GPT-2's transposed linear: weight (in, out)
            linears.append(Linear(name, mod.weight.shape[0], mod.weight.shape[1]))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = _first(text, "num_attention_heads", "n_head")
    d_model = _first(text, "hidden_size", "n_embd")
    kv = getattr(text, "num_key_value_heads", None) or n_heads
    d_ff = _first(text, "intermediate_size", "n_inner") or 4 * d_model
    return Shape(
        model_type=cfg.model_type, vocab=text.vocab_size, d_model=d_model, n_layers=_first(text, "num_hidden_layers", "n_layer"),
        n_heads=n_heads, n_kv_heads=kv, head_dim=getattr(text, "head_dim", None) or d_model // n_heads, d_ff=d_ff,
        gated_mlp=any(x.name.endswith(("gate_proj", "gate_up_proj", "w1")) for x in linears),
        tied=bool(getattr(text, "tie_word_embeddings", False)),
        context=_first(text, "max_position_embeddings", "n_positions") or 2048, params=params, linears=tuple(linears))


def _first(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def shape_of(hf_config) -> Shape:
    """The shape of a transformers causal-LM config (exact parameter count, no weights allocated)."""
    d = hf_config.to_diff_dict()
    d["model_type"] = hf_config.model_type
    for k in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        d.pop(k, None)
    return _shape_from_json(json.dumps(d, sort_keys=True, default=str))


class Sources:
    """Where each stage's model comes from: a folder on disk, or an earlier stage of the recipe."""

    def __init__(self):
        self.models: dict[str, Shape] = {}  # stage folder -> shape of the model it will write
        self.vocab: dict[str, int] = {}  # tokenizer stage folder -> vocabulary size

    def model(self, path: str | None, *, what: str) -> Shape:
        if path is None:
            raise LmforgeError(f"{what} is not set, so there is no model to estimate; set it or run it in a recipe.")
        key = str(Path(path))
        if key in self.models:
            return self.models[key]
        return shape_of(_config_on_disk(Path(path), what))

    def vocab_size(self, path: str | None) -> int | None:
        if path is None:
            return None
        key = str(Path(path))
        if key in self.vocab:
            return self.vocab[key]
        from lmforge.data.tokenizer import load_tokenizer

        return len(load_tokenizer(path))


def _config_on_disk(p: Path, what: str):
    from transformers import AutoConfig

    from lmforge.adapters import adapter_base, is_adapter
    from lmforge.rundir import resolve_artifact

    p = resolve_artifact(p, "model folder")
    if is_adapter(p):
        p = adapter_base(p)
    if not (p / "config.json").is_file():
        raise LmforgeError(f"{what}: {p} is not a Hugging Face model folder (no config.json).")
    return AutoConfig.from_pretrained(str(p), local_files_only=True)


# --------------------------------------------------------------------------------------------
# Stage configs -> workloads


def trainable_of(shape: Shape, adapter: Any) -> int:
    """Trainable parameters under an AdapterConfig (peft's count; see tests/test_estimate.py)."""
    from lmforge.adapters import DEFAULT_TARGETS

    if adapter is None or adapter.method == "none":
        return shape.params
    if adapter.method == "prefix":
        return prefix_params(shape, adapter.num_virtual_tokens)
    targets = adapter.target_modules or DEFAULT_TARGETS.get(shape.model_type, "all-linear")
    return lora_params(shape, targets, adapter.r, dora=adapter.method == "dora")


def adapter_activation(shape: Shape, adapter: Any) -> int:
    from lmforge.adapters import DEFAULT_TARGETS

    if adapter is None or adapter.method not in ("lora", "dora", "qlora"):
        return 0
    targets = adapter.target_modules or DEFAULT_TARGETS.get(shape.model_type, "all-linear")
    return lora_activation_elements(shape, targets, adapter.r)


def _train_fields(cfg) -> dict:
    t = cfg.train
    return dict(precision=t.precision, batch=t.batch_size, grad_accum=t.grad_accum, steps=t.max_steps,
                fsdp=t.fsdp, eval_every=t.eval_every, eval_batches=t.eval_batches, checkpoint_every=t.checkpoint_every)


def workload(name: str, kind: str, cfg: Any, src: Sources) -> Workload | None:
    """The stage's workload, or None for a stage that trains nothing (data, eval, report)."""
    build = {"pretrain": _pretrain, "sft": _sft, "dpo": _dpo, "reward": _reward, "ppo": _rl, "grpo": _rl}.get(kind)
    return build(name, kind, cfg, src) if build else None


def _pretrain(name, kind, cfg, src: Sources) -> Workload:
    from lmforge.models import hf_config

    if cfg.init_from:
        shape = src.model(cfg.init_from, what=f"{name}.init_from")
    else:
        vocab = src.vocab_size(cfg.tokenizer) if cfg.tokenizer else cfg.model.extra.get("vocab_size")
        if vocab is None:
            raise LmforgeError(f"{name}.tokenizer is not set, so the vocabulary size is unknown; set it (or "
                               "model.extra.vocab_size for an estimate).")
        shape = shape_of(hf_config(cfg.model, vocab_size=vocab, bos_id=None, eos_id=0, pad_id=None))
    seq = cfg.seq_len or shape.context
    return Workload(name, kind, shape, "none", shape.params, seq_len=seq, seqs_per_item=1, head_share=1.0,
                    checkpointing=False, **_train_fields(cfg))


def _sft(name, kind, cfg, src: Sources) -> Workload:
    shape = src.model(cfg.model, what=f"{name}.model")
    seq = cfg.seq_len or min(shape.context, 2048)
    notes = () if cfg.batching == "pack" else (f"batching {cfg.batching}: rows assumed {seq} tokens long (an upper "
                                               "bound; --probe measures the real lengths)",)
    return Workload(name, kind, shape, cfg.adapter.method, trainable_of(shape, cfg.adapter),
                    adapter_act=adapter_activation(shape, cfg.adapter), seq_len=seq,
                    seqs_per_item=1, head_share=0.5, checkpointing=cfg.gradient_checkpointing, notes=notes,
                    **_train_fields(cfg))


def _dpo(name, kind, cfg, src: Sources) -> Workload:
    shape = src.model(cfg.model, what=f"{name}.model")
    seq = cfg.max_length or shape.context
    ref = "none" if cfg.method in ("simpo", "orpo") else "cached"
    return Workload(name, kind, shape, cfg.adapter.method, trainable_of(shape, cfg.adapter),
                    adapter_act=adapter_activation(shape, cfg.adapter), seq_len=seq,
                    seqs_per_item=2, head_share=0.5, checkpointing=False, reference=ref,
                    notes=(f"sequences assumed max_length {seq} tokens (an upper bound; --probe measures them)",),
                    **_train_fields(cfg))


def _reward(name, kind, cfg, src: Sources) -> Workload:
    shape = src.model(cfg.model, what=f"{name}.model")
    seq = cfg.max_length or shape.context
    return Workload(name, kind, shape, cfg.adapter.method, trainable_of(shape, cfg.adapter),
                    adapter_act=adapter_activation(shape, cfg.adapter), seq_len=seq,
                    seqs_per_item=2, head_share=0.0, checkpointing=False, **_train_fields(cfg))


def _rl(name, kind, cfg, src: Sources) -> Workload:
    shape = src.model(cfg.model, what=f"{name}.model")
    group = cfg.group_size if kind == "grpo" else 1
    rows = cfg.rows_per_rollout(group)
    new = cfg.rollout.max_new_tokens
    prompt = min(ASSUMED_PROMPT_TOKENS, max(1, shape.context - new))
    beta = cfg.beta if kind == "grpo" else 1.0
    updates = rows // (cfg.train.batch_size * cfg.train.grad_accum) * cfg.epochs
    rollout = Rollout(rows, prompt, new, cfg.rollout.max_batch, cfg.epochs, reference=beta > 0, old_pass=updates > 1)
    ref = "none" if beta == 0 else ("adapter-off" if cfg.adapter.enabled else "copy")
    rm = None
    if any(r.kind == "reward_model" for r in cfg.rewards) or (not cfg.rewards and cfg.reward_model):
        rm = src.model(cfg.reward_model, what=f"{name}.reward_model")
    fields = _train_fields(cfg)
    fields["steps"] = cfg.train.max_steps
    return Workload(name, kind, shape, cfg.adapter.method, trainable_of(shape, cfg.adapter),
                    adapter_act=adapter_activation(shape, cfg.adapter), seq_len=prompt + new,
                    seqs_per_item=1, head_share=new / (prompt + new), checkpointing=False, reference=ref,
                    value_head=kind == "ppo", reward_model=rm, rollout=rollout,
                    notes=(f"prompts assumed {prompt} tokens",), **fields)
