"""The set-up and the save that every fine-tuning stage shares (sft, reward, dpo, ppo, grpo).

    `model:` (a stage folder, a Hugging Face model folder or an adapter folder)
        ──resolve + load_tokenizer──> Start (cheap: a stage checks its data before the model loads)
        ──seed, models.load_model──> the starting weights (an adapter merged in; 4-bit for QLoRA)
        ──base/ when a new adapter goes on an adapter: the merged start as a folder it can name
          (a keyed cache entry: rebuilt when the starting adapter or its base changes)──
        ──apply_adapter──> the policy (only the adapter trains) ──dropout off──> the device
    ... the stage trains it ...
    save ──> model/: the whole model (HF) or the adapter (PEFT, on base_dir), written by process 0
             into a temporary folder and renamed (rundir.staged_dir); every process returns after

Every stage gets the same rules this way: the seed is set right before the weights load (a fresh
adapter's or head's initialisation depends on it), the adapter's recorded base is a folder that
exists, a 4-bit base is placed by `from_pretrained` and never moved, and only process 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.adapters import (
    AdapterConfig,
    adapter_base,
    apply_adapter,
    base_fingerprint,
    is_adapter,
    save_trained,
    trainable_report,
)
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models import Head, context_length, disable_dropout, load_model, save_model
from lmforge.rundir import RunDir, file_sha256, resolve_artifact, staged_dir
from lmforge.train import fsdp


@dataclass
class Start:
    """Where a stage starts: the folder `model:` names and its tokenizer."""

    src: Path
    tokenizer: Any


@dataclass
class Policy:
    model: torch.nn.Module  # what trains: the model, or its peft wrapper
    tokenizer: Any
    src: Path  # the starting folder
    base_dir: Path  # the folder a saved adapter names as its base: src, or base/ (the merged start)
    adapter: AdapterConfig
    head: Head
    trainable: int
    total: int
    base_reused: bool | None = None  # base/ (the merged start) reused from an earlier run; None: none needed

    @property
    def quantized(self) -> bool:
        return self.adapter.method == "qlora"


def start(model: str | Path | None, *, stage: str, tokenizer: str | Path | None = None) -> Start:
    """The starting folder and its tokenizer (or `tokenizer`); one sentence when `model` is unset."""
    if model is None:
        raise LmforgeError(f"{stage} needs `model`: the model to start from (a stage folder, a Hugging Face model "
                           "folder or an adapter folder).")
    src = resolve_artifact(model, "model folder")
    return Start(src, load_tokenizer(tokenizer or src))


def setup(begin: Start, *, adapter: AdapterConfig, seed: int, acc, rd: RunDir, head: Head = "causal_lm",
          no_dropout: bool = True, gradient_checkpointing: bool = False, sharded: bool = False) -> Policy:
    """The policy a fine-tuning stage trains: the starting weights (seeded), a fresh adapter when
    `adapter` asks for one, dropout off (`no_dropout`), on the accelerator's device.

    head "reward": a one-label sequence-classification model (see models.load_model) whose pad
    token is the tokenizer's; its adapter trains the scalar head whole. `sharded`: the loop will
    shard the model (train.fsdp), which places it, so it stays on the CPU here."""
    from lmforge.scoring import classifier_head

    torch.manual_seed(seed)  # a fresh adapter's (and a reward head's) initialisation
    qlora = adapter if adapter.method == "qlora" else None
    model = load_model(begin.src, head=head, qlora=qlora, device=acc.device if qlora is not None else None)
    base_dir, base_reused = begin.src, None
    if adapter.enabled and head == "causal_lm" and is_adapter(begin.src):
        base_dir, base_reused = merged_start(model, begin, rd, acc)
    if head == "reward":
        model.config.pad_token_id = begin.tokenizer.pad_token_id  # HF's own forward reads the last non-pad token
        classifier_head(model)  # fail now, not after the data pass, for a model without a head
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapter.enabled:
            model.enable_input_require_grads()  # a frozen embedding would cut the graph otherwise
    if adapter.enabled:
        model = apply_adapter(model, adapter, head)
    if no_dropout:
        disable_dropout(model)
    if qlora is None and not sharded:  # a 4-bit base is placed by from_pretrained(device_map=...)
        model.to(acc.device)
    trainable, total = trainable_report(model)
    return Policy(model, begin.tokenizer, begin.src, base_dir, adapter, head, trainable, total, base_reused)


def merged_start(model, begin: Start, rd: RunDir, acc) -> tuple[Path, bool]:
    """base/: the merged starting model as a folder, so that a new adapter trained on it names a
    base that exists (a chain of adapters would need every link to load). A keyed cache entry
    (`RunDir.cache`): reused while the starting adapter's weights and its base are unchanged,
    rebuilt when either changes. Process 0 builds it; returns (folder, whether it was reused)."""
    src = begin.src
    parts = {"kind": "merged-start-v1",
             "adapter": {f.name: file_sha256(f) for f in sorted(src.glob("*.safetensors"))},
             "adapter_config": file_sha256(src / "adapter_config.json"),
             "base": base_fingerprint(resolve_artifact(adapter_base(src), "base model folder"))}
    with acc.main_process_first():  # process 0 builds it; the others then find it
        entry = rd.cache("base", parts, lambda tmp: save_model(model, begin.tokenizer, tmp))
    return entry.path, entry.hit


def max_length(asked: int | None, model, *, where: str) -> int:
    """The longest sequence a stage encodes: `asked`, or the model's context; one sentence when
    it does not fit the model (or the model does not say and nothing was asked)."""
    ctx = context_length(model)
    if asked is None and ctx is None:
        raise LmforgeError(f"{where}: the model's config states no context length; set it.")
    if asked is not None and ctx is not None and asked > ctx:
        raise LmforgeError(f"{where} {asked} is longer than the model's context of {ctx} positions; lower it.")
    return asked or ctx


def refuse_eval_without_validation(train, *, stage: str, why: str) -> None:
    """A run without validation data cannot honour what needs a validation loss: early stopping,
    periodic evaluation (eval_every > 0), keeping the best weights (keep_best set to true). Asking
    for them is refused in one sentence rather than silently ignored. The defaults pass, and so do
    eval_every 0 and eval_batches (which only size an evaluation)."""
    asked = [f"early_stopping_patience {train.early_stopping_patience}"] if train.early_stopping_patience else []
    given = train.model_fields_set
    asked += [f"eval_every {train.eval_every}"] if "eval_every" in given and train.eval_every else []
    asked += ["keep_best true"] if "keep_best" in given and train.keep_best else []
    if asked:
        raise LmforgeError(f"{stage}: train.{', train.'.join(asked)} {'need' if len(asked) > 1 else 'needs'} a "
                           "validation loss, and this run has no "
                           f"validation data ({why}); give validation data or remove {'them' if len(asked) > 1 else 'it'}.")


def describe(p: Policy) -> str:
    """One line: what trains, out of how much."""
    what = p.adapter.method if p.adapter.enabled else "full fine-tuning"
    return f"{what}: {p.trainable:,} trainable of {p.total:,} parameters ({100 * p.trainable / p.total:.3f}%)"


# --------------------------------------------------------------------------------------------
# The save


def save(model, tokenizer, rd: RunDir, acc, *, adapter: AdapterConfig | None = None, base_dir: Path | None = None,
         extra: dict | None = None, also: Callable[[Path], None] | None = None) -> None:
    """model/: `model` whole (HF format) or, with an enabled `adapter`, its adapter (PEFT format,
    on `base_dir`); `extra` goes into its lmforge metadata; `also(folder)` adds files beside it.
    Every process calls this (gathering a sharded model is collective); process 0 writes, into a
    temporary folder renamed into place; all return once the folder is there."""
    weights = fsdp.weights_to_save(model)  # every process: a collective when sharded
    if acc.is_main_process:
        with staged_dir(rd.artifact) as tmp:
            if adapter is not None:
                save_trained(model, tokenizer, tmp, adapter=adapter, base_dir=base_dir, extra=extra, state_dict=weights)
            else:
                save_model(model, tokenizer, tmp, extra=extra, state_dict=weights)
            if also is not None:
                also(tmp)
    acc.wait_for_everyone()


def merged(p: Policy, rd: RunDir):
    """The trained policy as one plain model (an adapter merged in). A 4-bit (QLoRA) base is
    loaded again in full precision and the adapter merged into that, so the saved model carries
    no quantisation error on top of the adapter."""
    if not p.adapter.enabled:
        return p.model
    if not p.quantized:
        return p.model.merge_and_unload()
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=rd.path))
    try:
        p.model.save_pretrained(str(tmp))
        out = load_model(tmp, base=p.src, head=p.head)  # the full-precision start + the trained adapter, merged
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if p.head == "reward":
        out.config.pad_token_id = p.tokenizer.pad_token_id
    return out
