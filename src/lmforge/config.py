"""Typed configuration: the base schema, YAML loading, `key=value` overrides, and the shared
training schema every training stage embeds.

Every stage's configuration is a pydantic model derived from `Schema`: unknown keys, wrong
types and out-of-range values are rejected before any work starts, with the full key path and,
for a misspelled key, the closest valid name. Stage-specific schemas live next to their stage
(`data/curate.py: CurateConfig`, `train/pretrain.py: PretrainConfig`, ...); what is shared by
several stages lives here.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmforge.errors import LmforgeError


class Schema(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated, and no float
    may be nan or infinite (a bound like `le=1` does not catch nan: every comparison is false)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Loading and validating


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from `path`, with one clear sentence on any problem."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"Config file {p} does not exist; check the path.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LmforgeError(f"Config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"Config file {p} cannot be read ({e}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"Config file {p} must hold a mapping of keys to values, not a {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value parsed as a YAML scalar/list."""
    if "=" not in text:
        raise LmforgeError(f"Override {text!r} must look like key.path=value.")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise LmforgeError(f"Override {text!r} has an empty key; write it as key.path=value.")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string; a user writing lr=3e-4 means a number
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.split("."), value


def set_path(data: dict, path: list[str], value: Any, *, origin: str) -> None:
    """Set data[path[0]][path[1]]... = value, creating mappings on the way."""
    node = data
    for i, part in enumerate(path[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise LmforgeError(
                f"Override {origin!r}: {'.'.join(path[: i + 1])} is a value, not a section, so it has no key {path[i + 1]!r}."
            )
        node = nxt
    node[path[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        set_path(data, path, value, origin=text)
    return data


def _unwrap(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation may hold (through Optional, Union, list, dict)."""
    out: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in typing.get_args(annotation):
        out += _unwrap(arg)
    return out


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the model found at `loc` inside `schema` (for 'did you mean')."""
    models = [schema]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            f = m.model_fields.get(str(part))
            if f is not None:
                nxt += _unwrap(f.annotation)
        if not nxt:
            break
        models = nxt
    names: list[str] = []
    for m in models:
        names += list(m.model_fields)
    return names


def _describe(err: dict, schema: type[BaseModel], prefix: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    full = f"{prefix}{key}" if key else prefix.rstrip(".")
    if err["type"] == "extra_forbidden":
        valid = _fields_at(schema, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f" did you mean {prefix}{'.'.join(str(p) for p in loc[:-1] + (close[0],))}?" if close else (
            f" valid keys here are: {', '.join(sorted(valid))}." if valid else ""
        )
        return f"Unknown config key {full};{hint}"
    if err["type"] == "missing":
        return f"Config key {full} is required but missing."
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not key:  # a whole-config check (a model validator): its message names its own fields
        return f"{prefix.rstrip('.')}: {msg}." if prefix else f"{msg}."
    got = err.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
    return f"Config key {full} is invalid{shown}: {msg}."


def validate(schema: type[BaseModel], data: dict, *, where: str = "", prefix: str = "") -> Any:
    """Build `schema` from `data`; on failure raise one LmforgeError listing every problem.

    `where` names the source (a file) and `prefix` the key path of `data` inside it, so a
    message reads "recipe.yaml: Unknown config key stages.2.train.lr; did you mean ...".
    """
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, schema, prefix) for err in e.errors()]
        head = f"{where}: " if where else ""
        raise LmforgeError(head + " ".join(lines)) from None


# --------------------------------------------------------------------------------------------
# Shared schemas


def check_device(name: str | None) -> str | None:
    """`name` if torch knows the device and this machine has it (None passes: "the default");
    raises ValueError with the reason otherwise. Every `device` setting and --device goes through it."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name!r} is not a device name torch knows; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"this machine has {have} CUDA device(s); use cpu{' or cuda:0' if have else ''}")
    return name


Device = Annotated[str | None, AfterValidator(check_device)]  # a `device` setting, checked before any work


class ModelSpec(Schema):
    """A model to build from scratch (when `init_from` is unset) — Llama-style by default."""

    architecture: str = Field(
        "llama",
        description="A `transformers` causal-LM model type (llama, qwen2, mistral, gpt2, ...). "
        "Sizes below are mapped onto that architecture's config names.",
    )
    n_layers: int = Field(4, ge=1, le=256, description="Transformer blocks.")
    d_model: int = Field(128, ge=8, description="Hidden width; must be divisible by n_heads.")
    n_heads: int = Field(4, ge=1, description="Attention heads.")
    n_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (GQA); None = n_heads.")
    d_ff: int | None = Field(None, ge=8, description="MLP hidden width; None = about 8/3 * d_model rounded to 32.")
    context_length: int = Field(256, ge=8, description="Maximum sequence length (positions).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Attention dropout probability.")
    tie_embeddings: bool = Field(True, description="Share input and output embeddings (saves vocab*d_model params).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (Llama-family only).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Further keys passed verbatim to the HF config.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv})")
        return self


class TrainConfig(Schema):
    """The shared training loop's settings (every training stage embeds one as `train:`)."""

    seed: int = Field(1337, description="Seeds data order, initialisation and dropout.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of peak (cosine/linear).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps from 0 to peak LR.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay.")
    decay_norms_and_embeddings: bool = Field(
        False, description="Also decay norms, biases and embeddings (usually hurts; off by default)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global grad norm to this; None = off.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 on a GPU that supports it, fp32 on CPU. bf16 on CPU is autocast: about 2x faster "
        "on CPUs with AMX for models of a few million parameters and up, slower for tiny ones.",
    )
    eval_every: int = Field(50, ge=0, description="Validate every N steps (0 = only at the end).")
    eval_batches: int = Field(20, ge=1, description="Validation micro-batches per evaluation.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation loss."
    )
    keep_best: bool = Field(True, description="Export the checkpoint with the best validation loss, not the last.")
    checkpoint_every: int = Field(100, ge=0, description="Write a resumable checkpoint every N steps (0 = never).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N step checkpoints.")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")
    tensorboard: bool = Field(True, description="Also write metrics as TensorBoard events under tensorboard/.")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the model: true, false, or auto = compile when the predicted run is long "
        "enough to repay the one-off compile time (lmforge.estimate; the decision is logged).")
    fsdp: bool = Field(
        False,
        description="With several processes (accelerate launch / torchrun): shard weights, gradients and optimizer "
        "state across them (FSDP2) instead of replicating them (DDP). pretrain and full-fine-tuning sft only; "
        "ignored with one process.",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (None = torch's default).")
