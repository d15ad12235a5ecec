"""Stage `dpo`: direct preference optimisation and its family, on the shared training loop.

    model (an SFT output: full model or adapter) ──policy.setup (+ a fresh adapter)──> policy
    preference rows ──data.preference──> sequences + pairs (or KTO items)
    reference pass, once, before training ──> one log-prob per sequence (cached in reference/)
    shared loop: ONE packed forward per micro-batch (chosen + rejected) ──> METHODS[method] ──> loss
    model/   the trained policy (HF format) or its PEFT adapter

`method` selects a pure loss from `lmforge.losses` through METHODS, a table of small adapters
from the batch's log-probs to that loss's arguments:

    dpo    sigmoid DPO on summed response log-prob ratios             (reference)
    cdpo   DPO with label smoothing (conservative DPO)                (reference)
    ipo    IPO on per-token averaged log-prob ratios, as TRL          (reference)
    rpo    DPO + rpo_alpha x the chosen response's mean NLL           (reference)
    simpo  reference-free, length-normalised, target margin gamma
    orpo   reference-free: the chosen response's NLL + lambda x odds ratio term
    kto    unpaired good/bad items; a pair gives one of each          (reference)

The reference is the starting model before any update — with an adapter, the base with the
adapter disabled. Its log-probs are computed in one pass over the train and validation
sequences and cached (reference/<split>.npy, keyed by the model, the data and the precision), so
no second model sits in memory while training, and a resumed run reads them instead of
recomputing them from partly trained weights.

Metrics (means over the step's pairs): loss, reward_chosen / reward_rejected (beta x log-ratio),
reward_margin, accuracy (chosen reward > rejected), logp_chosen / logp_rejected (summed response
log-probs: DPO can widen the margin while BOTH fall). Every evaluation adds the same on held-out
pairs, plus val_greedy_chosen / val_greedy_rejected (the share of held-out responses that greedy
decoding would produce exactly: every token the argmax, teacher-forced, so exact and cheap),
val_top1_chosen (the share of chosen tokens that are the argmax), and probe_chosen /
probe_rejected from `probe_prompts` real greedy generations (texts in log.txt). Accuracy can
climb to 90% while val_greedy_chosen stays at 0 — when the reference gives the chosen answer
almost no probability, DPO only pushes the rejected one down — and these columns show it.

In a recipe, after an SFT stage (whose model fills `model`):

    - stage: dpo
      data: "@world/preference/train.jsonl"
      method: dpo            # or cdpo, ipo, rpo, simpo, orpo, kto
      beta: 0.1
      adapter: {method: lora, r: 16}
      train: {max_steps: 300, batch_size: 8, lr: 5.0e-6, warmup_steps: 10, eval_every: 50}

DPO wants a far smaller learning rate than pre-training (5e-7 .. 5e-6 for full fine-tuning of
real models, ~1e-4 for LoRA); the shared default (1e-3) overshoots within a few steps.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from lmforge import losses as L
from lmforge.adapters import AdapterConfig, base_fingerprint
from lmforge.config import TrainConfig
from lmforge.data.preference import (
    DataFields,
    PreferenceBatches,
    PreferenceSet,
    collate,
    load_splits,
    model_inputs,
    sequence_chunks,
)
from lmforge.data.sft import IGNORE
from lmforge.rundir import RunDir, fingerprint_path
from lmforge.train import policy
from lmforge.train.guards import GuardConfig
from lmforge.train.health import degradation_warnings
from lmforge.train.loop import LossOut, make_accelerator, train

ARTIFACT = "model"
PROVIDES = ("model",)
INPUTS = {"model": "model", "data": None, "val_data": None}

Method = Literal["dpo", "cdpo", "ipo", "rpo", "simpo", "orpo", "kto"]
# Peak learning rate when train.lr is not given: (full fine-tuning, adapter). Preference losses
# degrade a model at SFT-like rates (the shared 1e-3 wrecked every model tried), so these follow
# the literature: DPO paper (Rafailov et al. 2023) 1e-6 full, Zephyr's DPO recipe (Hugging Face
# alignment-handbook) 5e-7 full and 5e-6 QLoRA; SimPO repo (princeton-nlp/SimPO): "a large learning
# rate (e.g., 1e-5) can significantly degrade performance", grid 3e-7 to 1e-6; ORPO (Hong et al.
# 2024) trains SFT and preference in one, at ~5e-6 (LLaMA-Factory's ORPO LoRA configs: 5e-6);
# KTO (Ethayarajh et al. 2024) follows DPO's 5e-7 full. An adapter trains few weights from zero and
# takes ~10x the full rate (Zephyr's QLoRA recipe above).
DEFAULT_LR = {"dpo": (5e-7, 5e-6), "cdpo": (5e-7, 5e-6), "ipo": (5e-7, 5e-6), "rpo": (5e-7, 5e-6),
              "kto": (5e-7, 5e-6), "simpo": (5e-7, 5e-6), "orpo": (5e-6, 5e-6)}
DEFAULT_BETA = {"simpo": 2.0}  # SimPO's reward is a per-token average, so its beta is larger (paper: 2.0-2.5)


class Config(DataFields):
    model: str | None = Field(None, description="Starting policy: an SFT stage folder, model folder or adapter folder.")
    method: Method = Field("dpo", description="Loss: dpo, cdpo, ipo, rpo, simpo, orpo or kto (see the module doc).")
    beta: float | None = Field(
        None, gt=0, description="Strength of the KL anchor (dpo/cdpo/ipo/rpo/kto) or reward scale (simpo); "
        "None = 0.1 (simpo: 2.0).")
    label_smoothing: float = Field(0.1, ge=0, lt=0.5, description="cdpo: assumed share of flipped labels.")
    rpo_alpha: float = Field(1.0, ge=0, description="rpo: weight of the chosen response's NLL term.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight of the odds-ratio term.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable items.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable items.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Full fine-tuning or a peft adapter.")
    disable_dropout: bool = Field(
        True, description="Turn dropout off: the log-prob ratios against the reference are then exact, not noisy.")
    probe_prompts: int = Field(
        4, ge=0, description="Held-out prompts answered greedily at every evaluation (outputs in log.txt).")
    probe_max_new_tokens: int = Field(32, ge=1, description="Token budget of each probe answer.")
    guards: GuardConfig = Field(
        default_factory=GuardConfig, description="Stop the run, keeping its best weights, when a held-out metric "
        "falls while the reward margin rises (lmforge.train.guards; reward_metric: reward_margin); off by default.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The shared training loop's settings. "
                               "train.lr unset: a per-method default from the literature, full fine-tuning / "
                               "adapter: dpo, cdpo, ipo, rpo, kto, simpo 5e-7 / 5e-6 (DPO paper 1e-6; Zephyr DPO "
                               "recipe 5e-7 full, 5e-6 QLoRA; SimPO repo 3e-7 to 1e-6), orpo 5e-6 / 5e-6 (ORPO "
                               "paper's order; LoRA configs 5e-6) — not the shared 1e-3, which ruins a model here.")

    @model_validator(mode="after")
    def _method_knobs(self) -> "Config":
        if "lr" not in self.train.model_fields_set:
            self.train.lr = DEFAULT_LR[self.method][1 if self.adapter.enabled else 0]
        if self.method == "cdpo" and self.label_smoothing == 0:
            raise ValueError("method cdpo needs label_smoothing > 0 (with 0 it is plain dpo)")
        if self.adapter.method == "prefix":
            raise ValueError("prefix tuning adds key/value positions that packed preference batches cannot "
                             "share; use adapter.method lora, dora or qlora")
        if self.train.fsdp:
            raise ValueError("train.fsdp shards pretrain and full-fine-tuning sft only; dpo trains with DDP "
                             "across processes: set train.fsdp: false")
        return self

    @property
    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)


# --------------------------------------------------------------------------------------------
# Response log-probs, one forward for every sequence of a micro-batch


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")


class ResponseLogProbs(torch.nn.Module):
    """Wraps a causal LM (plain or peft) so that forward returns, per sequence slot, the summed
    log-prob of its response tokens (and optionally how many of them are the argmax).

    Equals `token_logprobs(lm(input_ids).logits, labels)` summed per sequence, but projects only the
    response positions through the LM head: prompt and padding positions never build a (., V)
    row of logits. Architectures that transform their logits (softcapping, scaling) take the plain
    forward instead. Being a Module, it is what the shared loop prepares (DDP hooks stay intact).
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.compact = all(getattr(cfg, k, None) in (None, 1.0) for k in _LOGIT_TRANSFORMS)

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, labels, token_slot, n_slots: int, position_ids=None, attention_mask=None,
                top1: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = labels != IGNORE
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        if self.compact:
            core = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
            hidden = getattr(core, core.base_model_prefix)(**kw).last_hidden_state  # (R, W, d)
            logits = core.get_output_embeddings()(hidden[mask])  # (N, V): response positions only
        else:
            logits = self.lm(**kw).logits[mask]
        target = labels[mask]
        lp = L.token_logprobs(logits, target)  # (N,)
        slots = token_slot[mask]
        sums = torch.zeros(n_slots, dtype=lp.dtype, device=lp.device).index_add(0, slots, lp)
        hits = None
        if top1:
            with torch.no_grad():
                hit = (logits.argmax(-1) == target).to(lp.dtype)
                hits = torch.zeros(n_slots, dtype=lp.dtype, device=lp.device).index_add(0, slots, hit)
        return sums, hits



