"""Distillation divergences against values worked out by hand: 2 tokens, a 3-token vocabulary,
the teacher's top-2 kept (tests/test_losses.py holds the other losses)."""

from __future__ import annotations

from math import log

import pytest
import torch

from lmforge.losses import distill_loss, topk_divergence

# Token 1: student p = (0.5, 0.25, 0.25) over the vocabulary; teacher's top-2 are ids (0, 1) with
# log-probs log 0.6, log 0.2. Renormalised over the top-2: q = (3/4, 1/4), p = (2/3, 1/3).
# Token 2: the same pair of distributions with the roles swapped, so each divergence is mirrored.
STUDENT_FULL = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.1]]).log()  # token 2's row sums to 0.4: unnormalised on purpose
TOP = torch.tensor([[0, 1], [2, 1]])
TEACHER = torch.tensor([[0.6, 0.2], [0.4, 0.2]]).log()  # token 2: q = (2/3, 1/3)
# token 2's student at ids (2, 1) = (0.1, 0.2) -> p = (1/3, 2/3)

FWD1 = 0.75 * log(0.75 / (2 / 3)) + 0.25 * log(0.25 / (1 / 3))  # 0.016416...
REV1 = (2 / 3) * log((2 / 3) / 0.75) + (1 / 3) * log((1 / 3) / 0.25)  # 0.017372...
# m = (q + p) / 2 = (17/24, 7/24)
JSD1 = 0.5 * (0.75 * log(18 / 17) + 0.25 * log(6 / 7)) + 0.5 * ((2 / 3) * log(16 / 17) + (1 / 3) * log(8 / 7))
FWD2 = (2 / 3) * log((2 / 3) / (1 / 3)) + (1 / 3) * log((1 / 3) / (2 / 3))  # (1/3) ln 2 = 0.231049...
REV2 = (1 / 3) * log((1 / 3) / (2 / 3)) + (2 / 3) * log((2 / 3) / (1 / 3))  # also (1/3) ln 2
# beta 0.25: m = 0.25 q + 0.75 p = (5/12, 7/12) for token 2
JSD2_B25 = 0.25 * ((2 / 3) * log((2 / 3) / (5 / 12)) + (1 / 3) * log((1 / 3) / (7 / 12))) + \
    0.75 * ((1 / 3) * log((1 / 3) / (5 / 12)) + (2 / 3) * log((2 / 3) / (7 / 12)))


def student_topk():
    return STUDENT_FULL.gather(-1, TOP)


@pytest.mark.parametrize("kind,want", [("forward_kl", [FWD1, FWD2]), ("reverse_kl", [REV1, REV2])])
def test_kl_divergences_by_hand(kind, want):
    got = topk_divergence(student_topk(), TEACHER, kind=kind)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6), (got, want)


def test_jsd_by_hand_symmetric_at_half_and_generalised_at_a_quarter():
    got = topk_divergence(student_topk(), TEACHER, kind="jsd")
    assert got[0].item() == pytest.approx(JSD1, abs=1e-7)  # 0.0042125...
    swapped = topk_divergence(TEACHER, student_topk(), kind="jsd")
    assert torch.allclose(got, swapped, atol=1e-7)  # beta 0.5: symmetric
    assert topk_divergence(student_topk(), TEACHER, kind="jsd", beta=0.25)[1].item() == pytest.approx(JSD2_B25, abs=1e-7)


def test_identical_distributions_give_zero_and_the_full_vocabulary_gives_the_exact_kl():
    same = torch.tensor([[0.7, 0.2, 0.1]]).log()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert topk_divergence(same + 3.0, same, kind=kind).abs().item() < 1e-7  # a shift is renormalised away
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = float((q * (q / p).log()).sum())
    assert topk_divergence(p.log()[None], q.log()[None], kind="forward_kl").item() == pytest.approx(exact, abs=1e-7)


def test_distill_loss_mixes_with_the_hard_label_nll_and_masks_tokens():
    # hard labels: token 1 -> id 1 (nll = ln 4), token 2 -> id 0 (nll = -ln 0.1, unnormalised row: fine, given)
    nll = torch.tensor([log(4), -log(0.1)])
    mask = torch.tensor([True, False])
    out = distill_loss(student_topk(), TEACHER, nll, mask, kind="forward_kl", weight=0.5)
    assert out.loss[0].item() == pytest.approx(0.5 * FWD1 + 0.5 * log(4), abs=1e-6)  # 0.701355...
    assert out.loss[1].item() == 0 and out.divergence[1].item() == 0 and out.nll[1].item() == 0
    assert out.divergence[0].item() == pytest.approx(FWD1, abs=1e-6)
    pure = distill_loss(student_topk(), TEACHER, nll, torch.ones(2, dtype=torch.bool), kind="reverse_kl", weight=1.0)
    assert torch.allclose(pure.loss, torch.tensor([REV1, REV2]), atol=1e-6)
    hard = distill_loss(student_topk(), TEACHER, nll, torch.ones(2, dtype=torch.bool), kind="jsd", weight=0.0)
    assert torch.allclose(hard.loss, nll)


def test_gradient_flows_to_the_student_only_through_the_divergence():
    s = student_topk().clone().requires_grad_(True)
    topk_divergence(s, TEACHER, kind="forward_kl").sum().backward()
    # d KL(q||p) / d student logit_i = p_i - q_i (renormalised): token 1: (2/3 - 3/4, 1/3 - 1/4)
    assert torch.allclose(s.grad[0], torch.tensor([2 / 3 - 0.75, 1 / 3 - 0.25]), atol=1e-6)


def test_unknown_divergence_and_bad_beta_are_refused():
    with pytest.raises(ValueError, match="unknown divergence"):
        topk_divergence(student_topk(), TEACHER, kind="kl")
    with pytest.raises(ValueError, match="0 < beta < 1"):
        topk_divergence(student_topk(), TEACHER, kind="jsd", beta=1.0)
