"""Losses: pure functions of log-probabilities, values and rewards. No model calls.

One function per method, each tested against hand-computed values in tests/test_losses.py.
Sequence log-probs are *sums* over response tokens unless a function says otherwise; all
functions return per-example tensors so the caller chooses the reduction (the shared loop
sums and divides by the number of items in the whole optimizer step).

Notation: pc/pr = policy log-prob of the chosen/rejected response, rc/rr = the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- log-probs


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[labels], per position; (B, T, V), (B, T) -> (B, T).

    Equals `torch.log_softmax(logits / t, -1).gather(-1, labels[..., None])[..., 0]` but never
    materialises the (B, T, V) log-softmax: logsumexp is computed once per position. Labels of
    -100 (ignored positions) give 0.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    safe = labels.clamp(min=0)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    out = picked - torch.logsumexp(logits, dim=-1)
    return out.masked_fill(labels < 0, 0.0)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs over supervised tokens, number of supervised tokens) per sequence."""
    lp = token_logprobs(logits, labels)
    mask = labels >= 0
    return lp.sum(-1), mask.sum(-1)


# ---------------------------------------------------------------------------- preference


@dataclass
class PreferenceOut:
    loss: torch.Tensor  # (B,)
    chosen_reward: torch.Tensor  # (B,) implicit reward, detached
    rejected_reward: torch.Tensor  # (B,)


def dpo_loss(pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0) -> PreferenceOut:
    """DPO (Rafailov et al. 2023), sigmoid form; label_smoothing > 0 is conservative DPO (cDPO):

    z = beta * ((pc - rc) - (pr - rr));  loss = -(1 - eps) log sigma(z) - eps log sigma(-z)
    """
    z = beta * ((pc - rc) - (pr - rr))
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PreferenceOut(loss, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach())


def ipo_loss(pc, pr, rc, rr, *, beta: float) -> PreferenceOut:
    """IPO (Azar et al. 2023): squared distance of the log-ratio gap to 1 / (2 beta).

    h = (pc - rc) - (pr - rr);  loss = (h - 1 / (2 beta))^2. Pass length-averaged log-probs
    for the per-token form TRL uses.
    """
    h = (pc - rc) - (pr - rr)
    return PreferenceOut((h - 1 / (2 * beta)) ** 2, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach())


def rpo_loss(pc, pr, rc, rr, chosen_nll, *, beta: float, alpha: float) -> PreferenceOut:
    """RPO (Pang et al. 2024): DPO plus alpha x the chosen response's mean per-token NLL.

    The NLL term keeps the chosen answer's likelihood rising, which plain DPO does not
    guarantee (it can lower both responses and still widen the gap).
    """
    d = dpo_loss(pc, pr, rc, rr, beta=beta)
    return PreferenceOut(d.loss + alpha * chosen_nll, d.chosen_reward, d.rejected_reward)


def simpo_loss(pc, pr, len_c, len_r, *, beta: float, gamma: float) -> PreferenceOut:
    """SimPO (Meng et al. 2024), reference-free and length-normalised:

    loss = -log sigma(beta * pc / |c| - beta * pr / |r| - gamma)
    """
    rc_, rr_ = beta * pc / len_c, beta * pr / len_r
    return PreferenceOut(-F.logsigmoid(rc_ - rr_ - gamma), rc_.detach(), rr_.detach())


def orpo_loss(avg_pc, avg_pr, chosen_nll, *, lam: float) -> PreferenceOut:
    """ORPO (Hong et al. 2024), reference-free: SFT NLL + lam x odds-ratio term.

    With p = exp(mean per-token log-prob), odds(p) = p / (1 - p);
    log OR = (avg_pc - avg_pr) - (log(1 - exp(avg_pc)) - log(1 - exp(avg_pr)));
    loss = chosen_nll - lam * log sigma(log OR). Rewards are lam-scaled log-probs, as in TRL.
    """
    log_or = (avg_pc - avg_pr) - (torch.log1p(-torch.exp(avg_pc)) - torch.log1p(-torch.exp(avg_pr)))
    return PreferenceOut(chosen_nll - lam * F.logsigmoid(log_or), (lam * avg_pc).detach(), (lam * avg_pr).detach())


