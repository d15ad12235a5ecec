"""Loading a model to sample from: a local HF folder, a stage's output, or base + PEFT adapter."""

from __future__ import annotations

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
    from transformers import AutoTokenizer

    from lmforge.adapters import adapter_base, is_adapter
    from lmforge.models import load_model
    from lmforge.rundir import resolve_artifact

    folder = resolve_artifact(path, "model")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device {dev} was asked for, but no CUDA GPU is available; use --device cpu.")
    model = load_model(folder, device=dev, dtype=_torch_dtype(dtype, dev))  # an adapter: merged, base checked
    base = resolve_artifact(adapter_base(folder), "base model") if is_adapter(folder) else folder
    tok_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"No tokenizer could be loaded from {tok_dir} ({str(e).splitlines()[0]}).") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # only used to fill left padding, which is masked
    return model, tokenizer
