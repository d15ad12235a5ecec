"""Stage `distill`: a student learns a teacher's token distributions on SFT conversations.

    chat / Alpaca / prompt-completion rows ──chat template (data/sft.py's encoder)──> tokens + mask
        ──teacher, ONCE: top-k log-probs at every supervised position──> teacher/ (a keyed cache)
        ──teacher dropped from memory──> student (full or adapter, train/policy.py)
        ──shared loop: weight x divergence(student, teacher top-k) + (1 - weight) x hard-label NLL──> model/

The teacher cache (`teacher/`, `RunDir.cache`) is keyed by the teacher's weights (content hash
of its folder), the tokenised data (ids + supervision mask: so the rows, the tokenizer, seq_len
and format all count) and k. It holds, for the i-th supervised position of the data in order:

    indices.npy    int32 (positions, k)   the teacher's k most likely next tokens
    logprobs.npy   fp16  (positions, k)   their log-probs under the teacher's full softmax

i.e. 6k bytes per supervised token: k 32 is 192 B/token, 1.9 GB for 10M supervised tokens.
fp16 keeps log-probs to ~1e-3 relative, well under the divergence's own noise. The losses
renormalise both distributions over these k tokens (see losses.topk_divergence).

Teacher and student must share the tokenizer (the same vocabulary, id for id): distributions
over different vocabularies are not comparable, and this stage refuses them in one sentence
rather than aligning them.

Artifact layout: model/ exactly as sft writes it (a HF model folder, or a PEFT adapter on its base).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from lmforge.adapters import AdapterConfig
from lmforge.config import Schema, TrainConfig
from lmforge.data.sft import (
    IGNORE,
    Batching,
    ChatEncoder,
    Format,
    LengthBatches,
    Overlong,
    PackedRows,
    SFTExamples,
    make_batches,
    mask_check,
)
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.losses import distill_loss
from lmforge.models import add_stop_token, check_compatible, context_length, load_config, load_model
from lmforge.rundir import RunDir, fingerprint_path
from lmforge.train import policy
from lmforge.train.loop import LossOut, make_accelerator, train

# sft.load_split reads this Config's data fields (format, on_bad_rows, system_prompt(_share), overlong,
# mask_check_examples, train.seed): the one way rows become examples, shared, not copied.
from lmforge.train.sft import load_split, make_eval

ARTIFACT = "model"
PROVIDES = ("model",)
INPUTS = {"data": None, "validation": None, "model": "model", "teacher": None, "tokenizer": None}
DEFAULT_MAX_SEQ_LEN = 2048


class Config(Schema):
    data: list[str] | str | None = Field(None, description="Training rows (JSONL/Parquet/CSV files, globs, folders) in "
                                         "chat, Alpaca or prompt/completion format, as sft reads them.")
    validation: list[str] | str | None = Field(None, description="Validation rows in the same formats; the student's "
                                               "hard-label loss on them is val_loss. None = no evaluation.")
    format: Format = Field("auto", description="Row format: chat, alpaca, prompt_completion, or auto per row.")
    system_prompt: str | list[str] | None = Field(None, description="System turn(s) added to rows that have none "
                                                  "(a list: one chosen per row, seeded), as in sft.")
    system_prompt_share: float = Field(1.0, ge=0, le=1, description="Share of the rows without a system turn that "
                                       "get `system_prompt`, as in sft.")
    on_bad_rows: Literal["error", "skip"] = Field("error", description="A malformed row: error names it; skip counts it.")
    model: str | None = Field(None, description="The student to start from: a stage folder, a HF model folder or an "
                              "adapter folder.")
    teacher: str | None = Field(None, description="The teacher: a stage folder or a local HF causal-LM folder (an "
                                "adapter folder is merged into its base); it must use the student's tokenizer.")
    tokenizer: str | None = Field(None, description="Tokenizer folder; None = the student's.")
    seq_len: int | None = Field(None, ge=8, description="Longest training sequence (tokens); None = the student's "
                                f"context, at most {DEFAULT_MAX_SEQ_LEN}.")
    overlong: Overlong = Field("truncate", description="Examples longer than seq_len: truncate or drop (counted).")
    train_on_prompt: bool = Field(False, description="Also distil on system/user tokens (default: assistant turns only).")
    mask_check_examples: int = Field(8, ge=1, description="Examples whose supervised spans are decoded and checked "
                                     "before training.")
    batching: Batching = Field("pack", description="pack, group or pad, as in sft.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl KL(teacher||student), reverse_kl KL(student||teacher), or jsd "
        "(generalised Jensen-Shannon, weighted by jsd_beta); all over the teacher's top-k.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd only: the teacher's weight in the mixture (0.5 = "
                            "symmetric JSD).")
    distill_weight: float = Field(0.5, ge=0, le=1, description="Loss = w x divergence + (1 - w) x hard-label "
                                  "cross-entropy; 1 = pure distillation, 0 = plain SFT.")
    top_k: int = Field(32, ge=1, le=4096, description="Teacher tokens kept per position (6 x top_k bytes per "
                       "supervised token on disk).")
    teacher_batch_size: int = Field(8, ge=1, description="Examples per teacher forward pass while building the cache.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Full fine-tuning or a peft adapter "
                                   "for the student.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The shared training loop's settings.")


# --------------------------------------------------------------------------------------------
# The teacher: checked, run once over the data, its top-k cached


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_teacher(teacher: Path, student_tok, *, tokenizer_from: str) -> None:
    """One sentence when the teacher is no causal LM or does not share the student's tokenizer."""
    archs = list(getattr(load_config(teacher), "architectures", None) or [])
    if archs and not any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        raise LmforgeError(f"distill.teacher {teacher} is a {archs[0]}, not a causal language model; give a model "
                           "folder whose config names a ...ForCausalLM architecture.")
    t_tok = load_tokenizer(teacher)
    if t_tok.get_vocab() != student_tok.get_vocab():
        differ = len(set(t_tok.get_vocab().items()) ^ set(student_tok.get_vocab().items()))
        raise LmforgeError(f"distill.teacher {teacher} uses another tokenizer than {tokenizer_from} ({len(t_tok)} vs "
                           f"{len(student_tok)} tokens, {differ} entries differ); distillation compares "
                           "distributions id by id, so teacher and student need the same tokenizer.")


