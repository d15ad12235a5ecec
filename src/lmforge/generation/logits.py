"""Logits processing: pure functions of (B, V) logits and per-row parameters.

A parameter is a Python number (same for every row) or a (B,) tensor (one value per row), so one
batch can mix requests with different settings. Removed tokens get -inf. Order used by the
engine (and by transformers' `generate`): penalties, temperature, top-k, top-p, min-p, sample.
"""

from __future__ import annotations

import torch

# The smallest temperature that is not greedy: below float32's smallest normal number a
# temperature is 0 or subnormal once it is a tensor, and dividing by it gives inf or NaN.
# Mathematically such a temperature already puts all the mass on the most likely token.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def _per_row(value: float | int | torch.Tensor, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`value` as a (B, 1) tensor on the logits' device."""
    t = torch.as_tensor(value, device=logits.device, dtype=dtype or logits.dtype)
    return t.reshape(-1, 1).expand(logits.shape[0], 1) if t.numel() > 1 else t.reshape(1, 1).expand(logits.shape[0], 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Penalise tokens already seen (CTRL, Keskar et al. 2019; transformers' RepetitionPenaltyLogitsProcessor).

    Equals, for every row b and token v with seen[b, v]:
        logits[b, v] = logits[b, v] / penalty if logits[b, v] > 0 else logits[b, v] * penalty
    `seen` is a (B, V) bool mask of tokens in the prompt or the completion so far.
    A tiny penalty (any value > 0 is accepted) can overflow a positive logit to +inf, which would
    make the softmax NaN; such logits are capped at float32's largest finite value instead.
    """
    pen = _per_row(penalty, logits)
    penalised = torch.where(logits > 0, logits / pen, logits * pen).clamp(max=torch.finfo(torch.float32).max)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float | torch.Tensor, frequency: float | torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: logits[b, v] - frequency * counts[b, v] - presence * (counts[b, v] > 0).

    `counts` (B, V) holds how often each token already occurs in the completion (not the prompt).
    """
    counts = counts.to(logits.dtype)
    return logits - _per_row(frequency, logits) * counts - _per_row(presence, logits) * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """(logits - row max) / temperature, which has the same softmax as logits / temperature but
    never overflows: a tiny temperature gives -inf or large negative numbers, not inf - inf = NaN.
    Rows with temperature below MIN_TEMPERATURE (greedy) are returned unchanged."""
    if not isinstance(temperature, torch.Tensor):
        if temperature < MIN_TEMPERATURE or temperature == 1:
            return logits
        return (logits - logits.amax(-1, keepdim=True)) / temperature
    t = _per_row(temperature, logits)
    greedy = t < MIN_TEMPERATURE
    scaled = (logits - logits.amax(-1, keepdim=True)) / torch.where(greedy, torch.ones_like(t), t)
    return torch.where(greedy, logits, scaled)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep exactly the k highest logits of each row (ties broken by `topk`); k = 0 or k >= V keeps all.

    Equals: keep = zeros(V, bool); keep[logits.topk(k).indices] = True; logits[~keep] = -inf.
    Unlike a threshold on the k-th value, tied logits never let more than k tokens through.
    """
    vocab = logits.shape[-1]
    ks = _per_row(k, logits, torch.long).squeeze(1)
    active = (ks > 0) & (ks < vocab)
    if not bool(active.any()):
        return logits
    kmax = int(ks[active].max())
    idx = logits.topk(kmax, dim=-1).indices  # (B, kmax), best first
    within = torch.arange(kmax, device=logits.device).unsqueeze(0) < ks.unsqueeze(1)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, within)
    keep |= ~active.unsqueeze(1)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep, per row, the smallest set of most likely tokens whose probabilities sum to >= top_p.

    Equals (up to float summation order):
        p = logits.softmax(-1); s, i = p.sort(descending=True, stable=True)
        keep i[j] for every j with s[:j].sum() < top_p        (so the token that reaches top_p is kept)
    but without sorting the vocabulary (a sort costs ~0.5 ms per row of 8k tokens on a CPU core,
    more than a small model's forward pass). Probabilities are non-negative floats, whose int32
    bit patterns order like the values: one pass histograms the probability mass by the top 11
    bits (exponent and 3 mantissa bits), which locates the bucket where the cumulative mass
    crosses top_p; only that bucket's tokens are sorted (a few hundred per row for a near-uniform
    distribution, a handful for a peaked one; the whole row only if its probabilities are exactly
    tied). Rows with top_p >= 1 are unchanged.
    """
    if isinstance(top_p, torch.Tensor):
        ps = top_p.to(logits.device, torch.float32).reshape(-1, 1).expand(logits.shape[0], 1)
        active = ps.squeeze(1) < 1.0
        if not bool(active.any()):
            return logits
        partial = not bool(active.all())
    elif top_p >= 1.0:
        return logits
    else:
        ps, partial = top_p, False  # (B, 1) tensor or a float for every row
    probs = logits.float().softmax(-1)  # (B, V); -inf logits -> exactly 0
    key = probs.view(torch.int32).long() >> 20  # (B, V) bucket; higher bucket = higher probability
    hist = torch.zeros(probs.shape[0], 1 << 11, device=probs.device).scatter_add_(1, key, probs)
    desc = hist.flip(-1).cumsum(-1)  # mass of the top j+1 buckets
    j = (desc < ps).sum(-1).clamp(max=hist.shape[1] - 1)  # buckets wholly above the crossing
    above = torch.where(j > 0, desc.gather(1, (j - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    cut = (hist.shape[1] - 1 - j).unsqueeze(1)
    keep = key > cut
    # The crossing bucket's tokens, sorted by row, then probability (descending), then index.
    rows, cols = torch.nonzero(key == cut, as_tuple=True)
    pv = probs[rows, cols]
    order = torch.sort(rows.double() * 2 + (1 - pv.double()), stable=True).indices
    rows, cols, pv = rows[order], cols[order], pv[order].double()
    cum = pv.cumsum(0)  # float64: runs over all rows' candidates, differences taken per row below
    start = torch.searchsorted(rows, rows)  # first candidate of each candidate's row
    before = cum - pv - (cum[start] - pv[start])  # mass of the row's candidates ranked above this one
    take = before < (ps - above.unsqueeze(1)).squeeze(1)[rows]
    keep[rows[take], cols[take]] = True
    if partial:
        keep |= ~active.unsqueeze(1)
    return torch.where(keep, logits, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the row's highest probability.

    Equals: p = logits.softmax(-1); logits[p < min_p * p.max(-1, keepdim=True)] = -inf. min_p = 0 keeps all.
    """
    mp = _per_row(min_p, logits, torch.float32)
    if not bool((mp > 0).any()):
        return logits
    probs = logits.float().softmax(-1)
    return logits.masked_fill(probs < mp * probs.amax(-1, keepdim=True), float("-inf"))


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverting the CDF with the uniform numbers u (B,) in [0, 1).

    Equals: p = softmax(logits); the token t with p[:t].sum() <= u * p.sum() < p[:t+1].sum().
    One uniform per row (not one exponential per vocabulary entry as in `torch.multinomial`)
    keeps sampling cheap and makes a row's draw depend only on its own random stream.
    Tokens with -inf logits have probability 0 and are never chosen.
    """
    probs = logits.float().softmax(-1)
    cdf = probs.cumsum(-1)
    target = u.to(cdf.device, cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=logits.shape[-1] - 1).squeeze(1)