def kto_loss(p, r, desirable: torch.Tensor, kl: torch.Tensor, *, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) for unpaired examples; returns (B,) losses.

    logratio = p - r; z0 = max(kl, 0), detached (the batch KL estimate, a reference point);
    desirable:   w_D * (1 - sigma(beta * (logratio - z0)))
    undesirable: w_U * (1 - sigma(beta * (z0 - logratio)))
    """
    z0 = kl.detach().clamp(min=0)
    lr = p - r
    good = desirable_weight * (1 - torch.sigmoid(beta * (lr - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - lr)))
    return torch.where(desirable.bool(), good, bad)


def bradley_terry_loss(r_chosen, r_rejected, *, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss: -log sigma(r_c - r_r - margin) + center_coef * (r_c + r_r)^2.

    The centering term (Eisenstein et al. 2023) keeps rewards near zero mean, since the
    pairwise loss alone is invariant to adding a constant.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected) ** 2


# ---------------------------------------------------------------------------- RL (PPO / GRPO)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (population variance); shift_mean=False keeps the mean."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; (B, T) each -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A zero past the last unmasked token. returns = A + V.
    """
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    values = values * mask
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    *, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017), per token -> (loss, clip fraction, ratio).

    ratio = exp(logp - old_logp); loss_t = max(-A ratio, -A clip(ratio, 1 - c, 1 + c)),
    averaged over unmasked tokens.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac.detach(), ratio.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               *, clip: float) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL").

    With d = logp - ref_logp:  k1 = d (unbiased, high variance, can be negative);
    k2 = d^2 / 2 (biased, low variance); k3 = exp(-d) - 1 + d (unbiased, always >= 0).
    """
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each reward minus its group's mean, divided by the group's std (sample std, as in
    DeepSeekMath) when `scale`. rewards: (n_groups * group_size,) in group-major order."""
    g = rewards.view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


# ---------------------------------------------------------------------------- distillation


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillOut:
    loss: torch.Tensor  # (...,) per token: weight * divergence + (1 - weight) * hard NLL, 0 where masked
    divergence: torch.Tensor  # (...,) detached, 0 where masked
    nll: torch.Tensor  # (...,) detached, 0 where masked


def topk_divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, *, kind: str,
                    beta: float = 0.5) -> torch.Tensor:
    """Divergence between student and teacher on the teacher's top-k tokens; (..., k) -> (...).

    Convention: the cache keeps only the teacher's k most likely tokens, so BOTH distributions are
    renormalised over those k tokens (q_i = exp(t_i) / sum_j exp(t_j), p_i likewise from the
    student's log-probs at the same token ids) and compared there. Mass the student puts outside
    the teacher's top-k is not seen by this term (the hard-label cross-entropy trains it); in
    exchange reverse KL and JSD are finite, and k = vocabulary size gives the exact divergences.

    forward_kl  KL(q || p) = sum q (log q - log p)   (mean-seeking: the usual distillation loss)
    reverse_kl  KL(p || q) = sum p (log p - log q)   (mode-seeking)
    jsd         beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p  (generalised JSD
                as in GKD, Agarwal et al. 2024; beta 0.5 is the symmetric Jensen-Shannon divergence)
    """
    logp = student_logp - torch.logsumexp(student_logp, dim=-1, keepdim=True)
    logq = (teacher_logp - torch.logsumexp(teacher_logp, dim=-1, keepdim=True)).to(logp.dtype)
    if kind == "forward_kl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if kind == "reverse_kl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, not {beta}")
        logm = torch.logsumexp(torch.stack([logq + math.log(beta), logp + math.log(1 - beta)]), dim=0)
        return beta * (logq.exp() * (logq - logm)).sum(-1) + (1 - beta) * (logp.exp() * (logp - logm)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")


def distill_loss(student_topk_logp: torch.Tensor, teacher_topk_logp: torch.Tensor, hard_nll: torch.Tensor,
                 mask: torch.Tensor, *, kind: str, weight: float, beta: float = 0.5) -> DistillOut:
    """Per-token distillation loss: weight * topk_divergence + (1 - weight) * hard_nll, 0 where
    `mask` is false. student_topk_logp: the student's log-probs at the teacher's top-k token ids
    (..., k); hard_nll: the student's -log p(label) over the full vocabulary (...,). weight 1 is
    pure distillation, 0 plain SFT."""
    div = topk_divergence(student_topk_logp, teacher_topk_logp, kind=kind, beta=beta)
    m = mask.to(div.dtype)
    loss = (weight * div + (1 - weight) * hard_nll) * m
    return DistillOut(loss, (div * m).detach(), (hard_nll * m).detach())