def data_fingerprint(ex: SFTExamples) -> str:
    """sha256 of the tokenised data: ids, supervision mask and example boundaries."""
    import hashlib

    h = hashlib.sha256()
    for a in (ex.ids, ex.sup, ex.offsets):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def target_offsets(ex: SFTExamples) -> np.ndarray:
    """Example i's supervised positions are cache rows [out[i], out[i+1]) (int64, n + 1)."""
    cs = np.concatenate([[0], np.cumsum(ex.sup, dtype=np.int64)])
    return cs[ex.offsets]


@torch.no_grad()
def teacher_topk(teacher, ex: SFTExamples, *, k: int, vocab: int, batch_size: int, pad_id: int, device
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(indices int32, log-probs fp16), one row per supervised position of `ex`, in order.

    Only the tokenizer's `vocab` ids compete (a model's embedding may be padded past them)."""
    batches = LengthBatches(ex, batch_size=batch_size, seed=0, pad_id=pad_id, grouped=False, shuffle=False)
    n_rows = int(ex.sup.sum())
    idx = np.zeros((n_rows, k), dtype=np.int32)
    lp = np.zeros((n_rows, k), dtype=np.float16)
    row = 0
    for start in range(0, len(ex), batch_size):
        b = batches.batch(start, min(batch_size, len(ex) - start))
        keep = b["labels"] != IGNORE
        logits = teacher(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                         use_cache=False).logits[keep.to(device)].float()[:, :vocab]
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        n = top.indices.shape[0]
        idx[row:row + n] = top.indices.cpu().numpy()
        lp[row:row + n] = top.values.cpu().numpy()
        row += n
    assert row == n_rows, (row, n_rows)  # order: examples in order, positions in order
    return idx, lp


def teacher_cache(cfg: Config, ex: SFTExamples, tokenizer, rd: RunDir, acc, say) -> tuple[np.ndarray, np.ndarray, bool]:
    """The teacher's top-k over `ex`, built once and reused while teacher, data and k are unchanged."""
    teacher_dir = Path(cfg.teacher)
    k = min(cfg.top_k, len(tokenizer))
    parts = {"kind": "teacher-topk-v1", "teacher": fingerprint_path(teacher_dir), "data": data_fingerprint(ex), "k": k}

    def build(tmp: Path) -> dict:
        say(f"distill: running the teacher {teacher_dir} once over {int(ex.sup.sum())} supervised tokens (top-{k})")
        teacher = load_model(teacher_dir, device=acc.device)
        idx, lp = teacher_topk(teacher, ex, k=k, vocab=len(tokenizer), batch_size=cfg.teacher_batch_size,
                               pad_id=tokenizer.pad_token_id, device=acc.device)
        del teacher
        gc.collect()
        tmp.mkdir()
        np.save(tmp / "indices.npy", idx)
        np.save(tmp / "logprobs.npy", lp)
        return {"positions": int(idx.shape[0]), "k": k, "bytes_per_token": 6 * k}

    with acc.main_process_first():
        entry = rd.cache("teacher", parts, build, echo=say)
    idx, lp = np.load(entry.path / "indices.npy"), np.load(entry.path / "logprobs.npy")
    if idx.shape != (int(ex.sup.sum()), k) or lp.shape != idx.shape:
        raise LmforgeError(f"{entry.path} holds {idx.shape} teacher rows, not the {(int(ex.sup.sum()), k)} the data "
                           "needs; delete it to rebuild it.")
    return idx, lp, entry.hit


