"""Parameter-efficient fine-tuning with `peft`: LoRA, DoRA, prefix tuning and QLoRA.

    base model folder ──models.load_model──> model (fp32, or 4-bit NF4 for QLoRA: nf4_settings)
        ──apply_adapter──> peft.PeftModel (only adapter parameters require grad)
        ──save_adapter──> adapter folder (PEFT format + tokenizer + lmforge_adapter.json)
        ──merge──> plain HF model folder whose outputs equal base + adapter

An adapter folder is what `peft.PeftModel.from_pretrained(base, folder)` loads. lmforge adds
`lmforge_adapter.json` beside it: the method, the base folder it was trained on, and a
fingerprint of that base's weights, so loading it on another base fails with one sentence
instead of producing quietly wrong outputs (shapes alone do not tell two checkpoints of one
architecture apart). `lmforge.models.load_model` makes that check wherever an adapter loads:
training, evaluation, serving.

QLoRA stores the frozen base in 4-bit NF4 (bitsandbytes) and trains LoRA on top in the
compute dtype. bitsandbytes 0.50 runs NF4 on CPU as well as CUDA; on CPU the compute dtype is
fp32, since bf16 matmuls there are ~24x slower on CPUs without AMX.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_write_json, resolve_artifact, staged_dir

Method = Literal["none", "lora", "dora", "prefix", "qlora"]
META = "lmforge_adapter.json"

# LoRA targets per `config.model_type`: every linear layer of attention and MLP, which the
# QLoRA paper found necessary to match full fine-tuning (attention-only LoRA, peft's default,
# falls short). Architectures not listed get peft's "all-linear" (every Linear except lm_head).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                 "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


class AdapterConfig(Schema):
    """What to train: the whole model (method none) or a peft adapter on a frozen base."""

    method: Method = Field(
        "none", description="none = full fine-tuning; lora; dora (weight-decomposed LoRA); prefix (prefix tuning); "
        "qlora (LoRA on a 4-bit NF4 base, needs bitsandbytes).")
    r: int = Field(16, ge=1, description="LoRA/DoRA/QLoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Layer names to adapt (matched against the end of module names, e.g. q_proj); "
        "None = every attention and MLP projection of the architecture.")
    num_virtual_tokens: int = Field(16, ge=1, description="Prefix tuning: learned key/value positions per layer.")
    prefix_projection: bool = Field(
        False, description="Prefix tuning: re-parameterise the prefix through an MLP (more parameters, steadier).")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="QLoRA compute dtype; auto = bf16 on CUDA (fp16 without bf16 support), fp32 on CPU.")
    double_quant: bool = Field(True, description="QLoRA: quantise the quantisation constants too (~0.4 bit/param saved).")

    @model_validator(mode="after")
    def _targets_named(self) -> "AdapterConfig":
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty; list layer names or leave it unset for the defaults")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning about an optional CPU kernel package on import; it changes
    nothing about correctness, and it would otherwise precede every error message."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# Loading a 4-bit base (the loader itself is lmforge.models.load_model)


def compute_dtype(spec: AdapterConfig, device: torch.device) -> torch.dtype:
    if spec.compute_dtype != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def qlora_unsupported(device: torch.device, why: str) -> LmforgeError:
    return LmforgeError(f"adapter.method qlora cannot run on device {device.type} ({why}); use adapter.method: lora "
                        "(same adapter, full-precision base) instead.")


def nf4_settings(spec: AdapterConfig, device: torch.device, skip: list[str] | None = None) -> dict:
    """`from_pretrained` arguments that load a base in 4-bit NF4 for QLoRA on `device`; `skip`:
    modules kept in full precision (a reward model's head)."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LmforgeError("adapter.method qlora needs bitsandbytes (pip install 'lmforge[qlora]'); or use "
                           "adapter.method: lora.") from None
    if device.type not in ("cpu", "cuda", "xpu"):
        raise qlora_unsupported(device, "bitsandbytes has no 4-bit NF4 kernels for it")
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(spec, device)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                           bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_quant_storage=torch.uint8,
                           **({"llm_int8_skip_modules": skip} if skip else {}))
    where = device.index if device.type == "cuda" and device.index is not None else device.type
    return {"quantization_config": q, "dtype": dtype, "device_map": {"": where}}


def prepare_nf4(model):
    """A freshly loaded 4-bit model made ready for LoRA: base frozen, norms and embeddings in fp32."""
    from peft import prepare_model_for_kbit_training

    for mod in model.modules():
        # bitsandbytes switches CPU layers to a packed bf16 format on their first no-grad call in
        # eval mode: in place, for good, and only for in_features divisible by 64. Evaluation would
        # then use other numerics than training (and crash on small layers); keep one format.
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    # Gradient checkpointing is the stage's choice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers property
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


# --------------------------------------------------------------------------------------------
# Attaching an adapter


def layer_names(model) -> list[str]:
    """The distinct last components of the names of modules LoRA can adapt (Linear-like, Embedding)."""
    names = set()
    for full, mod in model.named_modules():
        if not full or list(mod.children()):
            continue
        kind = type(mod).__name__
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) or kind in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def target_modules(model, spec: AdapterConfig) -> list[str] | str:
    """The LoRA targets for `model`: the configured names (each must match a module) or the defaults."""
    if spec.target_modules is None:
        return DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")
    module_names = [n for n, _ in model.named_modules() if n]
    for t in spec.target_modules:
        if not any(n == t or n.endswith("." + t) for n in module_names):
            raise LmforgeError(
                f"adapter.target_modules: {t!r} matches no module of this {model.config.model_type} model; its "
                f"adaptable layers are named: {', '.join(layer_names(model))}.")
    return list(spec.target_modules)