def run_logprobs(net, batch: dict, *, top1: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    return net(**model_inputs(batch), n_slots=len(batch["n_tokens"]), top1=top1)


# --------------------------------------------------------------------------------------------
# The method table: batch log-probs -> one pure loss from lmforge.losses


@dataclass
class PairLogProbs:
    pc: torch.Tensor  # policy, chosen (summed over response tokens)
    pr: torch.Tensor  # policy, rejected
    rc: torch.Tensor  # reference, chosen (zeros for reference-free methods)
    rr: torch.Tensor
    nc: torch.Tensor  # response tokens, chosen
    nr: torch.Tensor


def _dpo(x: PairLogProbs, c: Config) -> L.PreferenceOut:
    return L.dpo_loss(x.pc, x.pr, x.rc, x.rr, beta=c.beta_value)


def _cdpo(x: PairLogProbs, c: Config) -> L.PreferenceOut:
    return L.dpo_loss(x.pc, x.pr, x.rc, x.rr, beta=c.beta_value, label_smoothing=c.label_smoothing)


def _ipo(x: PairLogProbs, c: Config) -> L.PreferenceOut:
    return L.ipo_loss(x.pc / x.nc, x.pr / x.nr, x.rc / x.nc, x.rr / x.nr, beta=c.beta_value)


def _rpo(x: PairLogProbs, c: Config) -> L.PreferenceOut:
    return L.rpo_loss(x.pc, x.pr, x.rc, x.rr, -x.pc / x.nc, beta=c.beta_value, alpha=c.rpo_alpha)


def _simpo(x: PairLogProbs, c: Config) -> L.PreferenceOut:
    return L.simpo_loss(x.pc, x.pr, x.nc, x.nr, beta=c.beta_value, gamma=c.simpo_gamma)


def _orpo(x: PairLogProbs, c: Config) -> L.PreferenceOut:
    return L.orpo_loss(x.pc / x.nc, x.pr / x.nr, -x.pc / x.nc, lam=c.orpo_lambda)


METHODS: dict[str, Callable[[PairLogProbs, Config], L.PreferenceOut]] = {
    "dpo": _dpo, "cdpo": _cdpo, "ipo": _ipo, "rpo": _rpo, "simpo": _simpo, "orpo": _orpo,
}
NEEDS_REFERENCE = {"dpo", "cdpo", "ipo", "rpo", "kto"}


def pair_batch_loss(cfg: Config, batch: dict, logps: torch.Tensor) -> LossOut:
    """Summed loss and summed metrics of a pair batch (slots: B chosen, then B rejected)."""
    B = batch["n"]
    ref = batch.get("ref_logps")
    ref = ref if ref is not None else torch.zeros_like(logps)
    n = batch["n_tokens"].to(logps.dtype)
    x = PairLogProbs(logps[:B], logps[B:], ref[:B], ref[B:], n[:B], n[B:])
    out = METHODS[cfg.method](x, cfg)
    c, r = out.chosen_reward, out.rejected_reward
    return LossOut(out.loss.sum(), {
        "reward_chosen": c.sum(), "reward_rejected": r.sum(), "reward_margin": (c - r).sum(),
        "accuracy": (c > r).float().sum(), "logp_chosen": x.pc.detach().sum(), "logp_rejected": x.pr.detach().sum(),
    })


def kto_batch_loss(cfg: Config, batch: dict, logps: torch.Tensor) -> LossOut:
    """KTO on unpaired items. The reference point z0 is the micro-batch mean of the items' own
    log-ratios (detached, clamped at 0): no extra forward over mismatched (prompt, completion)
    pairs as in the paper, which would need a reference pass per batch composition."""
    d = batch["desirable"]
    ratio = logps - batch["ref_logps"]
    kl = ratio.detach().mean()
    loss = L.kto_loss(logps, batch["ref_logps"], d, kl, beta=cfg.beta_value,
                      desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    reward = cfg.beta_value * ratio.detach()
    signed = torch.where(d, reward, -reward)
    return LossOut(loss.sum(), {"reward_signed": signed.sum(), "accuracy": (signed > 0).float().sum(),
                                "kl": kl * len(d), "logp": logps.detach().sum()})


def batch_loss(cfg: Config, batch: dict, logps: torch.Tensor) -> LossOut:
    return kto_batch_loss(cfg, batch, logps) if cfg.method == "kto" else pair_batch_loss(cfg, batch, logps)


# --------------------------------------------------------------------------------------------
# Reference log-probs: one pass, cached


def reference_parts(cfg: Config, data: PreferenceSet, precision: str, model_src: Path) -> dict:
    """What the cached reference log-probs depend on (the key of `RunDir.cache`): the starting
    weights (a cheap fingerprint of the safetensors, as adapters use), the adapter method (QLoRA
    quantises the base), the precision, the layout (packing changes float rounding) and every
    token of the data."""
    h = hashlib.sha256()
    for arr in (data.ids, data.offsets, data.prompt_len):
        h.update(np.ascontiguousarray(arr).tobytes())
    return {"kind": "reference-logps-v1", "weights": base_fingerprint(model_src) or fingerprint_path(model_src),
            "adapter": cfg.adapter.method, "precision": str(precision), "layout": cfg.layout, "data": h.hexdigest()}


def compute_reference(net: ResponseLogProbs, data: PreferenceSet, *, layout: str, pad_id: int, batch_seqs: int,
                      device, autocast) -> np.ndarray:
    """Log-prob of every sequence's response under the starting model (adapter disabled)."""
    import contextlib

    out = np.zeros(data.n_seqs, dtype=np.float32)
    was_training = net.training
    net.eval()
    off = net.lm.disable_adapter() if hasattr(net.lm, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), off, autocast():
        for seqs in sequence_chunks(data, batch_seqs):
            b = collate(data, seqs, layout=layout, pad_id=pad_id)
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            lp, _ = run_logprobs(net, b)
            out[seqs] = lp.float().cpu().numpy()
    net.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation: held-out metrics and the greedy-behaviour probe


def make_eval(cfg: Config, val: PreferenceBatches, lm, tokenizer, rd: RunDir, device):
    from lmforge.data.chat import encode as encode_chat
    from lmforge.generation import SamplingParams, generate

    limit = cfg.train.batch_size * cfg.train.eval_batches
    probes = [ex for ex in val.data.examples if ex["pairs"]][: cfg.probe_prompts] if cfg.method != "kto" else []

    def evaluate(engine) -> dict:
        sums: dict[str, float] = {}
        n, top1 = 0, [0.0, 0.0]
        for b in val.in_order(cfg.train.batch_size, limit):
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            logps, hits = run_logprobs(engine, b, top1=True)
            out = batch_loss(cfg, b, logps)
            greedy = (hits == b["n_tokens"]).float()  # every response token is the argmax
            B = b["n"]
            parts = {"loss": out.loss, **out.metrics}
            if cfg.method == "kto":
                parts["greedy_desirable"] = (greedy * b["desirable"]).sum()
            else:
                parts["greedy_chosen"], parts["greedy_rejected"] = greedy[:B].sum(), greedy[B:].sum()
                top1[0] += float(hits[:B].sum())
                top1[1] += float(b["n_tokens"][:B].sum())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += B
        rec = {f"val_{k}": v / n for k, v in sums.items()}
        if top1[1]:
            rec["val_top1_chosen"] = top1[0] / top1[1]  # share of chosen tokens that are the argmax
        if probes:
            prompts = [encode_chat(tokenizer, ex["prompt"], add_generation_prompt=True) for ex in probes]
            params = SamplingParams(temperature=0.0, max_new_tokens=cfg.probe_max_new_tokens)
            outs = generate(lm, tokenizer, prompts, params, add_special_tokens=False)
            hit_c = hit_r = 0
            for ex, o in zip(probes, outs):
                chosen, rejected = ex["pair_texts"][0]
                hit_c += o.text.strip() == chosen.strip()
                hit_r += o.text.strip() == rejected.strip()
                rd.log(f"probe {ex['where']}: {ex['prompt'][-1]['content']!r} -> {o.text!r}")
            rec["probe_chosen"], rec["probe_rejected"] = hit_c / len(probes), hit_r / len(probes)
        return rec

    return evaluate


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    acc = make_accelerator(cfg.train)
    main = acc.is_main_process
    begin = policy.start(cfg.model, stage="dpo")
    src, tokenizer = begin.src, begin.tokenizer
    pol = policy.setup(begin, adapter=cfg.adapter, seed=cfg.train.seed, acc=acc, rd=rd,
                       no_dropout=cfg.disable_dropout)
    lm, trainable, total = pol.model, pol.trainable, pol.total
    net = ResponseLogProbs(lm)
    max_length = policy.max_length(cfg.max_length, lm, where="dpo.max_length")

    unit = "items" if cfg.method == "kto" else "pairs"
    splits = load_splits(cfg, tokenizer, unit=unit, max_length=max_length, method=cfg.method)
    pad_id = tokenizer.pad_token_id
    data = PreferenceBatches(splits.train, unit=unit, seed=cfg.train.seed, pad_id=pad_id, layout=cfg.layout)
    if splits.val is None:
        policy.refuse_eval_without_validation(cfg.train, stage="dpo", why=f"val_data {cfg.val_data or 'unset'} "
                                              f"and val_fraction {cfg.val_fraction} hold out no row")
    val = (PreferenceBatches(splits.val, unit=unit, seed=0, pad_id=pad_id, layout=cfg.layout, shuffle=False,
                             what="validation data") if splits.val is not None else None)
    if main:
        for line in (f"dpo ({cfg.method}, beta {cfg.beta_value:g}): {total:,} parameters ({trainable:,} trainable, "
                     f"adapter {cfg.adapter.method}), device {acc.device}",
                     f"data: {splits.train.stats}", f"validation: {splits.val.stats if splits.val else 'none'}",
                     f"bad rows skipped: {splits.read['train']['skipped'] or 'none'}",
                     f"mask check passed; example: {splits.example}"):
            print(line)
            rd.log(line)

    t_ref = time.time()
    ref_cached = []
    if cfg.method in NEEDS_REFERENCE:
        precision = acc.mixed_precision
        for name, batches in (("train", data), ("validation", val)):
            if batches is None:
                continue
            parts = reference_parts(cfg, batches.data, precision, src)

            def build(tmp: Path, b=batches) -> None:
                ref = compute_reference(net, b.data, layout=cfg.layout, pad_id=pad_id,
                                        batch_seqs=2 * cfg.train.batch_size, device=acc.device, autocast=acc.autocast)
                with open(tmp, "wb") as f:
                    np.save(f, ref)

            with acc.main_process_first():  # rank 0 computes and caches; the others read its file
                entry = rd.cache(f"reference/{name}.npy", parts, build)
            batches.ref = np.load(entry.path)
            ref_cached.append(entry.hit)
    ref_seconds = time.time() - t_ref

    def loss_fn(engine, batch: dict) -> LossOut:
        logps, _ = run_logprobs(engine, batch)
        return batch_loss(cfg, batch, logps)

    eval_fn = make_eval(cfg, val, lm, tokenizer, rd, acc.device) if val is not None else None
    result = train(net, cfg=cfg.train, rd=rd, data=data, loss_fn=loss_fn, eval_fn=eval_fn, resume=resume,
                   label="dpo", accelerator=acc, guards=cfg.guards)

    items = result.step * cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    summary = {
        "method": cfg.method, "beta": cfg.beta_value, "adapter": cfg.adapter.method,
        "parameters": total, "trainable_parameters": trainable, "steps": result.step,
        "train_loss": result.train_loss, "best_val_loss": result.best_val_loss, "best_step": result.best_step,
        "stopped_by": result.stopped_by,
        "pairs" if unit == "pairs" else "items": data.n,
        "validation_" + unit: val.n if val is not None else 0,
        "epochs": round(items / data.n, 3),
        f"{unit}_per_s": round(items / max(result.wall_seconds, 1e-9), 2),
        "reference_seconds": round(ref_seconds, 2), "reference_cached": all(ref_cached) if ref_cached else None,
        "train_seconds": round(result.wall_seconds, 2), "data": splits.train.stats,
        "skipped_rows": splits.read["train"]["skipped"], **result.last_eval,
    }
    summary["warnings"] = degradation_warnings(rd.read_metrics(), lr=cfg.train.lr) if main else []
    for w in summary["warnings"]:
        print(f"dpo: WARNING: {w}")
        rd.log(f"WARNING: {w}")
    policy.save(lm, tokenizer, rd, acc, adapter=cfg.adapter, base_dir=pol.base_dir,
                extra={"stage": "dpo", "summary": summary})
    return summary
