"""Stage `reward`: a reward model trained on preference pairs with the Bradley-Terry loss.

    model (an SFT output, or any local HF causal-LM or reward-model folder)
        ──policy.setup(head="reward")──> its backbone + a fresh scalar head (a reward model continues)
    preference rows ──data.preference──> pairs, encoded exactly as SFT and DPO encode them
    shared loop: ONE packed forward per micro-batch ──> r(chosen), r(rejected), read at each
        sequence's last token ──> bradley_terry_loss(margin, center_coef)
    model/              HF sequence-classification model + tokenizer (an adapter is merged in):
                        what `lmforge score`, rejection sampling and PPO load (`reward_model` input)
    reward_gaps.json    r(chosen) - r(rejected) on the held-out pairs: quantiles and a histogram
    reward_gaps.png     the same histogram, drawn

Per step: loss, accuracy (r(chosen) > r(rejected)), reward_chosen, reward_rejected,
reward_margin. Each evaluation: the same on held-out pairs (val_accuracy is the number to watch),
plus val_reward_mean (drifts without `center_coef`: the pairwise loss ignores a shared offset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from lmforge import losses as L
from lmforge.adapters import AdapterConfig
from lmforge.config import TrainConfig
from lmforge.data.preference import DataFields, PreferenceBatches, load_splits
from lmforge.rundir import RunDir, atomic_write_json
from lmforge.scoring import RewardHead, is_reward_model
from lmforge.train import policy
from lmforge.train.loop import LossOut, make_accelerator, train

ARTIFACT = "model"
PROVIDES = ("reward_model",)
INPUTS = {"model": "model", "data": None, "val_data": None}
HEAD_INPUTS = ("input_ids", "ends", "position_ids", "attention_mask")


class Config(DataFields):
    model: str | None = Field(
        None, description="Starting point: an SFT stage folder, a causal-LM or adapter folder, or a reward model.")
    margin: bool = Field(
        False, description="Subtract each pair's margin inside the loss (the row's `margin`, or the score "
        "difference of a ranked row): pairs with a larger margin must be separated further.")
    center_coef: float = Field(
        0.0, ge=0, description="Weight of (r(chosen) + r(rejected))^2, which keeps rewards centred on 0 "
        "(Eisenstein et al. 2023 use 0.01).")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Full fine-tuning or a peft adapter.")
    disable_dropout: bool = Field(True, description="Turn dropout off (rewards of one pair come from the same network).")
    histogram_bins: int = Field(30, ge=2, description="Bins of the held-out reward-gap histogram.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The shared training loop's settings.")

    @model_validator(mode="after")
    def _no_prefix(self) -> "Config":
        if self.adapter.method == "prefix":
            raise ValueError("prefix tuning is not supported for reward models; use adapter.method lora, dora or qlora")
        if self.train.fsdp:
            raise ValueError("train.fsdp shards pretrain and full-fine-tuning sft only; reward trains with DDP "
                             "across processes: set train.fsdp: false")
        return self


# --------------------------------------------------------------------------------------------
# Loss and evaluation


def pair_rewards(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    r = engine(**{k: batch[k] for k in HEAD_INPUTS if k in batch})  # (2B,)
    B = batch["n"]
    return r[:B], r[B:]


def make_loss(cfg: Config):
    def loss_fn(engine, batch: dict) -> LossOut:
        rc, rr = pair_rewards(engine, batch)
        margin = batch["margin"].to(rc.dtype) if cfg.margin else 0.0
        loss = L.bradley_terry_loss(rc, rr, margin=margin, center_coef=cfg.center_coef)
        rc_, rr_ = rc.detach(), rr.detach()
        return LossOut(loss.sum(), {"accuracy": (rc_ > rr_).float().sum(), "reward_chosen": rc_.sum(),
                                    "reward_rejected": rr_.sum(), "reward_margin": (rc_ - rr_).sum()})

    return loss_fn


def held_out_gaps(engine, val: PreferenceBatches, batch_size: int, device, limit: int | None = None) -> np.ndarray:
    """r(chosen) - r(rejected) of the first `limit` held-out pairs (all when None)."""
    gaps = []
    for b in val.in_order(batch_size, limit):
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        rc, rr = pair_rewards(engine, b)
        gaps.append((rc - rr).float().cpu().numpy())
    return np.concatenate(gaps)


def make_eval(cfg: Config, val: PreferenceBatches, device):
    loss_fn = make_loss(cfg)
    limit = cfg.train.batch_size * cfg.train.eval_batches

    def evaluate(engine) -> dict:
        sums: dict[str, float] = {}
        n = 0
        for b in val.in_order(cfg.train.batch_size, limit):
            b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
            out = loss_fn(engine, b)
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += b["n"]
        rec = {f"val_{k}": v / n for k, v in sums.items()}
        rec["val_reward_mean"] = (sums["reward_chosen"] + sums["reward_rejected"]) / (2 * n)
        return rec

    return evaluate


def gap_report(gaps: np.ndarray, bins: int, out: Path) -> dict:
    """reward_gaps.json and reward_gaps.png: quantiles and a histogram of held-out reward gaps."""
    counts, edges = np.histogram(gaps, bins=bins)
    q = np.quantile(gaps, [0.05, 0.25, 0.5, 0.75, 0.95])
    rep = {"pairs": int(len(gaps)), "accuracy": float((gaps > 0).mean()), "mean": float(gaps.mean()),
           "quantiles": {k: float(v) for k, v in zip(("p05", "p25", "p50", "p75", "p95"), q)},
           "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
    atomic_write_json(out / "reward_gaps.json", rep)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(gaps, bins=edges, color="#4c72b0")
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel("r(chosen) - r(rejected), held-out pairs")
    ax.set_ylabel("pairs")
    ax.set_title(f"reward gaps: accuracy {rep['accuracy']:.1%} over {rep['pairs']} pairs")
    fig.tight_layout()
    tmp = out / ".reward_gaps.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out / "reward_gaps.png")
    return rep


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    acc = make_accelerator(cfg.train)
    main = acc.is_main_process
    begin = policy.start(cfg.model, stage="reward")
    src, tokenizer = begin.src, begin.tokenizer
    continued = is_reward_model(src)
    pol = policy.setup(begin, adapter=cfg.adapter, seed=cfg.train.seed, acc=acc, rd=rd, head="reward",
                       no_dropout=cfg.disable_dropout)
    model, trainable, total = pol.model, pol.trainable, pol.total
    net = RewardHead(model)
    max_length = policy.max_length(cfg.max_length, model, where="reward.max_length")
    splits = load_splits(cfg, tokenizer, unit="pairs", max_length=max_length, method="reward")
    pad_id = tokenizer.pad_token_id
    data = PreferenceBatches(splits.train, unit="pairs", seed=cfg.train.seed, pad_id=pad_id, layout=cfg.layout)
    if splits.val is None:
        policy.refuse_eval_without_validation(cfg.train, stage="reward", why=f"val_data {cfg.val_data or 'unset'} "
                                              f"and val_fraction {cfg.val_fraction} hold out no row")
    val = (PreferenceBatches(splits.val, unit="pairs", seed=0, pad_id=pad_id, layout=cfg.layout, shuffle=False,
                             what="validation data") if splits.val is not None else None)
    if main:
        for line in (f"reward: {total:,} parameters ({trainable:,} trainable, adapter {cfg.adapter.method}), "
                     f"{'continuing a reward model' if continued else 'fresh scalar head'}, device {acc.device}",
                     f"data: {splits.train.stats}", f"validation: {splits.val.stats if splits.val else 'none'}",
                     f"bad rows skipped: {splits.read['train']['skipped'] or 'none'}",
                     f"mask check passed; example: {splits.example}"):
            print(line)
            rd.log(line)

    eval_fn = make_eval(cfg, val, acc.device) if val is not None else None
    result = train(net, cfg=cfg.train, rd=rd, data=data, loss_fn=make_loss(cfg), eval_fn=eval_fn, resume=resume,
                   label="reward", accelerator=acc)

    gaps_rep = None
    if val is not None and main:
        net.eval()
        with torch.no_grad(), acc.autocast():
            gaps = held_out_gaps(net, val, cfg.train.batch_size, acc.device)
        gaps_rep = gap_report(gaps, cfg.histogram_bins, rd.path)
    items = result.step * cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    summary = {
        "adapter": cfg.adapter.method, "parameters": total, "trainable_parameters": trainable, "steps": result.step,
        "train_loss": result.train_loss, "best_val_loss": result.best_val_loss, "best_step": result.best_step,
        "pairs": data.n, "validation_pairs": val.n if val is not None else 0, "epochs": round(items / data.n, 3),
        "pairs_per_s": round(items / max(result.wall_seconds, 1e-9), 2), "train_seconds": round(result.wall_seconds, 2),
        "held_out_accuracy": gaps_rep["accuracy"] if gaps_rep else None,
        "held_out_gap_median": gaps_rep["quantiles"]["p50"] if gaps_rep else None,
        "data": splits.train.stats, "skipped_rows": splits.read["train"]["skipped"], **result.last_eval,
    }
    # The reward model is saved whole (an adapter merged in): what score, rejection and PPO load.
    policy.save(policy.merged(pol, rd) if main else model, tokenizer, rd, acc,
                extra={"stage": "reward", "summary": summary})
    return summary