# --------------------------------------------------------------------------------------------
# Batches that carry the teacher's rows, and the loss


class TeacherBatches:
    """sft's batches plus `teacher_idx` / `teacher_logp` (N, k), N = the batch's supervised
    positions in the order `labels[labels != IGNORE]` lists them (row by row, example by example)."""

    def __init__(self, inner: PackedRows | LengthBatches, ex: SFTExamples, idx: np.ndarray, lp: np.ndarray):
        self.inner, self.idx, self.lp = inner, idx, lp
        self.rows_of = target_offsets(ex)
        self.n = inner.n

    def examples_at(self, p: int) -> list[int]:
        i = self.inner.index_at(p)
        return self.inner.rows[i] if isinstance(self.inner, PackedRows) else [i]

    def batch(self, start: int, size: int) -> dict:
        b = self.inner.batch(start, size)
        sel = np.concatenate([np.arange(self.rows_of[e], self.rows_of[e + 1])
                              for p in range(start, start + size) for e in self.examples_at(p)])
        b["teacher_idx"] = torch.from_numpy(self.idx[sel].astype(np.int64))
        b["teacher_logp"] = torch.from_numpy(self.lp[sel].astype(np.float32))
        return b

    def examples_in(self, positions: int) -> int:
        return self.inner.examples_in(positions)


def make_loss(cfg: Config):
    def loss_fn(model, batch: dict) -> LossOut:
        """Summed per-token distillation loss over the supervised positions (losses.distill_loss)."""
        labels = batch["labels"]
        keep = labels != IGNORE
        kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits[keep].float()  # (N, V)
        logp = torch.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, labels[keep][:, None])[:, 0]
        out = distill_loss(logp.gather(-1, batch["teacher_idx"]), batch["teacher_logp"], nll,
                           torch.ones_like(nll, dtype=torch.bool), kind=cfg.divergence, weight=cfg.distill_weight,
                           beta=cfg.jsd_beta)
        return LossOut(out.loss.sum(), {"divergence": out.divergence.sum(), "hard_nll": out.nll.sum()})

    return loss_fn


