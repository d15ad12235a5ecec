"""Stage `sft`: supervised fine-tuning on conversations, fully or with a peft adapter.

    chat / Alpaca / prompt-completion rows ──chat template──> tokens + assistant-only mask
        ──mask check (decoded spans == assistant turns)──> packed or length-grouped batches
        ──shared loop (loss summed over supervised tokens)──> model/ (+ merged/)

Artifact layout (`model/` is what later stages, eval and serve load, through `lmforge.models.load_model`):

    full fine-tuning (adapter.method none)
        model/     a plain Hugging Face model folder (safetensors, config, tokenizer) + lmforge.json
    adapter runs (lora, dora, prefix, qlora)
        model/     a PEFT adapter folder: adapter_config.json + adapter_model.safetensors, loadable with
                   peft.PeftModel.from_pretrained(base, "model/"); the tokenizer (same as the base's);
                   lmforge_adapter.json = method, base folder, base-weights fingerprint, summary
        merged/    with `merge: true` (LoRA/DoRA/QLoRA only): base + adapter as one plain HF model
                   (QLoRA merges into the full-precision base, not the 4-bit copy it trained on)

Resume works for both: checkpoints hold only the parameters that require grad (the adapter,
for adapter runs), the optimizer, the schedule and the RNG; the data order is a pure function
of the step, so a resumed run is the same run.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from lmforge.adapters import AdapterConfig, merge
from lmforge.config import Schema, TrainConfig
from lmforge.data.formats import ReadStats, is_dataset_folder
from lmforge.data.sft import (
    IGNORE,
    Batching,
    ChatEncoder,
    Format,
    LengthBatches,
    Overlong,
    SFTExamples,
    iter_conversations,
    make_batches,
    mask_check,
    tokenize_conversations,
)
from lmforge.errors import LmforgeError
from lmforge.models import add_stop_token, check_compatible, context_length, load_config
from lmforge.rundir import RunDir, resolve_artifact
from lmforge.train import policy
from lmforge.train.loop import LossOut, make_accelerator, train

ARTIFACT = "model"
PROVIDES = ("model",)
INPUTS = {"data": None, "validation": None, "model": "model", "tokenizer": None}
DEFAULT_MAX_SEQ_LEN = 2048  # when seq_len is unset: the model's context, capped here (packing fills rows)


class Config(Schema):
    data: list[str] | str | None = Field(
        None, description="Training rows: JSONL/Parquet/CSV files, globs, folders, a `datasets` folder (its train "
        "split), or a curate stage folder (its train-*.parquet shards).")
    validation: list[str] | str | None = Field(
        None, description="Validation rows in the same formats; None = the data's validation split if it has one "
        "(datasets folder, curate folder), else `val_fraction` of the rows held out.")
    val_fraction: float = Field(0.02, ge=0, lt=1, description="Share of rows held out for validation when there "
                                "is no validation split (chosen by a hash of the row index, so stable).")
    max_val_examples: int = Field(1000, ge=1, description="Use at most this many validation examples.")
    format: Format = Field("auto", description="Row format: chat (messages), alpaca (instruction/input/output), "
                           "prompt_completion; auto detects it per row from the field names.")
    system_prompt: str | list[str] | None = Field(
        None, description="System turn added to rows that have none: one text, or a list from which each row "
        "draws one (seeded by train.seed); None = no system turn. A model trained without one may answer "
        "differently when one is given at inference: train with some (see system_prompt_share) to be robust to it.")
    system_prompt_share: float = Field(1.0, ge=0, le=1, description="Share of the rows without a system turn that "
                                       "get `system_prompt` (chosen per row, seeded); the rest keep none.")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="A malformed row (bad roles, empty content, missing fields, ...): error names file, "
        "row and field; skip skips it and counts it in the summary.")
    model: str | None = Field(None, description="Model to fine-tune: a pretrain/sft stage folder or any local HF "
                              "checkpoint folder (an adapter folder is merged into its base first).")
    tokenizer: str | None = Field(None, description="Tokenizer folder; None = the model folder's tokenizer.")
    seq_len: int | None = Field(None, ge=8, description="Longest training sequence (tokens); None = the model's "
                                f"context length, at most {DEFAULT_MAX_SEQ_LEN}.")
    overlong: Overlong = Field("truncate", description="Examples longer than seq_len: truncate (keep the start) or "
                               "drop; both are counted and reported.")
    train_on_prompt: bool = Field(False, description="Also train on system/user tokens (default: assistant turns "
                                  "and the end-of-turn token after each only).")
    batching: Batching = Field(
        "pack", description="pack = several examples per row of seq_len tokens, position ids restart per example "
        "(no attention across examples); group = one example per row, batches of similar length; pad = one example "
        "per row in random order, padded to the longest.")
    mask_check_examples: int = Field(8, ge=1, description="Examples whose supervised tokens are decoded and checked "
                                     "against the assistant turns before training starts.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, "
                                         "~30% more compute.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Full fine-tuning or a peft adapter.")
    merge: bool = Field(False, description="Adapter runs: also write merged/ (base + adapter as one HF model).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The shared training loop's settings.")

    @model_validator(mode="after")
    def _compatible(self) -> "Config":
        if self.adapter.method == "prefix" and self.batching == "pack":
            raise ValueError("adapter.method prefix cannot be combined with batching: pack (peft's prefix tuning "
                             "ignores position ids, so packed examples would see each other); use group or pad")
        if self.merge and self.adapter.method in ("none", "prefix"):
            raise ValueError(f"merge needs a LoRA-type adapter (lora, dora, qlora), not method {self.adapter.method}")
        if self.train.fsdp and self.adapter.enabled:
            raise ValueError("train.fsdp shards full fine-tuning only (an adapter is too small to shard, and its frozen "
                             "base is not sharded); set train.fsdp: false or adapter.method: none")
        return self


def _output_layer(model):
    """The LM head under any wrapper (DDP's .module, torch.compile's ._orig_mod, peft's delegation)."""
    m = getattr(model, "module", model)
    m = getattr(m, "_orig_mod", m)
    get = getattr(m, "get_output_embeddings", None)
    return get() if get is not None else None


def sft_loss(model, batch: dict) -> LossOut:
    """Summed cross-entropy over the supervised positions (batch["labels"] is shifted, IGNORE elsewhere).

    Equals F.cross_entropy(model(...).logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    (ignore_index -100), but the LM head only sees the supervised positions: a pre-hook on the
    output layer selects their hidden states, so the (B, T, V) logits of prompt and padding
    tokens are never computed. For a small model with a large vocabulary that is most of the
    step. The hook runs inside the model's forward, so DDP's gradient hooks still see it all.
    """
    labels = batch["labels"]
    keep = labels != IGNORE  # (B, T)
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    head = _output_layer(model)
    handle = head.register_forward_pre_hook(lambda mod, args: (args[0][keep],)) if head is not None else None
    try:
        # use_cache=False matters: with a cache object, transformers does not derive the
        # block-diagonal mask from restarting position ids.
        logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits  # (N, V), or (B, T, V)
    finally:
        if handle is not None:
            handle.remove()
    if logits.dim() == 3:  # no output layer to hook: select after the fact
        logits = logits[keep]
    return LossOut(F.cross_entropy(logits.float(), labels[keep], reduction="sum"))


def make_eval(val: LengthBatches, *, batch_size: int, max_batches: int):
    n = min(val.n, batch_size * max_batches)

    def evaluate(model) -> dict:
        device = next(p for p in model.parameters()).device
        nll, tokens = 0.0, 0
        for start in range(0, n, batch_size):
            b = val.batch(start, min(batch_size, n - start))
            out = sft_loss(model, {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()})
            nll += float(out.loss)
            tokens += b["n"]
        return {"val_loss": nll / max(tokens, 1), "val_eval_examples": n, "val_eval_tokens": tokens}

    return evaluate


def _splits(cfg: Config) -> tuple[dict, dict | None]:
    """How to read the train and validation rows: {patterns, dataset_split, keep}."""
    data = cfg.data
    if isinstance(data, str):
        p = Path(data)
        if p.is_dir() and (p / "manifest.json").is_file():
            p = resolve_artifact(p, "data folder")
        if p.is_dir() and list(p.glob("train-*.parquet")):  # a curate stage's output
            val = sorted(p.glob("validation-*.parquet"))
            return ({"patterns": [str(f) for f in sorted(p.glob("train-*.parquet"))]},
                    {"patterns": cfg.validation or [str(f) for f in val]} if (val or cfg.validation) else None)
        if is_dataset_folder(p) and (p / "dataset_dict.json").is_file():
            import json

            names = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            if "train" not in names:
                raise LmforgeError(f"datasets folder {p} has no 'train' split (it has: {', '.join(names)}).")
            vsplit = next((s for s in ("validation", "valid", "test") if s in names), None)
            train = {"patterns": [str(p)], "dataset_split": "train"}
            if cfg.validation:
                return train, {"patterns": cfg.validation}
            return train, ({"patterns": [str(p)], "dataset_split": vsplit} if vsplit else None)
        data = [str(p)]
    if cfg.validation:
        return {"patterns": data}, {"patterns": cfg.validation}
    if cfg.val_fraction == 0:
        return {"patterns": data}, None
    # Knuth's multiplicative hash of the row index: a stable, well-spread hold-out.
    cut = int(cfg.val_fraction * 2**32)

    def held(i: int) -> bool:
        return (i * 2654435761 + cfg.train.seed) % 2**32 < cut

    return {"patterns": data, "keep": lambda i: not held(i)}, {"patterns": data, "keep": held}


def load_split(spec: dict, cfg: Config, encoder: ChatEncoder, seq_len: int, *, limit: int | None = None,
               what: str) -> tuple[SFTExamples, ReadStats]:
    stats = ReadStats()
    convs = iter_conversations(spec["patterns"], fmt=cfg.format, on_bad_rows=cfg.on_bad_rows, stats=stats,
                               dataset_split=spec.get("dataset_split"), system_prompt=cfg.system_prompt,
                               system_share=cfg.system_prompt_share, seed=cfg.train.seed,
                               keep=spec.get("keep"))
    if limit is not None:
        convs = itertools.islice(convs, limit)
    ex = tokenize_conversations(convs, encoder, seq_len=seq_len, overlong=cfg.overlong,
                                n_checks=cfg.mask_check_examples)
    if len(ex) == 0:
        skipped = f"; {stats.total_skipped} rows skipped ({stats.skipped})" if stats.total_skipped else ""
        raise LmforgeError(f"The {what} rows hold no usable example ({ex.stats['dropped_too_long']} too long, "
                           f"{ex.stats['dropped_no_target_after_truncation']} without a target after truncation"
                           f"{skipped}); check the data and seq_len.")
    return ex, stats


def _data_report(what: str, ex: SFTExamples, stats: ReadStats) -> dict:
    s = ex.stats
    return {f"{what}_{k}": v for k, v in {
        "examples": s["examples"], "formats": s["formats"], "truncated": s["truncated"],
        "dropped_too_long": s["dropped_too_long"],
        "dropped_no_target_after_truncation": s["dropped_no_target_after_truncation"],
        "skipped_rows": stats.total_skipped, "skipped_by_reason": dict(stats.skipped),
        "tokens": s["tokens"], "supervised_tokens": s["supervised_tokens"]}.items()}


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    acc = make_accelerator(cfg.train)
    main = acc.is_main_process

    def say(msg: str) -> None:
        if main:
            print(msg)
            rd.log(msg)

    if cfg.data is None:
        raise LmforgeError("sft needs `data`: files or a folder of chat, Alpaca or prompt/completion rows.")
    begin = policy.start(cfg.model, stage="sft", tokenizer=cfg.tokenizer)
    base_dir, tokenizer = begin.src, begin.tokenizer

    # 1. Data: rows -> conversations -> tokens + mask, then the mask check.
    # (before the model loads, which can take minutes: bad data should fail at once)
    encoder = ChatEncoder(tokenizer, train_on_prompt=cfg.train_on_prompt)
    seq_len = cfg.seq_len or min(context_length(load_config(base_dir)) or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    train_spec, val_spec = _splits(cfg)
    train_ex, train_stats = load_split(train_spec, cfg, encoder, seq_len, what="training")
    summary: dict = _data_report("train", train_ex, train_stats)
    example = mask_check(train_ex, encoder, what="training data")
    say(f"sft: mask check passed on {len(train_ex.checks)} examples; supervised spans marked ⟦ ⟧:\n  {example}")
    say(f"sft: {len(train_ex)} training examples ({train_ex.stats['formats']}), {train_ex.stats['truncated']} "
        f"truncated and {train_ex.stats['dropped_too_long'] + train_ex.stats['dropped_no_target_after_truncation']} "
        f"dropped at seq_len {seq_len} ({cfg.overlong}), {train_stats.total_skipped} bad rows skipped"
        + (f" {dict(train_stats.skipped)}" if train_stats.total_skipped else ""))
    eval_fn = None
    if val_spec is not None:
        try:
            val_ex, val_stats = load_split(val_spec, cfg, encoder, seq_len, limit=cfg.max_val_examples,
                                           what="validation")
        except LmforgeError as e:
            if "hold no usable example" not in str(e) or cfg.validation:
                raise
            why = f"the held-out share (val_fraction {cfg.val_fraction}) holds no example"
            policy.refuse_eval_without_validation(cfg.train, stage="sft", why=why)
            say(f"sft: {why}; training without evaluation.")
        else:
            summary.update(_data_report("val", val_ex, val_stats))
            val = LengthBatches(val_ex, batch_size=cfg.train.batch_size, seed=0, pad_id=tokenizer.pad_token_id,
                                grouped=True, shuffle=False)
            eval_fn = make_eval(val, batch_size=cfg.train.batch_size, max_batches=cfg.train.eval_batches)

    if val_spec is None:
        policy.refuse_eval_without_validation(cfg.train, stage="sft", why="no validation rows and val_fraction 0")

    # 2. Model: full fine-tuning, or a fresh adapter on the frozen base.
    sharded = cfg.train.fsdp and acc.num_processes > 1
    pol = policy.setup(begin, adapter=cfg.adapter, seed=cfg.train.seed, acc=acc, rd=rd, no_dropout=False,
                       gradient_checkpointing=cfg.gradient_checkpointing, sharded=sharded)
    model, trainable, total = pol.model, pol.trainable, pol.total
    check_compatible(model, tokenizer, seq_len, where="sft.seq_len")
    say(f"sft: {policy.describe(pol)}, seq_len {seq_len}, batching {cfg.batching}, device {acc.device}")

    data = make_batches(train_ex, cfg.batching, seq_len=seq_len, batch_size=cfg.train.batch_size,
                        seed=cfg.train.seed, pad_id=tokenizer.pad_token_id)
    result = train(model, cfg=cfg.train, rd=rd, data=data, loss_fn=sft_loss, eval_fn=eval_fn, resume=resume,
                   label="sft", accelerator=acc, shardable=not cfg.adapter.enabled)

    per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    seen = data.examples_in(result.step * per_step)
    summary.update({
        "method": cfg.adapter.method, "trainable_parameters": trainable, "parameters": total,
        "trainable_share": trainable / total, "seq_len": seq_len, "batching": cfg.batching,
        "steps": result.step, "train_loss": result.train_loss, "best_val_loss": result.best_val_loss,
        "best_step": result.best_step, "stopped_early": result.stopped_early,
        "examples_seen": seen, "epochs": round(seen / len(train_ex), 3), "tokens_per_s": round(result.tokens_per_s, 1),
        "train_seconds": round(result.wall_seconds, 2), **result.last_eval,
    })
    # Replies now end with the template's end-of-turn token; when that is not EOS (a reused
    # template: <|im_end|>, <|eot_id|>), plain transformers' generate must stop there too.
    add_stop_token(model, encoder.eot_id)
    policy.save(model, tokenizer, rd, acc, adapter=cfg.adapter, base_dir=pol.base_dir,
                extra={"stage": "sft", "summary": summary})
    if cfg.merge and main:
        summary["merged"] = merge(pol.base_dir, rd.artifact, rd.path / "merged")
        say(f"sft: merged base + adapter into {rd.path / 'merged'} "
            f"(max |logit difference| {summary['merged']['max_abs_logit_diff']:.2e})")
    acc.wait_for_everyone()
    return summary
