"""Stage `ppo`: RLHF with proximal policy optimisation (Ziegler et al. 2019; Ouyang et al. 2022).

    policy (+ value head) ──rollout (lmforge.generation)──> responses ──rewards──> one score each
    score pass: old log-probs, values, entropy; reference log-probs (adapter off / frozen copy)
    per-token reward  r_t = -kl_coef * KL_t, plus the score on the last response token
    GAE (gamma, lam) ──> advantages (whitened) and returns
    `epochs` passes over the rollout in micro-batches:
        loss = clipped policy objective + vf_coef * clipped value loss
    kl_coef fixed, or adapted towards `kl_target` (Ziegler et al.'s proportional controller)
    model/   the trained policy (HF model or adapter) + value_head.safetensors

Rollouts, the score pass, the reference, checkpoints and the artifact are shared with `grpo`
(lmforge.train.rollout); the math is lmforge.losses' pure functions. Losses are summed over
response tokens and divided by the optimizer step's token count, so batch_size x grad_accum
splits do not change the update.

Metrics per rollout step (metrics.jsonl): reward (mean score, after the missing-EOS penalty) and
each reward term (reward/<name>), kl (mean over responses of the summed per-token KL to the
reference, the estimator of `kl_estimator`), kl_coef, entropy (per token, of the sampling
distribution), clipfrac, approx_kl (how far the update moved the policy: mean 0.5 (log ratio)^2),
policy_loss, value_loss, response_length (tokens), eos_rate, ratio_dev_first (max |ratio - 1| in the
first optimizer step: 0.0, the ratio starts at exactly 1), sampler_logp_gap (mean |training - sampler
log-prob|: both use one distribution), grad_norm, rollout_s, update_s. Sample responses go to
samples.jsonl and log.txt every `sample_every` steps.

Example (after `reward`, which the stage picks up as `reward_model`):

    - stage: ppo
      name: ppo
      prompts: "@world/grpo/prompts.jsonl"
      rewards: [{kind: reward_model}, {kind: answer, weight: 0.5}]
      kl_target: 6.0
      adapter: {method: lora}
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from lmforge import losses as L
from lmforge.rundir import RunDir
from lmforge.train.rollout import MicroOut, RLFields, Rollout, Session, epoch_orders, forward, setup

ARTIFACT = "model"
PROVIDES = ("model",)
INPUTS = {"model": "model", "reward_model": "reward_model", "prompts": None}


class Config(RLFields):
    epochs: int = Field(4, ge=1, description="PPO epochs: passes over each rollout, rows shuffled per pass.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty coefficient (the start value when adaptive).")
    kl_target: float | None = Field(
        None, gt=0, description="Adapt kl_coef so the summed KL per response approaches this (None = fixed kl_coef).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL: responses over which the coefficient may change by ~e^0.2.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL in the reward: k1 = log ratio "
                              "(classic, can be negative), k3 = exp(-d) - 1 + d (always >= 0).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount over response tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    value_clip: float = Field(0.2, gt=0, description="Value clip range around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the shared-backbone loss.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to zero mean, unit variance per rollout.")


# --------------------------------------------------------------------------------------------
# Pure pieces (tested against hand values in tests/train/test_ppo.py)


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *,
                  kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL), each (N, R): r_t = -kl_coef * KL_t on response tokens, and
    the response's score added on its last token."""
    kl = L.kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # responses are right-padded: the last token's column
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def adaptive_kl_coef(coef: float, kl: float, *, target: float, horizon: int, n: int) -> float:
    """Ziegler et al. 2019: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon), n = responses seen."""
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + err * n / horizon)