def peft_config(model, spec: AdapterConfig, head: str = "causal_lm"):
    """A reward model (head "reward") adapts its backbone and trains its scalar head whole."""
    from peft import LoraConfig, PrefixTuningConfig, TaskType

    if spec.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens,
                                  prefix_projection=spec.prefix_projection,
                                  encoder_hidden_size=model.config.hidden_size)
    kw = {}
    if head == "reward":
        kw = {"modules_to_save": ["score" if isinstance(getattr(model, "score", None), torch.nn.Module) else "classifier"]}
    return LoraConfig(task_type=TaskType.SEQ_CLS if head == "reward" else TaskType.CAUSAL_LM, r=spec.r,
                      lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=target_modules(model, spec),
                      use_dora=spec.method == "dora", bias="none", **kw)


def apply_adapter(model, spec: AdapterConfig, head: str = "causal_lm"):
    """Wrap `model` in a peft model with a fresh adapter; only the adapter (and a reward head) requires grad."""
    quiet_bitsandbytes()
    from peft import get_peft_model

    cfg = peft_config(model, spec, head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers property
            return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. a target that is a block, not a layer
        raise LmforgeError(f"adapter: peft cannot adapt this model as configured ({str(e).splitlines()[0]}); "
                           f"adaptable layers are named: {', '.join(layer_names(model))}.") from None


def trainable_report(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the parameters they stand for."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# --------------------------------------------------------------------------------------------
# Saving and loading adapters


def base_fingerprint(model_dir: str | Path) -> str | None:
    """A cheap identity of a model folder's weights: name, shape, dtype and first row of every
    tensor in its safetensors files (reads kilobytes, not the whole model). None without safetensors."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sorted(sf.keys()):
                sl = sf.get_slice(name)
                shape = sl.get_shape()
                row = sl[0:1] if shape else sf.get_tensor(name)
                h.update(f"{name}:{shape}:{sl.get_dtype()}".encode())
                h.update(row.contiguous().view(torch.uint8).numpy().tobytes() if row.numel() else b"")
    return h.hexdigest()


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def save_adapter(model, tokenizer, out: Path, *, base_dir: Path, method: str, extra: dict | None = None) -> None:
    """PEFT-format adapter + tokenizer + lmforge_adapter.json in `out` (a temp folder the caller renames)."""
    out.mkdir(parents=True, exist_ok=True)
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = str(base_dir.resolve())
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    atomic_write_json(out / META, {"method": method, "base": str(base_dir.resolve()),
                                   "base_fingerprint": base_fingerprint(base_dir), **(extra or {})})


def save_trained(model, tokenizer, out: Path, *, adapter, base_dir: Path, extra: dict | None = None,
                 state_dict: dict | None = None) -> None:
    """What a training stage saves: the adapter (PEFT format, on `base_dir`) when `adapter` is
    enabled, else the whole model (HF format; `state_dict`: gathered weights of a sharded model);
    `extra` goes into its lmforge metadata."""
    from lmforge.models import save_model

    if adapter.enabled:
        save_adapter(model, tokenizer, out, base_dir=base_dir, method=adapter.method, extra=extra)
    else:
        save_model(model, tokenizer, out, extra=extra, state_dict=state_dict)


def adapter_base(adapter_dir: Path) -> Path:
    """The base folder an adapter records (lmforge's note first, then peft's adapter_config); a
    relative path that does not exist from here is taken relative to the adapter folder."""
    meta = adapter_dir / META
    try:
        base = (json.loads(meta.read_text())["base"] if meta.is_file() else
                json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path"))
    except (OSError, ValueError, KeyError):
        base = None
    if not base:
        raise LmforgeError(f"Adapter {adapter_dir} does not say which base model it belongs to; pass the base explicitly.")
    p = Path(base)
    if not p.is_absolute() and not p.exists() and (adapter_dir / p).exists():
        p = adapter_dir / p
    return p


def check_base(adapter_dir: Path, base_dir: Path) -> None:
    meta = adapter_dir / META
    if not meta.is_file():
        return  # a plain peft adapter: peft's own shape checks are all we have
    want = json.loads(meta.read_text()).get("base_fingerprint")
    have = base_fingerprint(base_dir)
    if want and have and want != have:
        raise LmforgeError(
            f"Adapter {adapter_dir} was trained on the base model {json.loads(meta.read_text())['base']}, and "
            f"{base_dir} has different weights; load it with the base model it was trained on.")


def is_prompt_learning(model) -> bool:
    """A prefix-tuning-type adapter: extra key/value positions, no weight update to merge."""
    return any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values())


def merge(base: str | Path, adapter: str | Path, out: str | Path) -> dict:
    """Write base + adapter as one plain HF model folder; returns the largest logit difference
    between the merged model and base + adapter on a probe batch (float rounding only)."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import load_model, save_model

    a = resolve_artifact(adapter, "adapter folder")
    if not is_adapter(a):
        raise LmforgeError(f"{a} is not an adapter folder (no adapter_config.json).")
    model = load_model(a, base=base, keep_adapter=True)
    if is_prompt_learning(model):
        raise LmforgeError(f"{a} is a prefix-tuning adapter: it adds key/value positions rather than weight updates, "
                           "so it cannot be merged; load base + adapter instead.")
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=probe).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=probe).logits
    diff = float((before - after).abs().max())
    tok = load_tokenizer(a) if (a / "tokenizer_config.json").is_file() else None
    with staged_dir(out) as tmp:
        save_model(merged, tok, tmp, extra={"merged_from": {"base": str(resolve_artifact(base)), "adapter": str(a)},
                                            "max_abs_logit_diff": diff})
    return {"out": str(out), "max_abs_logit_diff": diff}
