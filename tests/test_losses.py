"""Every loss against a value computed by hand (numbers worked out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge import losses as L


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_token_logprobs_equals_naive_and_ignores_masked():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 4, -100], [0, 2, 3]])
    naive = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    out = L.token_logprobs(logits, labels)
    assert torch.allclose(out[labels >= 0], naive[labels >= 0], atol=1e-6) and out[0, 2] == 0
    hot = L.token_logprobs(logits, labels, temperature=0.5)
    naive_t = torch.log_softmax(logits / 0.5, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(hot[labels >= 0], naive_t[labels >= 0], atol=1e-6)
    s, n = L.sequence_logprobs(logits, labels)
    assert n.tolist() == [2, 3] and torch.allclose(s[0], naive[0, :2].sum())


# pc=-1, pr=-3, rc=-2, rr=-2, beta=0.5: z = 0.5 * ((-1+2) - (-3+2)) = 0.5 * 2 = 1
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)


def test_dpo_hand_value_and_rewards():
    out = L.dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert out.loss.item() == pytest.approx(-math.log(sig(1.0)))  # 0.31326
    assert out.chosen_reward.item() == pytest.approx(0.5) and out.rejected_reward.item() == pytest.approx(-0.5)


def test_conservative_dpo_label_smoothing():
    out = L.dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(-0.9 * math.log(sig(1.0)) - 0.1 * math.log(sig(-1.0)))


def test_dpo_gradient_signs_raise_chosen_lower_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    L.dpo_loss(pc, pr, RC, RR, beta=0.5).loss.backward()
    # d loss / d pc = -beta * sigma(-z) < 0 : gradient descent increases pc
    assert pc.grad.item() == pytest.approx(-0.5 * sig(-1.0)) and pr.grad.item() == pytest.approx(0.5 * sig(-1.0))


def test_dpo_beta_to_zero_limit():
    # as beta -> 0, z -> 0 and the loss -> log 2 whatever the log-probs, with vanishing gradient
    out = L.dpo_loss(t(-1.0, -50.0), t(-30.0, -2.0), t(-5.0, -5.0), t(-5.0, -5.0), beta=1e-9)
    assert torch.allclose(out.loss, t(math.log(2), math.log(2)), atol=1e-7)


def test_ipo_hand_value():
    # h = 2, beta = 0.5 -> target 1/(2*0.5) = 1 -> (2 - 1)^2 = 1
    assert L.ipo_loss(PC, PR, RC, RR, beta=0.5).loss.item() == pytest.approx(1.0)
    # beta = 0.25 -> target 2 -> loss 0 exactly at h = 2
    assert L.ipo_loss(PC, PR, RC, RR, beta=0.25).loss.item() == pytest.approx(0.0)


def test_rpo_adds_alpha_times_chosen_nll():
    out = L.rpo_loss(PC, PR, RC, RR, t(0.7), beta=0.5, alpha=2.0)
    assert out.loss.item() == pytest.approx(-math.log(sig(1.0)) + 1.4)


def test_simpo_needs_no_reference_and_normalises_length():
    # beta=2, pc=-4 over 2 tokens -> -4, pr=-9 over 3 tokens -> -6; gap 2 - gamma 0.5 = 1.5
    out = L.simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=0.5)
    assert out.loss.item() == pytest.approx(-math.log(sig(1.5)))
    assert out.chosen_reward.item() == pytest.approx(-4.0)


def test_orpo_hand_value():
    # mean log-probs: chosen log 0.5, rejected log 0.2 -> odds 1 and 0.25 -> log OR = log 4
    avg_c, avg_r = t(math.log(0.5)), t(math.log(0.2))
    out = L.orpo_loss(avg_c, avg_r, t(0.3), lam=0.1)
    assert out.loss.item() == pytest.approx(0.3 - 0.1 * math.log(sig(math.log(4))))  # sigma(log 4) = 0.8


def test_kto_desirable_and_undesirable():
    # logratios: 1.0 (desirable), -0.5 (undesirable); kl = 0.2; beta = 1
    out = L.kto_loss(t(-1.0, -2.5), t(-2.0, -2.0), torch.tensor([1, 0]), t(0.2), beta=1.0,
                     desirable_weight=1.0, undesirable_weight=2.0)
    assert out[0].item() == pytest.approx(1 - sig(0.8))
    assert out[1].item() == pytest.approx(2 * (1 - sig(0.7)))
    neg_kl = L.kto_loss(t(-1.0), t(-2.0), torch.tensor([1]), t(-3.0), beta=1.0)  # kl clamped at 0
    assert neg_kl.item() == pytest.approx(1 - sig(1.0))


def test_bradley_terry_margin_and_centering():
    assert L.bradley_terry_loss(t(2.0), t(0.5)).item() == pytest.approx(-math.log(sig(1.5)))
    assert L.bradley_terry_loss(t(2.0), t(0.5), margin=1.0).item() == pytest.approx(-math.log(sig(0.5)))
    assert L.bradley_terry_loss(t(2.0), t(0.5), center_coef=0.01).item() == pytest.approx(
        -math.log(sig(1.5)) + 0.01 * 2.5**2)


def test_gae_hand_values():
    # one sequence of 3 tokens (the last masked out), gamma 0.9, lam 0.5
    r, v, m = t(0.0, 1.0, 5.0)[None], t(0.5, 0.2, 9.0)[None], t(1, 1, 0)[None]
    adv, ret = L.gae(r, v, m, gamma=0.9, lam=0.5)
    d1 = 1.0 + 0.9 * 0.0 - 0.2  # 0.8 (value past the mask is 0)
    d0 = 0.0 + 0.9 * 0.2 - 0.5  # -0.32
    a1, a0 = d1, d0 + 0.9 * 0.5 * d1  # 0.8, 0.04
    assert adv[0].tolist() == pytest.approx([a0, a1, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, 0.0])


def test_ppo_clipped_objective():
    logp, old = t(math.log(1.5), math.log(0.5)), t(0.0, 0.0)  # ratios 1.5 and 0.5
    adv, m = t(1.0, 1.0), t(1, 1)
    loss, clipfrac, ratio = L.ppo_policy_loss(logp, old, adv, m, clip=0.2)
    # A>0: max(-1.5, -1.2) = -1.2 (clipped);  max(-0.5, -0.8) = -0.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2) and clipfrac.item() == pytest.approx(0.5)
    loss_neg, _, _ = L.ppo_policy_loss(logp, old, -adv, m, clip=0.2)
    # A<0: max(1.5, 1.2) = 1.5;  max(0.5, 0.8) = 0.8
    assert loss_neg.item() == pytest.approx((1.5 + 0.8) / 2)


def test_ratio_is_one_and_gradient_is_minus_advantage_on_fresh_rollout():
    logp = t(-1.2, -0.3).requires_grad_()
    loss, clipfrac, ratio = L.ppo_policy_loss(logp, logp.detach(), t(2.0, -1.0), t(1, 1), clip=0.2)
    loss.backward()
    assert ratio.tolist() == [1.0, 1.0] and clipfrac.item() == 0
    assert logp.grad.tolist() == pytest.approx([-1.0, 0.5])  # -A / n_tokens


def test_value_clipping():
    # V=2, V_old=1, R=3, clip 0.5: unclipped (2-3)^2=1; clipped V=1.5 -> (1.5-3)^2=2.25 -> 0.5*2.25
    assert L.value_loss(t(2.0), t(1.0), t(3.0), t(1), clip=0.5).item() == pytest.approx(1.125)
    assert L.value_loss(t(2.9), t(1.0), t(0.0), t(1), clip=0.5).item() == pytest.approx(0.5 * 2.9**2)


def test_kl_estimators():
    lp, ref = t(-1.0), t(-1.5)  # d = 0.5
    assert L.kl_estimate(lp, ref, "k1").item() == pytest.approx(0.5)
    assert L.kl_estimate(lp, ref, "k2").item() == pytest.approx(0.125)
    assert L.kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    # k3 is unbiased: averaged over samples of p it matches the true KL
    torch.manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True)
    true_kl = (p * (p / q).log()).sum().item()
    assert L.kl_estimate(p.log()[x], q.log()[x], "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)
    with pytest.raises(ValueError):
        L.kl_estimate(lp, ref, "k9")


def test_whiten_masked():
    x, m = t(1.0, 3.0, 100.0), t(1, 1, 0)
    w = L.whiten(x, m)
    assert w.tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)  # mean 2, population std 1
    assert L.whiten(x, m, shift_mean=False).tolist() == pytest.approx([1.0, 3.0, 0.0], abs=1e-6)


def test_group_advantages():
    r = t(1.0, 0.0, 0.0, 1.0, 1.0, 1.0)  # two groups of 3
    adv = L.group_advantages(r, 3)
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()  # sample std 0.57735
    assert adv[:3].tolist() == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)])
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # all-equal group: no signal