def ppo_micro_loss(logp, old_logp, values, old_values, adv, returns, mask, *, clip: float, value_clip: float,
                   vf_coef: float) -> MicroOut:
    """Clipped policy loss + vf_coef x clipped value loss, summed over the tokens of a micro-batch."""
    n = mask.sum()
    pg, clipfrac, ratio = L.ppo_policy_loss(logp, old_logp, adv, mask, clip=clip)
    vf = L.value_loss(values, old_values, returns, mask, clip=value_clip)
    d = (logp - old_logp).detach()
    stats = {"policy_loss": pg.detach() * n, "value_loss": vf.detach() * n, "clipped": clipfrac * n,
             "approx_kl": L.masked_mean(0.5 * d**2, mask) * n, "tokens": n}
    return MicroOut((pg + vf_coef * vf) * n, stats, ((ratio - 1).abs() * mask).max())


# --------------------------------------------------------------------------------------------
# The stage


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    s = setup(cfg, rd, resume, stage="ppo", group=1, value_head=True, reference=True)
    kl_coef = float(s.state.get("kl_coef", cfg.kl_coef))
    with s.t:
        while s.step < cfg.train.max_steps and not s.t.stopped_early:  # a guard may stop it
            t0 = time.time()
            ro = s.rollout()  # every process holds the whole rollout; each scores and trains on its share
            t_roll = time.time() - t0
            record = train_on(s, cfg, ro, kl_coef)
            record.update(rollout_s=t_roll, update_s=time.time() - t0 - t_roll)
            if cfg.kl_target is not None:
                kl_coef = adaptive_kl_coef(kl_coef, record["kl"], target=cfg.kl_target, horizon=cfg.kl_horizon,
                                           n=len(ro))
            s.state["kl_coef"] = kl_coef
            s.end_step(record, ro)

    logged = [m for m in rd.read_metrics() if "reward" in m]
    return s.finish({
        "reward_first": logged[0]["reward"] if logged else None, "reward_last": logged[-1]["reward"] if logged else None,
        "kl_last": logged[-1]["kl"] if logged else None, "kl_coef": kl_coef, "rewards": s.rewards.names,
    })


def train_on(s: Session, cfg: Config, ro: Rollout, kl_coef: float) -> dict:
    """Score pass, KL-penalised rewards, GAE, then `epochs` passes of optimizer steps; the step's metrics."""
    T = cfg.rollout.temperature
    orders = epoch_orders(len(ro), cfg.epochs, s.step, cfg.train.seed)
    s.score(ro, orders[0])
    rewards, kl = token_rewards(ro.scores, ro.old_logp, ro.ref_logp, ro.mask, kl_coef=kl_coef, estimator=cfg.kl_estimator)
    adv, returns = L.gae(rewards, ro.values, ro.mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = L.whiten(adv, ro.mask)

    def micro_loss(idx: torch.Tensor, epoch: int) -> MicroOut:
        mb = ro.micro(idx, old_logp=ro.old_logp, old_values=ro.values, adv=adv, returns=returns)
        with s.t.acc.autocast():
            logits, values = forward(s.net, mb)
        logp = L.token_logprobs(logits, mb["labels"], temperature=T)
        return ppo_micro_loss(logp, mb["old_logp"], values, mb["old_values"], mb["adv"], mb["returns"], mb["mask"],
                              clip=cfg.clip, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef)

    up = s.update(ro, orders, micro_loss)
    n_tok = max(up.sums["tokens"], 1.0)
    return {
        "reward": float(ro.scores.mean()),
        **{f"reward/{k}": float(v.mean()) for k, v in ro.parts.items()},
        "kl": float(kl.sum(-1).mean()), "kl_coef": kl_coef,
        "entropy": float(L.masked_mean(ro.entropy, ro.mask)),
        "clipfrac": up.sums["clipped"] / n_tok, "approx_kl": up.sums["approx_kl"] / n_tok,
        "policy_loss": up.sums["policy_loss"] / n_tok, "value_loss": up.sums["value_loss"] / n_tok,
        "value_mean": float(L.masked_mean(ro.values, ro.mask)),
        "response_length": float(ro.mask.sum(-1).mean()), "eos_rate": float(ro.finished.float().mean()),
        "ratio_dev_first": up.ratio_dev_first,
        "sampler_logp_gap": float(L.masked_mean((ro.old_logp - ro.sampler_logp).abs(), ro.mask)),
        "grad_norm": up.grad_norm,
    }
