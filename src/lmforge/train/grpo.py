"""Stage `grpo`: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath), critic-free.

    for each prompt a group of group_size responses (lmforge.generation, one shared prefill)
        ──rewards (verifiable rules: answer match, format; or a reward model)──> one score each
        ──advantage = (score - group mean) / group std (sample std; scale_rewards=false: no division)
    `epochs` passes over the rollout in micro-batches:
        loss = clipped policy objective + beta x KL(policy || reference)   (k3 estimator, per token)
    model/   the trained policy (HF model or adapter)

No value model: the group mean is the baseline. The KL is a loss term (not a reward penalty as
in PPO); beta = 0 skips the reference entirely (no reference pass, no frozen copy). With one
optimizer step per rollout (epochs 1 and batch_size x grad_accum = the whole rollout) the ratio
is 1 by construction and the old log-probs are the forward's own, detached: no extra pass.

Losses are summed over response tokens and divided by the optimizer step's token count (the
token-level normalisation of DAPO and TRL's default; the DeepSeekMath paper averages per
sequence first, which weighs a short response's tokens more).

Metrics per rollout step: reward and each term (reward/<name>), reward_std (mean within-group
std), zero_std_groups (share of groups whose responses all scored the same: no learning signal
from them), kl (mean over responses of the summed per-token KL to the reference; with a
reference), entropy, clipfrac, policy_loss, response_length, eos_rate, ratio_dev_first,
sampler_logp_gap, grad_norm, rollout_s, update_s; sample responses every `sample_every` steps.

Example on the world's arithmetic (rows {"prompt", "answer"}), trained on the eval metric itself:

    - stage: grpo
      name: grpo
      prompts: "@world/grpo/prompts.jsonl"
      rewards: [{kind: answer}, {kind: format, pattern: "-?\\\\d+", weight: 0.1}]
      group_size: 8
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from lmforge import losses as L
from lmforge.rundir import RunDir
from lmforge.train.rollout import (
    MicroOut,
    RLFields,
    Rollout,
    Session,
    check_minibatches,
    entropy_of,
    epoch_orders,
    forward,
    setup,
)

ARTIFACT = "model"
PROVIDES = ("model",)
INPUTS = {"model": "model", "reward_model": "reward_model", "prompts": None}


class Config(RLFields):
    group_size: int = Field(8, ge=2, le=128, description="Responses sampled per prompt (G).")
    beta: float = Field(0.04, ge=0, description="Weight of the KL-to-reference loss term (0 = no reference).")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    scale_rewards: bool = Field(True, description="Divide advantages by the group's reward std (false: Dr. GRPO).")


def grpo_micro_loss(logp, old_logp, ref_logp, adv, mask, *, clip: float, beta: float) -> MicroOut:
    """Clipped objective on per-sequence advantages (broadcast to tokens) + beta x k3 KL, summed over tokens."""
    n = mask.sum()
    pg, clipfrac, ratio = L.ppo_policy_loss(logp, old_logp, adv, mask, clip=clip)
    loss, kl = pg, torch.zeros((), device=logp.device)
    if ref_logp is not None:
        kl = L.masked_mean(L.kl_estimate(logp, ref_logp, "k3"), mask)
        loss = pg + beta * kl
    stats = {"policy_loss": pg.detach() * n, "kl": kl.detach() * n, "clipped": clipfrac * n, "tokens": n}
    return MicroOut(loss * n, stats, ((ratio - 1).abs() * mask).max())


def run(cfg: Config, rd: RunDir, resume: bool = False) -> dict:
    G = cfg.group_size
    s = setup(cfg, rd, resume, stage="grpo", group=G, value_head=False, reference=cfg.beta > 0)
    with s.t:
        while s.step < cfg.train.max_steps and not s.t.stopped_early:  # a guard may stop it
            t0 = time.time()
            ro = s.rollout()  # every process holds the whole rollout; each scores and trains on its share
            t_roll = time.time() - t0
            record = train_on(s, cfg, ro)
            record.update(rollout_s=t_roll, update_s=time.time() - t0 - t_roll)
            s.end_step(record, ro)

    logged = [m for m in rd.read_metrics() if "reward" in m]
    return s.finish({
        "reward_first": logged[0]["reward"] if logged else None, "reward_last": logged[-1]["reward"] if logged else None,
        "kl_last": logged[-1].get("kl") if logged else None, "group_size": G, "rewards": s.rewards.names,
    })


def train_on(s: Session, cfg: Config, ro: Rollout) -> dict:
    """Group advantages, the score pass when needed, `epochs` passes of optimizer steps; the step's metrics."""
    G, T, ref = cfg.group_size, cfg.rollout.temperature, cfg.beta > 0
    # One optimizer step per rollout: the old log-probs are the update forward's own, detached.
    need_old = check_minibatches(cfg, len(ro), s.t.world) > 1
    adv = L.group_advantages(ro.scores, G, scale=cfg.scale_rewards)  # (N,): rows are group-major
    orders = epoch_orders(len(ro), cfg.epochs, s.step, cfg.train.seed, group=G)
    if need_old or ref:
        s.score(ro, orders[0], old=need_old, reference=ref)
    per_token = {"adv": adv.unsqueeze(1) * ro.mask, "sampler_logp": ro.sampler_logp}
    if need_old:
        per_token["old_logp"] = ro.old_logp
    if ref:
        per_token["ref_logp"] = ro.ref_logp
    first: dict[str, torch.Tensor] = {}  # the rollout policy's KL, entropy, sampler gap (no score pass)

    def micro_loss(idx: torch.Tensor, epoch: int) -> MicroOut:
        mb = ro.micro(idx, **per_token)
        with s.t.acc.autocast():
            logits, _ = forward(s.net, mb)
        logp = L.token_logprobs(logits, mb["labels"], temperature=T)
        old = mb["old_logp"] if need_old else logp.detach()
        out = grpo_micro_loss(logp, old, mb.get("ref_logp"), mb["adv"], mb["mask"], clip=cfg.clip, beta=cfg.beta)
        if epoch == 0 and not need_old:  # one optimizer step: this forward IS the rollout policy
            with torch.no_grad():
                part = {"kl": out.stats["kl"], "entropy": (entropy_of(logits, T) * mb["mask"]).sum(),
                        "gap": ((logp.detach() - mb["sampler_logp"]).abs() * mb["mask"]).sum()}
            for k, v in part.items():
                first[k] = first.get(k, 0) + v
        return out

    up = s.update(ro, orders, micro_loss)
    if need_old:  # from the score pass
        entropy = L.masked_mean(ro.entropy, ro.mask).item()
        gap = L.masked_mean((ro.old_logp - ro.sampler_logp).abs(), ro.mask).item()
        kl = (L.kl_estimate(ro.old_logp, ro.ref_logp, "k3") * ro.mask).sum(-1).mean().item() if ref else None
    else:
        n_first, first_sums = ro.mask.sum().item(), s.t.global_sums(first)
        entropy, gap = first_sums["entropy"] / n_first, first_sums["gap"] / n_first
        kl = first_sums["kl"] / len(ro) if ref else None
    n_tok = max(up.sums["tokens"], 1.0)
    groups = ro.scores.view(-1, G)
    return {
        "reward": float(ro.scores.mean()),
        **{f"reward/{k}": float(v.mean()) for k, v in ro.parts.items()},
        "reward_std": float(groups.std(dim=1).mean()),
        "zero_std_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
        **({"kl": kl} if kl is not None else {}),
        "entropy": entropy, "clipfrac": up.sums["clipped"] / n_tok, "policy_loss": up.sums["policy_loss"] / n_tok,
        "response_length": float(ro.mask.sum(-1).mean()), "eos_rate": float(ro.finished.float().mean()),
        "ratio_dev_first": up.ratio_dev_first, "sampler_logp_gap": gap, "grad_norm": up.grad_norm,
    }
