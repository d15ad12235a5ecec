"""Loading a model to sample from: a local HF folder, a stage's output, or base + PEFT adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError


def _torch_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in names:
        raise LmforgeError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}.")
    return names[dtype]


def load_model_for_inference(path: str | Path, device: str | torch.device | None = None,
                             dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode from a local HF causal-LM folder, a stage folder (has
    manifest.json) or a PEFT adapter folder (has adapter_config.json; its base is loaded and the
    adapter merged in, which makes sampling as fast as with the base model).

    device: "cpu", "cuda", "cuda:1", ... (default: cuda when available); dtype: auto (bf16 on a
    GPU that supports it, else fp32), fp32, bf16 or fp16.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.rundir import resolve_artifact

    folder = resolve_artifact(path, "model")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device {dev} was asked for, but no CUDA GPU is available; use --device cpu.")
    dt = _torch_dtype(dtype, dev)
    adapter = folder / "adapter_config.json"
    base = folder
    if adapter.is_file():
        try:
            base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError):
            raise LmforgeError(f"{adapter} names no base_model_name_or_path; it cannot be loaded.") from None
        base = Path(base_name)
        if not base.is_absolute() and not base.exists() and (folder / base).exists():
            base = folder / base
        base = resolve_artifact(base, "base model")
    if not (base / "config.json").is_file():
        raise LmforgeError(f"{base} is not a Hugging Face model folder (it has no config.json).")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dt)
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"The model in {base} cannot be loaded ({str(e).splitlines()[0]}).") from None
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    tok_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"No tokenizer could be loaded from {tok_dir} ({str(e).splitlines()[0]}).") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # only used to fill left padding, which is masked
    model.to(dev).eval()
    return model, tokenizer
