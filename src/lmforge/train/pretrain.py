"""Stage `pretrain`: pre-train a causal LM from scratch, or continue pre-training a checkpoint.

    curated data ──tokenise once──> tokens/train.bin (memmap) ──packed blocks──> shared loop
                                                                                │
    model/ (HF safetensors + tokenizer)  <──────── best or last weights ─────────┘

Attention is not masked at document boundaries (EOS separates documents, as in GPT-2 and
nanoGPT): the model learns that EOS starts something new, and no compute is spent on padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from lmforge.config import ModelSpec, Schema, TrainConfig
from lmforge.data.packing import PackedBlocks, load_tokens, token_byte_lengths, token_file
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.models import build_model, check_compatible, count_parameters, load_model
from lmforge.rundir import RunDir
from lmforge.train import policy
from lmforge.train.loop import LossOut, make_accelerator, train

ARTIFACT = "model"
PROVIDES = ("model",)
INPUTS = {"data": "data", "tokenizer": "tokenizer", "init_from": None}


class Config(Schema):
    data: str | None = Field(None, description="Curated data: a curate stage folder or its data/ folder.")
    tokenizer: str | None = Field(
        None, description="Tokenizer folder (a tokenizer stage's output); defaults to init_from's tokenizer."
    )
    init_from: str | None = Field(
        None, description="Continue pre-training this local HF checkpoint folder instead of building `model`."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="Architecture and size when building from scratch.")
    seq_len: int | None = Field(None, ge=2, description="Tokens per training block; None = the model's context length.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The shared training loop's settings.")


def causal_lm_loss(model, batch: dict) -> LossOut:
    """Summed next-token cross-entropy; batch["labels"] are already shifted (B, T)."""
    # use_cache=False: a training forward needs no key/value cache (HF builds one by default).
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")
    return LossOut(loss)


def make_eval(val: PackedBlocks, byte_lengths: torch.Tensor, *, batch_size: int, max_batches: int, device):
    """Validation loss, perplexity and bits per byte over the first blocks of the validation split."""
    n_blocks = min(val.n_blocks, batch_size * max_batches)

    def evaluate(model) -> dict:
        nats = torch.zeros((), dtype=torch.float64)
        nats_bytes = torch.zeros((), dtype=torch.float64)
        n_tok = n_bytes = 0
        for start in range(0, n_blocks, batch_size):
            b = val.batch(start, min(batch_size, n_blocks - start))
            logits = model(input_ids=b["input_ids"].to(device)).logits.float()
            per_tok = F.cross_entropy(logits.flatten(0, 1), b["labels"].to(device).flatten(), reduction="none").cpu()
            nb = byte_lengths[b["labels"].flatten()]
            nats += per_tok.sum().double()
            # bits per byte counts only tokens that stand for text (not EOS), as nanochat does.
            nats_bytes += (per_tok * (nb > 0)).sum().double()
            n_tok += per_tok.numel()
            n_bytes += int(nb.sum())
        loss = float(nats / n_tok)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": float(nats_bytes) / math.log(2) / n_bytes if n_bytes else float("nan"),
            "val_tokens": n_tok,
        }

    return evaluate


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    acc = make_accelerator(cfg.train)
    if cfg.data is None:
        raise LmforgeError("pretrain needs `data`: a curated data folder (the output of a curate stage).")
    tok_src = cfg.tokenizer or cfg.init_from
    if tok_src is None:
        raise LmforgeError("pretrain needs `tokenizer` (a tokenizer folder) or `init_from` (a model folder with one).")
    tokenizer = load_tokenizer(tok_src)
    if cfg.init_from:
        model = load_model(cfg.init_from)
        torch.manual_seed(cfg.train.seed)
    else:
        model = build_model(cfg.model, tokenizer, seed=cfg.train.seed)
    seq_len = cfg.seq_len or min(cfg.model.context_length, getattr(model.config, "max_position_embeddings", 1 << 30))
    check_compatible(model, tokenizer, seq_len, where="pretrain.seq_len")
    total, trainable = count_parameters(model)
    msg = f"pretrain: {total:,} parameters ({trainable:,} trainable), seq_len {seq_len}, device {acc.device}"
    if acc.is_main_process:
        print(msg)
        rd.log(msg)

    with acc.main_process_first():  # one process tokenises; the others then read its files
        train_bin = token_file(cfg.data, "train", tokenizer, rd.path / "tokens")
        val_bin = token_file(cfg.data, "validation", tokenizer, rd.path / "tokens")
    train_blocks = PackedBlocks(load_tokens(train_bin), seq_len, seed=cfg.train.seed, what="train")
    val_tokens = load_tokens(val_bin)
    eval_fn = None
    if len(val_tokens) > seq_len:
        val_blocks = PackedBlocks(val_tokens, seq_len, seed=0, shuffle=False, what="validation")
        eval_fn = make_eval(val_blocks, token_byte_lengths(tokenizer), batch_size=cfg.train.batch_size,
                            max_batches=cfg.train.eval_batches, device=acc.device)
    else:
        why = f"its validation split holds {len(val_tokens)} tokens, not more than one block of {seq_len}"
        policy.refuse_eval_without_validation(cfg.train, stage="pretrain", why=why)
        print(f"pretrain: {why}; training without evaluation.")

    result = train(model, cfg=cfg.train, rd=rd, data=train_blocks, loss_fn=causal_lm_loss, eval_fn=eval_fn,
                   resume=resume, label="pretrain", accelerator=acc, shardable=True)

    summary = {
        "parameters": total,
        "steps": result.step,
        "train_loss": result.train_loss,
        "best_val_loss": result.best_val_loss,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_seconds": round(result.wall_seconds, 2),
        "epochs": round(train_blocks.epochs(result.step * cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes), 3),
        **{k: v for k, v in result.last_eval.items()},
    }
    policy.save(model, tokenizer, rd, acc, extra={"stage": "pretrain", "summary": summary})
    return summary