# --------------------------------------------------------------------------------------------


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    acc = make_accelerator(cfg.train)
    main = acc.is_main_process

    def say(msg: str) -> None:
        if main:
            print(msg)
            rd.log(msg)

    if cfg.data is None:
        raise LmforgeError("distill needs `data`: files of chat, Alpaca or prompt/completion rows.")
    if cfg.teacher is None:
        raise LmforgeError("distill needs `teacher`: the model folder whose distributions the student learns.")
    begin = policy.start(cfg.model, stage="distill", tokenizer=cfg.tokenizer)
    tokenizer = begin.tokenizer
    check_teacher(Path(cfg.teacher), tokenizer, tokenizer_from=f"the student's tokenizer ({cfg.tokenizer or begin.src})")

    # 1. Data (before any model loads: bad data fails at once), then the teacher's cache.
    encoder = ChatEncoder(tokenizer, train_on_prompt=cfg.train_on_prompt)
    seq_len = cfg.seq_len or min(context_length(load_config(begin.src)) or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    patterns = cfg.data if isinstance(cfg.data, list) else [cfg.data]
    train_ex, stats = load_split({"patterns": patterns}, cfg, encoder, seq_len, what="training")
    mask_check(train_ex, encoder, what="training data")
    idx, lp, hit = teacher_cache(cfg, train_ex, tokenizer, rd, acc, say)
    say(f"distill: {len(train_ex)} examples, {idx.shape[0]} supervised tokens; teacher top-{idx.shape[1]} "
        f"{'reused from' if hit else 'written to'} {rd.path / 'teacher'} ({idx.nbytes + lp.nbytes:,} bytes)")
    eval_fn = None
    if cfg.validation:
        val_ex, _ = load_split({"patterns": cfg.validation if isinstance(cfg.validation, list) else [cfg.validation]},
                               cfg, encoder, seq_len, limit=1000, what="validation")
        val = LengthBatches(val_ex, batch_size=cfg.train.batch_size, seed=0, pad_id=tokenizer.pad_token_id,
                            grouped=True, shuffle=False)
        eval_fn = make_eval(val, batch_size=cfg.train.batch_size, max_batches=cfg.train.eval_batches)
    else:
        policy.refuse_eval_without_validation(cfg.train, stage="distill", why="no validation rows given")

    # 2. The student, on the shared loop.
    pol = policy.setup(begin, adapter=cfg.adapter, seed=cfg.train.seed, acc=acc, rd=rd)
    check_compatible(pol.model, tokenizer, seq_len, where="distill.seq_len")
    say(f"distill: student {policy.describe(pol)}; {cfg.divergence} weight {cfg.distill_weight}, seq_len {seq_len}")
    inner = make_batches(train_ex, cfg.batching, seq_len=seq_len, batch_size=cfg.train.batch_size,
                         seed=cfg.train.seed, pad_id=tokenizer.pad_token_id)
    data = TeacherBatches(inner, train_ex, idx, lp)
    result = train(pol.model, cfg=cfg.train, rd=rd, data=data, loss_fn=make_loss(cfg), eval_fn=eval_fn,
                   resume=resume, label="distill", accelerator=acc)
    summary = {
        "method": cfg.adapter.method, "divergence": cfg.divergence, "distill_weight": cfg.distill_weight,
        "top_k": int(idx.shape[1]), "teacher_cache": "reused" if hit else "built",
        "teacher_cache_bytes": int(idx.nbytes + lp.nbytes), "train_examples": len(train_ex),
        "skipped_rows": stats.total_skipped, "supervised_tokens": int(idx.shape[0]), "steps": result.step,
        "train_loss": result.train_loss, "best_val_loss": result.best_val_loss,
        "train_seconds": round(result.wall_seconds, 2), **result.last_eval,
    }
    add_stop_token(pol.model, encoder.eot_id)  # as sft: plain generate must stop at the end of a turn
    policy.save(pol.model, tokenizer, rd, acc, adapter=cfg.adapter, base_dir=pol.base_dir,
                extra={"stage": "distill", "summary": summary})
    return summary
