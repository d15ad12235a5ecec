"""The one generation path: every place a model produces text samples through this module.

`lmforge generate`, `lmforge chat`, the HTTP server, evaluation, rejection sampling and PPO/GRPO
rollouts all call `generate()` / `stream()` (or the `Engine` underneath them), so what was
evaluated is exactly what is served.

    model, tok = load_model_for_inference("runs/default/sft")
    outs = generate(model, tok, ["Once upon a time"], SamplingParams(temperature=0.0, max_new_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason

Layout, top to bottom:

    SamplingParams          the validated knobs (temperature, top-p, ..., n, seed)
    logits processing       small pure functions of (logits, ids), each tested on hand-built tensors
    stop strings, detok     pure helpers for incremental decoding and exact stop-string cuts
    _BufferedLayer          a KV-cache layer that writes into a preallocated buffer (no per-step cat)
    _FastDecode             one decode step of a Llama/Mistral/Qwen2 model through its own modules,
                            minus transformers' per-call framework overhead (equal logits, tested)
    Engine                  the batched sampler: left-padded prefill, one decode loop, per-row
                            stopping, rows joining and leaving between steps (continuous batching)
    generate / stream       the function API
    load_model_for_inference  local HF folder, a stage's output, or base + PEFT adapter

Why a hand-written loop instead of `model.generate`: on small models `generate`'s per-step
bookkeeping costs as much as the forward pass (a full vocabulary sort for top-p, an exponential
draw per vocabulary entry for multinomial sampling, a `torch.cat` of the whole KV cache per
layer per step). Here top-p is a radix select, sampling inverts the CDF with one uniform per
row, the cache is written in place, and prefill computes only the last position's logits.
`bench/bench_generation.py` measures the difference.
"""

from __future__ import annotations

import inspect
import json
import numbers
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lmforge.config import Schema
from lmforge.errors import LmforgeError
from lmforge.models import cache_kwarg

MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 64
MAX_SAMPLES = 128


class SamplingParams(Schema):
    """How to sample one completion (or `n` of them) from a prompt."""

    temperature: float = Field(
        0.7, ge=0.0, le=100.0, allow_inf_nan=False,
        description="Softmax temperature; 0 means greedy decoding (always the most likely token).",
    )
    top_p: float = Field(
        0.9, gt=0.0, le=1.0, allow_inf_nan=False,
        description="Nucleus sampling: sample from the smallest set of tokens whose probabilities reach top_p (1 = off).",
    )
    top_k: int = Field(0, ge=0, description="Sample only from the k most likely tokens (0 = off).")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Drop tokens whose probability is below min_p times the most likely token's (0 = off).",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, allow_inf_nan=False,
        description="Logits of tokens already in the prompt or completion: positive ones divided by this, "
        "negative ones multiplied (1 = off; >1 discourages repeats).",
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Subtracted once from the logit of every token that already appears in the completion.",
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Subtracted from a token's logit once per time it already appears in the completion.",
    )
    min_new_tokens: int = Field(
        0, ge=0, description="Generate at least this many tokens: EOS, stop tokens and stop strings are ignored before."
    )
    max_new_tokens: int = Field(
        256, ge=1, le=1_000_000,
        description="Generate at most this many tokens; prompt plus max_new_tokens must fit the model's context.",
    )
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS,
        description="Stop strings: the completion ends just before the first one that appears (it is not included).",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list, max_length=MAX_STOP_TOKEN_IDS,
        description="Token ids that end the completion, in addition to the tokenizer's EOS.",
    )
    n: int = Field(1, ge=1, le=MAX_SAMPLES, description="Completions to sample per prompt.")
    seed: int | None = Field(
        None, ge=0, lt=2**63,
        description="Seeds each completion's own random stream (completion j of a prompt uses stream j), "
        "so a seeded request samples the same tokens whatever it is batched with; None = torch's global RNG.",
    )
    logprobs: bool = Field(
        False, description="Also return each sampled token's log-probability under the distribution it was sampled "
        "from (after penalties, temperature and top-k/top-p/min-p; for greedy rows, the softmax of the penalised logits).",
    )
    skip_special_tokens: bool = Field(True, description="Leave special tokens (EOS, role markers) out of the text.")

    @field_validator("stop")
    @classmethod
    def _stops_non_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > 256 for s in v):
            raise ValueError("stop strings must be at most 256 characters long")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids_non_negative(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError("stop token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _min_le_max(self) -> "SamplingParams":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        return self


# --------------------------------------------------------------------------------------------
# Logits processing: pure functions of (B, V) logits and per-row parameters.
#
# A parameter is a Python number (same for every row) or a (B,) tensor (one value per row), so one
# batch can mix requests with different settings. Removed tokens get -inf. Order used by the
# engine (and by transformers' `generate`): penalties, temperature, top-k, top-p, min-p, sample.


def _per_row(value: float | int | torch.Tensor, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`value` as a (B, 1) tensor on the logits' device."""
    t = torch.as_tensor(value, device=logits.device, dtype=dtype or logits.dtype)
    return t.reshape(-1, 1).expand(logits.shape[0], 1) if t.numel() > 1 else t.reshape(1, 1).expand(logits.shape[0], 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Penalise tokens already seen (CTRL, Keskar et al. 2019; transformers' RepetitionPenaltyLogitsProcessor).

    Equals, for every row b and token v with seen[b, v]:
        logits[b, v] = logits[b, v] / penalty if logits[b, v] > 0 else logits[b, v] * penalty
    `seen` is a (B, V) bool mask of tokens in the prompt or the completion so far.
    """
    pen = _per_row(penalty, logits)
    penalised = torch.where(logits > 0, logits / pen, logits * pen)
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
    """logits / temperature; rows with temperature 0 (greedy) are returned unchanged."""
    if not isinstance(temperature, torch.Tensor):
        return logits / temperature if temperature > 0 else logits
    t = _per_row(temperature, logits)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


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


# --------------------------------------------------------------------------------------------
# Stop strings and incremental detokenisation (pure helpers)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index where the earliest stop string occurs in `text`, considering only matches that end
    after position `start` (text before it was already checked); -1 if none."""
    best = -1
    for s in stops:
        j = text.find(s, max(0, start - len(s) + 1))
        if j != -1 and (best == -1 or j < best):
            best = j
    return best


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that could be the start of a stop string.

    A stream must hold them back: if the next token completes the stop string, they are cut.
    """
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def decode_delta(tokenizer: Any, ids: list[int], prefix_offset: int, read_offset: int,
                 skip_special_tokens: bool = True) -> tuple[str, int, int]:
    """New text produced by the tokens after `read_offset`, as (text, prefix_offset, read_offset).

    Decoding token by token breaks multi-byte characters (a byte-level token may hold half of
    one) and, for SentencePiece tokenizers, leading spaces; so the window from `prefix_offset`
    is decoded with and without the new tokens and the difference is the new text. While the
    tail is an incomplete character (U+FFFD), nothing is returned and the offsets stay.
    """
    kw = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], **kw)
    full = tokenizer.decode(ids[prefix_offset:], **kw)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset


# --------------------------------------------------------------------------------------------
# KV cache


class _BufferedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values live in a preallocated (B, H, capacity, D) buffer.

    `DynamicLayer.update` does `torch.cat([cache, new])` per layer per step, copying the whole
    cache every token (O(T^2) bytes over a generation; at batch 16 on a small model that copy
    costs about as much as the forward pass). Here a step writes one slot; `keys` and `values`
    are views of the filled part. The buffer doubles when full.
    """

    reserve = 64  # initial capacity in positions

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Take over (B, H, capacity, D) buffers whose first `length` positions are filled."""
        self.dtype, self.device = keys.dtype, keys.device
        self.kbuf, self.vbuf, self.length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        k = key_states.new_empty(b, h, self.reserve, d)
        self.adopt(k, torch.empty_like(k), 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[2]:
            cap = max(end, 2 * self.kbuf.shape[2])
            k = self.kbuf.new_empty(*self.kbuf.shape[:2], cap, self.kbuf.shape[3])
            v = torch.empty_like(k)
            k[:, :, : self.length] = self.kbuf[:, :, : self.length]
            v[:, :, : self.length] = self.vbuf[:, :, : self.length]
            self.kbuf, self.vbuf = k, v
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.adopt(self.kbuf, self.vbuf, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.adopt(self.kbuf[indices], self.vbuf[indices], self.length)


def _new_cache(model: Any, reserve: int) -> DynamicCache:
    """A `DynamicCache` for `model`; plain full-attention layers become buffered layers.

    Other layer kinds (sliding-window, recurrent, ...) are kept as transformers builds them;
    the engine then runs static batches instead of letting new requests join mid-generation.
    """
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_BufferedLayer() for _ in cache.layers]
        for layer in cache.layers:
            layer.reserve = reserve
    return cache


def _is_buffered(cache: DynamicCache) -> bool:
    return bool(cache.layers) and all(isinstance(layer, _BufferedLayer) for layer in cache.layers)


# The model families whose decoder layer is exactly: x + attn(norm(x)), then x + mlp(norm(x)),
# with rotary position embeddings (see each one's modeling file in transformers).
_FAST_DECODE_MODELS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


class _FastDecode:
    """One decoding step (one new token per row) of a Llama-family model, computed with the
    model's own modules, weights and attention function, minus the framework around them.

    Equals `model(input_ids=tokens, position_ids=positions, attention_mask=mask2d,
    past_key_values=cache).logits[:, -1]` (tests/test_generation.py checks it on Llama, Mistral
    and Qwen2 configurations). Why: on a small model transformers' forward spends about a
    millisecond per step outside its matrix products (output-capturing decorators, causal-mask
    construction, per-module dispatch), which at batch 1 is a fifth of the step.

    Only used when the model is in eval mode and one of `_FAST_DECODE_MODELS` running SDPA attention, every
    projection is a plain `nn.Linear` (no quantised or adapter-wrapped layers), nothing hooks
    or wraps a module's forward (accelerate device maps, user patches), and the cache is made
    of buffered full-attention layers (no sliding window). Otherwise the engine calls the model.
    """

    def __init__(self, model: Any):
        import sys

        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.model, self.inner = model, model.model
        self.rope = sys.modules[type(self.inner).__module__].apply_rotary_pos_emb
        self.attend = sdpa_attention_forward
        # In float32, F.rms_norm runs the same operations as these families' RMSNorm modules
        # (bitwise-equal output) in one call instead of eight; the SiLU-gated MLP likewise.
        layer = self.inner.layers[0]
        self.functional_norm = type(layer.input_layernorm).__name__.endswith("RMSNorm") and all(
            hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm))
        mlp = layer.mlp
        self.functional_mlp = (type(mlp).__name__.endswith("MLP") and getattr(model.config, "hidden_act", "") == "silu"
                               and all(type(getattr(mlp, n, None)) is torch.nn.Linear
                                       for n in ("gate_proj", "up_proj", "down_proj")))

    def _norm(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        if self.functional_norm and x.dtype == torch.float32:
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
        return norm(x)

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        if not self.functional_mlp:
            return mlp(x)
        F = torch.nn.functional
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return F.linear(F.silu(F.linear(x, g.weight, g.bias)) * F.linear(x, u.weight, u.bias), d.weight, d.bias)

    @classmethod
    def for_model(cls, model: Any) -> "_FastDecode | None":
        if type(model).__name__ not in _FAST_DECODE_MODELS or getattr(model.config, "_attn_implementation", None) != "sdpa":
            return None
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or type(model.lm_head) is not torch.nn.Linear:
            return None
        for layer in inner.layers:
            a = layer.self_attn
            if any(type(p) is not torch.nn.Linear for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
                return None
            if getattr(a, "sliding_window", None) is not None:
                return None
        for m in model.modules():
            if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") or "forward" in m.__dict__:
                return None
        return cls(model)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """tokens, positions (B, 1); mask (B, 1, 1, T) bool with True = attend, or None -> (B, V) logits."""
        import torch.nn.functional as F

        b = tokens.shape[0]
        h = self.inner.embed_tokens(tokens)  # (B, 1, d)
        cos, sin = self.inner.rotary_emb(h, positions)  # (B, 1, head_dim)
        h = h.view(b, -1)  # one position per row: (B, d) keeps every projection a plain 2-D matmul
        for layer in self.inner.layers:
            a = layer.self_attn
            x = self._norm(layer.input_layernorm, h)
            q = F.linear(x, a.q_proj.weight, a.q_proj.bias).view(b, -1, 1, a.head_dim)  # (B, heads, 1, head_dim)
            k = F.linear(x, a.k_proj.weight, a.k_proj.bias).view(b, -1, 1, a.head_dim)
            v = F.linear(x, a.v_proj.weight, a.v_proj.bias).view(b, -1, 1, a.head_dim)
            q, k = self.rope(q, k, cos, sin)
            k, v = cache.layers[a.layer_idx].update(k, v)
            o, _ = self.attend(a, q, k, v, mask, dropout=0.0, scaling=a.scaling)  # (B, 1, heads, head_dim)
            h = h + F.linear(o.reshape(b, -1), a.o_proj.weight, a.o_proj.bias)
            h = h + self._mlp(layer.mlp, self._norm(layer.post_attention_layernorm, h))
        h = self._norm(self.inner.norm, h)
        return F.linear(h, self.model.lm_head.weight, self.model.lm_head.bias)


# --------------------------------------------------------------------------------------------
# The batched sampler


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]  # everything sampled, including a final EOS/stop token
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length", or "cancelled"
    prompt_tokens: int
    logprobs: list[float] | None = None  # one per token id, when SamplingParams.logprobs

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class Row:
    """The state of one row being generated. Callers read it; only the engine writes it."""

    prompt_ids: list[int]
    params: SamplingParams
    tag: Any  # the caller's handle (a prompt index, a server request)
    sample_index: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    incremental: bool  # decode text every step (streaming or stop strings) or once at the end
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    text: str = ""
    sent: int = 0  # characters of `text` already handed out by take_text()
    finish_reason: str | None = None
    _prefix: int = 0
    _read: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        """Text not yet handed out that is safe to show: everything once finished, otherwise
        all but a tail that might still become a stop string."""
        end = len(self.text) if self.finished else len(self.text) - stop_holdback(self.text, self.params.stop)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def completion(self, prompt_index: int | None = None) -> Completion:
        return Completion(
            prompt_index=self.tag if prompt_index is None else prompt_index, sample_index=self.sample_index,
            text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason or "cancelled",
            prompt_tokens=len(self.prompt_ids), logprobs=list(self.logprobs) if self.logprobs is not None else None,
        )


class _RowParams:
    """The running rows' sampling parameters, rebuilt when rows join or leave.

    A parameter every row shares stays a Python number (the logits functions then skip the
    per-row tensor work); otherwise it is a (B,) tensor. None = no row uses that control.
    """

    def __init__(self, rows: list[Row], device: torch.device):
        ps = [r.params for r in rows]

        def col(values: list, dtype: torch.dtype) -> float | int | torch.Tensor:
            if all(v == values[0] for v in values):
                return values[0]
            return torch.tensor(values, dtype=dtype, device=device)

        temps = [p.temperature for p in ps]
        self.all_greedy = all(t == 0 for t in temps)
        self.any_greedy = any(t == 0 for t in temps)
        self.greedy = torch.tensor([t == 0 for t in temps], device=device) if self.any_greedy else None
        self.temperature = col(temps, torch.float32)
        self.top_k = col([p.top_k for p in ps], torch.long) if any(p.top_k > 0 for p in ps) else None
        self.top_p = col([p.top_p for p in ps], torch.float32) if any(p.top_p < 1 for p in ps) else None
        self.min_p = col([p.min_p for p in ps], torch.float32) if any(p.min_p > 0 for p in ps) else None
        self.repetition = col([p.repetition_penalty for p in ps], torch.float32) if any(
            p.repetition_penalty != 1 for p in ps) else None
        self.any_count_penalty = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in ps)
        self.presence = col([p.presence_penalty for p in ps], torch.float32)
        self.frequency = col([p.frequency_penalty for p in ps], torch.float32)
        self.any_min_new = any(p.min_new_tokens > 0 for p in ps)
        self.any_logprobs = any(p.logprobs for p in ps)
        self.seeded = [i for i, r in enumerate(rows) if r.generator is not None]


def context_length(model: Any) -> int | None:
    """The model's maximum sequence length, from its config (None if it does not say)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The single token the tokenizer's chat template ends an assistant turn with (EOS for
    lmforge's template; `<|im_end|>`, `<|eot_id|>`, ... for others), or None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    from lmforge.data.sft import ChatEncoder

    try:
        enc = ChatEncoder(tokenizer)
    except LmforgeError:  # a template the SFT encoder cannot read: rely on EOS alone
        return None
    ok = isinstance(enc.eot_id, int) and tokenizer.convert_ids_to_tokens(enc.eot_id) == enc.eot_text
    return enc.eot_id if ok else None


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Stop ids: the tokenizer's EOS, the chat template's end-of-turn token (a model fine-tuned
    with a reused template ends its replies with it, not with EOS), and the model's generation
    config (which may list several)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        ids.add(eot)
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def _seeded_generator(seed: int, stream: int) -> torch.Generator:
    # splitmix-style mixing so streams of nearby seeds do not overlap.
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 1) % (2**63))
    return g


class Engine:
    """Batched generation with a KV cache: rows join (prefill) and leave (finish) between steps.

        engine = Engine(model, tokenizer, max_batch=32)
        rows = engine.add(prompt_ids, params, tag=0)
        while engine.has_work():
            for row in engine.step():       # rows that got a token this step (or just finished)
                print(row.take_text(), end="")

    Prompts are left-padded so every row's next token sits in the last column; each row has its
    own position ids and attention mask, so padding never changes a row's result (up to float
    rounding). When rows finish they are dropped from the cache and padding columns that no row
    needs any more are trimmed. New prompts are prefilled as a batch and merged into the running
    batch (continuous batching) when the cache is made of plain full-attention layers.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 32, fast_decode: bool = True):
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be at least 1 (got {max_batch}).")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.eos_ids = frozenset(eos_token_ids(model, tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        sig = inspect.signature(model.forward).parameters
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.values())
        self._pass_positions = "position_ids" in sig or open_kwargs
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in sig else (
            "num_logits_to_keep" if "num_logits_to_keep" in sig else None)
        self._cache_kw = cache_kwarg(model)
        self.fast = _FastDecode.for_model(model) if fast_decode else None
        self.pending: deque[list[Row]] = deque()  # groups of n rows sharing a prompt
        self._clear()

    # ---- state -------------------------------------------------------------------------------

    def _clear(self) -> None:
        self.rows: list[Row] = []
        self.cache = None
        self.length = 0  # positions held in the cache (incl. left padding)
        self.pads: list[int] = []  # left-padding columns per row
        self.next_tokens: torch.Tensor | None = None  # (B, 1) sampled, not yet fed
        self.positions: torch.Tensor | None = None  # (B, 1) position id of next_tokens
        self.mask: torch.Tensor | None = None  # (B, capacity) 1 = real token; columns >= length are 1
        self.seen: torch.Tensor | None = None  # (B, V) bool, for repetition_penalty
        self.counts: torch.Tensor | None = None  # (B, V) completion token counts, for presence/frequency
        self.rp: _RowParams | None = None

    def has_work(self) -> bool:
        return bool(self.rows or self.pending)

    @property
    def active(self) -> int:
        return len(self.rows) + sum(len(g) for g in self.pending)

    def add(self, prompt_ids: list[int], params: SamplingParams, *, tag: Any = None, stream: bool = False,
            seed_stream: int = 0, where: str = "prompt") -> list[Row]:
        """Queue `params.n` completions of `prompt_ids`; they start at a later `step()`.

        `where` names the prompt in error messages ("line 4 of prompts.jsonl"). `seed_stream`
        offsets the seeded random streams (completion j uses stream seed_stream + j).
        Raises LmforgeError for an empty prompt, unknown token ids or a too-long request.
        """
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise LmforgeError(f"{where} is empty; give at least one token of prompt.")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise LmforgeError(f"{where} holds token id {bad[0]}, outside the model's vocabulary of {self.vocab_size}.")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise LmforgeError(f"stop_token_ids holds {bad[0]}, outside the model's vocabulary of {self.vocab_size}.")
        if self.context is not None and n_prompt + params.max_new_tokens > self.context:
            room = self.context - n_prompt
            fix = f"lower max_new_tokens to at most {room}" if room > 0 else "shorten the prompt"
            raise LmforgeError(
                f"{where} has {n_prompt} tokens and max_new_tokens is {params.max_new_tokens}, but the model's "
                f"context is {self.context} tokens; {fix}."
            )
        group = [
            Row(
                prompt_ids=[int(t) for t in prompt_ids], params=params, tag=tag, sample_index=j,
                stop_ids=self.eos_ids | frozenset(params.stop_token_ids),
                generator=_seeded_generator(params.seed, seed_stream + j) if params.seed is not None else None,
                incremental=stream or bool(params.stop), logprobs=[] if params.logprobs else None,
            )
            for j in range(params.n)
        ]
        self.pending.append(group)
        return group

    def cancel(self, row: Row) -> None:
        """Stop `row` (e.g. its client went away); it leaves the batch at the next step."""
        if not row.finished:
            row.finish_reason = "cancelled"

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Admit waiting prompts (prefill) or decode one token for every running row.

        Returns the rows that got a new token this step (including those that just finished).
        """
        self._drop_finished()
        self._drop_cancelled_pending()
        if self.pending and (not self.rows or (
                _is_buffered(self.cache) and len(self.rows) + len(self.pending[0]) <= self.max_batch)):
            return self._admit()
        if not self.rows:
            return []
        mask = self.mask[:, : self.length + 1] if any(self.pads) else None  # None: no padding, no mask work
        if self.fast is not None and not self.model.training and _is_buffered(self.cache):
            logits = self.fast(self.next_tokens, self.positions, self.cache,
                               mask[:, None, None, :].bool() if mask is not None else None)
        else:
            kw: dict[str, Any] = {"attention_mask": mask} if mask is not None else {}
            if self._pass_positions:
                kw["position_ids"] = self.positions
            kw[self._cache_kw] = self.cache
            logits = self.model(input_ids=self.next_tokens, use_cache=True, **kw).logits[:, -1]
        self.length += 1
        self.positions += 1  # the token sampled now sits one position after the one just fed
        if self.length >= self.mask.shape[1]:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask)], dim=1)
        return self._sample_and_append(logits, self.rows, self.rp, range(len(self.rows)))

    def _admit(self) -> list[Row]:
        """Prefill waiting prompts that fit in the batch (at least one), merge them, sample their first token."""
        groups: list[list[Row]] = []
        room = self.max_batch - len(self.rows)
        while self.pending and (not groups or len(self.pending[0]) <= room):
            g = self.pending.popleft()
            groups.append(g)
            room -= len(g)
        prompts = [g[0].prompt_ids for g in groups]
        width = max(len(p) for p in prompts)
        pads = [width - len(p) for p in prompts]
        ids = torch.tensor([[self.pad_id] * pad + p for p, pad in zip(prompts, pads)], device=self.device)
        mask = (torch.arange(width, device=self.device).unsqueeze(0)
                >= torch.tensor(pads, device=self.device).unsqueeze(1)).long()
        reserve = width + max(g[0].params.max_new_tokens for g in groups)
        cache = _new_cache(self.model, reserve=min(reserve, self.context or reserve))
        kw: dict[str, Any] = {}
        if self._pass_positions:
            kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if any(pads):
            kw["attention_mask"] = mask
        if self._keep_kw:
            kw[self._keep_kw] = 1  # only the last position's logits: (B, 1, V), not (B, T, V)
        kw[self._cache_kw] = cache
        out = self.model(input_ids=ids, use_cache=True, **kw)
        logits = out.logits[:, -1]
        # n completions of one prompt share its prefill: repeat rows instead of recomputing.
        sizes = [len(g) for g in groups]
        if any(s > 1 for s in sizes):
            expand = torch.repeat_interleave(torch.arange(len(groups), device=self.device),
                                             torch.tensor(sizes, device=self.device))
            logits = logits[expand]
            cache.batch_select_indices(expand)
            mask = mask[expand]
            pads = [p for p, s in zip(pads, sizes) for _ in range(s)]
        new_rows = [s for g in groups for s in g]
        self._merge(new_rows, cache, width, pads)
        first = len(self.rows) - len(new_rows)
        return self._sample_and_append(logits, new_rows, _RowParams(new_rows, self.device),
                                       range(first, len(self.rows)))

    def _merge(self, new_rows: list[Row], cache: Any, width: int, pads: list[int]) -> None:
        """Append prefilled rows (their cache `width` long) to the running batch, right-aligned."""
        # The first sampled token of a prompt of L tokens sits at position L.
        new_pos = torch.tensor([[len(r.prompt_ids)] for r in new_rows], device=self.device)
        new_next = torch.zeros_like(new_pos)
        if not self.rows:
            self.cache, self.length, self.pads = cache, width, pads
            self.positions, self.next_tokens = new_pos, new_next
        else:
            length = max(self.length, width)
            old_shift, new_shift = length - self.length, length - width
            for old, new in zip(self.cache.layers, cache.layers):
                b0, b1 = old.kbuf.shape[0], new.kbuf.shape[0]
                cap = max(old.kbuf.shape[2] + old_shift, new.kbuf.shape[2] + new_shift)
                k = old.kbuf.new_zeros(b0 + b1, old.kbuf.shape[1], cap, old.kbuf.shape[3])
                v = torch.zeros_like(k)
                k[:b0, :, old_shift:length] = old.kbuf[:, :, : self.length]
                v[:b0, :, old_shift:length] = old.vbuf[:, :, : self.length]
                k[b0:, :, new_shift:length] = new.kbuf[:, :, :width]
                v[b0:, :, new_shift:length] = new.vbuf[:, :, :width]
                old.adopt(k, v, length)
            self.pads = [p + old_shift for p in self.pads] + [p + new_shift for p in pads]
            self.length = length
            self.positions = torch.cat([self.positions, new_pos])
            self.next_tokens = torch.cat([self.next_tokens, new_next])
        self.rows = self.rows + list(new_rows)
        self._rebuild_mask()
        self._grow_penalty_state(new_rows)
        self.rp = _RowParams(self.rows, self.device)

    def _rebuild_mask(self) -> None:
        cap = self.length + 64
        pads = torch.tensor(self.pads, device=self.device).unsqueeze(1)
        self.mask = (torch.arange(cap, device=self.device).unsqueeze(0) >= pads).long()

    def _grow_penalty_state(self, new_rows: list[Row]) -> None:
        """Extend the (B, V) seen/count tensors for new rows, allocating them on first need."""
        v, b1 = self.vocab_size, len(new_rows)
        want_seen = self.seen is not None or any(r.params.repetition_penalty != 1 for r in new_rows)
        want_counts = self.counts is not None or any(
            r.params.presence_penalty != 0 or r.params.frequency_penalty != 0 for r in new_rows)
        b0 = len(self.rows) - b1
        if want_seen:
            add = torch.zeros(b1, v, dtype=torch.bool, device=self.device)
            for i, r in enumerate(new_rows):
                add[i, torch.tensor(r.prompt_ids, device=self.device)] = True
            old = self.seen if self.seen is not None else torch.zeros(b0, v, dtype=torch.bool, device=self.device)
            self.seen = torch.cat([old, add])
        if want_counts:
            old = self.counts if self.counts is not None else torch.zeros(b0, v, dtype=torch.int32, device=self.device)
            self.counts = torch.cat([old, torch.zeros(b1, v, dtype=torch.int32, device=self.device)])

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._clear()
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.pads = [self.pads[i] for i in keep]
        trim = min(self.pads) if _is_buffered(self.cache) else 0
        self.cache.batch_select_indices(idx)
        if trim:
            # Columns that are padding for every remaining row carry no information: drop them.
            for layer in self.cache.layers:
                layer.adopt(layer.kbuf[:, :, trim:], layer.vbuf[:, :, trim:], layer.length - trim)
            self.length -= trim
            self.pads = [p - trim for p in self.pads]
        self.next_tokens, self.positions = self.next_tokens[idx], self.positions[idx]
        self.seen = self.seen[idx] if self.seen is not None else None
        self.counts = self.counts[idx] if self.counts is not None else None
        self._rebuild_mask()
        self.rp = _RowParams(self.rows, self.device)

    def _drop_cancelled_pending(self) -> None:
        if any(s.finished for g in self.pending for s in g):
            self.pending = deque(g for g in self.pending if not all(s.finished for s in g))

    # ---- sampling ----------------------------------------------------------------------------

    def _uniforms(self, rows: list[Row], rp: _RowParams) -> torch.Tensor:
        u = torch.rand(len(rows))  # torch's global RNG, like transformers' generate
        for i in rp.seeded:
            u[i] = torch.rand(1, generator=rows[i].generator)
        return u.to(self.device)

    def _sample_and_append(self, logits: torch.Tensor, rows: list[Row], rp: _RowParams,
                           batch_rows: range) -> list[Row]:
        """Pick the next token of `rows` (batch rows `batch_rows`) from their (B, V) logits."""
        logits = logits.float()
        sl = slice(batch_rows.start, batch_rows.stop)
        if rp.repetition is not None and self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[sl], rp.repetition)
        if rp.any_count_penalty and self.counts is not None:
            logits = apply_presence_frequency_penalty(logits, self.counts[sl], rp.presence, rp.frequency)
        if rp.any_min_new:
            # Before min_new_tokens, EOS and stop tokens are impossible.
            pairs = [(i, t) for i, r in enumerate(rows) if len(r.token_ids) < r.params.min_new_tokens
                     for t in r.stop_ids if t < logits.shape[-1]]
            if pairs:
                ri, ti = zip(*pairs)
                logits[list(ri), list(ti)] = float("-inf")
        if rp.all_greedy:
            tokens, final = logits.argmax(-1), logits
        else:
            x = apply_temperature(logits, rp.temperature)
            if rp.top_k is not None:
                x = top_k_filter(x, rp.top_k)
            if rp.top_p is not None:
                x = top_p_filter(x, rp.top_p)
            if rp.min_p is not None:
                x = min_p_filter(x, rp.min_p)
            tokens = sample_from_logits(x, self._uniforms(rows, rp))
            final = x
            if rp.any_greedy:
                tokens = torch.where(rp.greedy, logits.argmax(-1), tokens)
                final = torch.where(rp.greedy.unsqueeze(1), logits, x)
        lps = None
        if rp.any_logprobs:
            lps = final.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        self.next_tokens[sl] = tokens.unsqueeze(1)
        if self.seen is not None:
            self.seen[sl].scatter_(1, tokens.unsqueeze(1), True)
        if self.counts is not None:
            self.counts[sl].scatter_add_(1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.int32).unsqueeze(1))
        for i, (r, t) in enumerate(zip(rows, tokens.tolist())):  # .tolist(): one host-device sync per step
            self._append(r, t, lps[i] if lps is not None else None)
        return list(rows)

    def _append(self, r: Row, token: int, logprob: float | None) -> None:
        p = r.params
        r.token_ids.append(token)
        if r.logprobs is not None and logprob is not None:
            r.logprobs.append(logprob)
        n = len(r.token_ids)
        if token in r.stop_ids and n > p.min_new_tokens:
            r.finish_reason = "stop"
        else:
            if r.incremental:
                checked = len(r.text)
                delta, r._prefix, r._read = decode_delta(self.tokenizer, r.token_ids, r._prefix, r._read,
                                                         p.skip_special_tokens)
                r.text += delta
                if p.stop and delta and n >= p.min_new_tokens:
                    j = find_stop(r.text, p.stop, checked)
                    if j != -1:
                        r.text = r.text[:j]  # the completion ends just before the stop string
                        r.finish_reason = "stop"
                        return
            if n >= p.max_new_tokens or (self.context is not None and len(r.prompt_ids) + n >= self.context):
                r.finish_reason = "length"
        if r.finished:
            self._final_text(r)

    def _final_text(self, r: Row) -> None:
        """Text of a finished row: decoded once (non-incremental) or the held-back tail flushed."""
        kw = dict(skip_special_tokens=r.params.skip_special_tokens, clean_up_tokenization_spaces=False)
        ids = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids  # a stop token is not text
        if not r.incremental:
            r.text = self.tokenizer.decode(ids, **kw)
            return
        tail = self.tokenizer.decode(ids[r._prefix:], **kw)
        head = self.tokenizer.decode(ids[r._prefix:r._read], **kw)
        if len(tail) > len(head):
            r.text += tail[len(head):]  # e.g. an incomplete character held back while streaming


# --------------------------------------------------------------------------------------------
# The function API


def encode_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                   add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each prompt; lists of ints pass through unchanged.

    Raw text gets the tokenizer's special tokens (e.g. a BOS) as in training; pass
    `add_special_tokens=False` for text already rendered by a chat template, which carries its own.
    """
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]))
            continue
        ids = p.tolist() if hasattr(p, "tolist") else p  # a 1-D tensor or array of ids
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise LmforgeError(f"prompt {i} must be a string or a list of token ids, not {type(p).__name__}.")
        out.append([int(t) for t in ids])
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
             params: SamplingParams | None = None, *, max_batch: int = 32, add_special_tokens: bool = True,
             on_finish: Any = None) -> list[Completion]:
    """Sample `params.n` completions of every prompt; returns them prompt by prompt, sample by sample.

    prompts     strings (tokenised here) or lists of token ids
    max_batch   rows decoded together; finished rows are replaced by waiting prompts at once
    on_finish   optional callback(Completion) as each completion finishes (progress bars)

    With `params.seed` set, completion j of prompt i uses random stream i * n + j, so the result
    does not depend on max_batch or on the other prompts (up to float rounding).
    """
    params = params or SamplingParams()
    engine = Engine(model, tokenizer, max_batch=max_batch)
    rows: list[Row] = []
    for i, ids in enumerate(encode_prompts(tokenizer, prompts, add_special_tokens=add_special_tokens)):
        rows += engine.add(ids, params, tag=i, seed_stream=i * params.n, where=f"prompt {i}")
    while engine.has_work():
        for r in engine.step():
            if r.finished and on_finish is not None:
                on_finish(r.completion())
    return [r.completion() for r in rows]


@dataclass
class Chunk:
    """A piece of a streamed completion: new text, and the finish reason on the last piece."""

    index: int  # which of the n completions
    text: str
    token_ids: list[int]  # tokens sampled since the previous chunk of this completion
    finish_reason: str | None = None


def stream(model: Any, tokenizer: Any, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
           add_special_tokens: bool = True) -> Iterator[Chunk]:
    """Generate the completions of one prompt, yielding text as soon as it is safe to show.

    Text that might begin a stop string is held back until it is clear; the concatenated chunks
    equal the final completion text. Closing the iterator early stops generation.
    """
    params = params or SamplingParams()
    engine = Engine(model, tokenizer, max_batch=max(params.n, 1))
    ids = encode_prompts(tokenizer, [prompt], add_special_tokens=add_special_tokens)[0]
    rows = engine.add(ids, params, tag=0, stream=True)
    given = [0] * len(rows)
    try:
        while engine.has_work():
            for r in engine.step():
                text = r.take_text()
                if text or r.finished:
                    new_ids = r.token_ids[given[r.sample_index]:]
                    given[r.sample_index] = len(r.token_ids)
                    yield Chunk(r.sample_index, text, new_ids, r.finish_reason)
    finally:
        for r in rows:
            engine.cancel(r)


# --------------------------------------------------------------------------------------------
# Loading a model to sample from


def _torch_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in names:
        raise LmforgeError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}.")
    return names[dtype]


def load_model_for_inference(path: str | Path, device: str | torch.device | None = None,
                             dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode from a local HF causal-LM folder, a stage folder (has
    manifest.json) or a PEFT adapter folder (has adapter_config.json; its base is loaded and the
    adapter merged in, which makes sampling as fast as with the base model).

    device: "cpu", "cuda", "cuda:1", ... (default: cuda when available); dtype: auto (bf16 on a
    GPU that supports it, else fp32), fp32, bf16 or fp16.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.rundir import resolve_artifact

    folder = resolve_artifact(path, "model")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device {dev} was asked for, but no CUDA GPU is available; use --device cpu.")
    dt = _torch_dtype(dtype, dev)
    adapter = folder / "adapter_config.json"
    base = folder
    if adapter.is_file():
        try:
            base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError):
            raise LmforgeError(f"{adapter} names no base_model_name_or_path; it cannot be loaded.") from None
        base = Path(base_name)
        if not base.is_absolute() and not base.exists() and (folder / base).exists():
            base = folder / base
        base = resolve_artifact(base, "base model")
    if not (base / "config.json").is_file():
        raise LmforgeError(f"{base} is not a Hugging Face model folder (it has no config.json).")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dt)
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"The model in {base} cannot be loaded ({str(e).splitlines()[0]}).") from None
    if adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    tok_dir = folder if (folder / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, KeyError) as e:
        raise LmforgeError(f"No tokenizer could be loaded from {tok_dir} ({str(e).splitlines()[0]}).") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # only used to fill left padding, which is masked
    model.to(dev).eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# `lmforge generate MODEL --prompts FILE`


def sampling_params(overrides: Sequence[str] = (), **flags: Any) -> SamplingParams:
    """SamplingParams from `key=value` overrides (YAML values) and named flags (None = unset)."""
    from lmforge.config import parse_override, validate

    data: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 1:
            raise LmforgeError(f"Sampling option {text!r}: the keys are flat, e.g. temperature=0.2.")
        data[path[0]] = value
    return validate(SamplingParams, data, where="sampling options")


def read_prompts(path: str | Path, *, chat: bool) -> tuple[list[dict], int]:
    """Prompts from a JSONL file (`prompt` string or `messages` list per line, optional `id`) or
    a text file (one prompt per line). Returns (records, blank lines skipped).

    Each record holds `prompt` (what is echoed in the output), `messages` (for chat rendering,
    or None) and `id` (or None). With `chat`, a plain prompt becomes one user message.
    """
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"Prompts file {p} does not exist; check the path.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"Prompts file {p} cannot be read as UTF-8 text ({e}).") from None
    records, skipped = [], 0
    jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    for no, line in enumerate(lines, 1):
        if not line.strip():
            skipped += 1
            continue
        if not jsonl:
            rec = {"prompt": line, "messages": None, "id": None}
        else:
            try:
                obj = json.loads(line)
            except ValueError:
                raise LmforgeError(f"Line {no} of {p} is not valid JSON; each line must be one JSON object.") from None
            if not isinstance(obj, dict):
                raise LmforgeError(f"Line {no} of {p} must be a JSON object with a \"prompt\" or \"messages\" field.")
            msgs, prompt = obj.get("messages"), obj.get("prompt")
            if msgs is not None:
                if not (isinstance(msgs, list) and msgs and all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in msgs)):
                    raise LmforgeError(f"Line {no} of {p}: \"messages\" must be a non-empty list of "
                                       "{\"role\": ..., \"content\": ...} objects with string values.")
                rec = {"prompt": msgs, "messages": msgs, "id": obj.get("id")}
            elif isinstance(prompt, str):
                rec = {"prompt": prompt, "messages": None, "id": obj.get("id")}
            else:
                raise LmforgeError(f"Line {no} of {p} has neither a \"prompt\" string nor a \"messages\" list.")
        if chat and rec["messages"] is None:
            rec["messages"] = [{"role": "user", "content": rec["prompt"]}]
        rec["line"] = no
        records.append(rec)
    if not records:
        raise LmforgeError(f"Prompts file {p} holds no prompts.")
    return records, skipped


def generate_file(model_path: str | Path, prompts_path: str | Path, out_path: str | Path | None,
                  params: SamplingParams, *, chat: bool = False, max_batch: int = 32, device: str | None = None,
                  dtype: str | None = None) -> dict:
    """`lmforge generate`: complete every prompt of a file and write the results as JSONL.

    One output line per completion: index (prompt line order), sample (0..n-1), id (if the
    input had one), prompt, completion, prompt_tokens, completion_tokens, finish_reason.
    Returns a summary (counts, tokens/s, finish reasons).
    """
    import sys
    import time

    from lmforge.data.chat import render
    from lmforge.progress import Progress
    from lmforge.rundir import atomic_write_text

    records, skipped = read_prompts(prompts_path, chat=chat)
    out = Path(out_path) if out_path else Path(prompts_path).with_suffix(".completions.jsonl")
    model, tokenizer = load_model_for_inference(model_path, device=device, dtype=dtype)
    engine = Engine(model, tokenizer, max_batch=max_batch)
    rows: list[Row] = []
    for i, rec in enumerate(records):
        where = f"line {rec['line']} of {prompts_path}"
        if rec["messages"] is not None:
            ids = encode_prompts(tokenizer, [render(tokenizer, rec["messages"], add_generation_prompt=True)],
                                 add_special_tokens=False)[0]
        else:
            ids = encode_prompts(tokenizer, [rec["prompt"]])[0]
        rows += engine.add(ids, params, tag=i, seed_stream=i * params.n, where=where)
    t0, done = time.time(), 0
    with Progress("generate", total=len(rows), every=max(1, len(rows) // 10), stream=sys.stderr) as bar:
        while engine.has_work():
            finished = sum(r.finished for r in engine.step())
            if finished:
                done += finished
                bar.update(done)
    wall = time.time() - t0
    lines, reasons = [], {}
    for r in rows:
        c, rec = r.completion(), records[r.tag]
        reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
        line = {"index": r.tag, "sample": c.sample_index, **({"id": rec["id"]} if rec["id"] is not None else {}),
                "prompt": rec["prompt"], "completion": c.text, "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))
    tokens = sum(len(r.token_ids) for r in rows)
    return {"prompts": len(records), "completions": len(rows), "skipped_blank_lines": skipped,
            "completion_tokens": tokens, "tokens_per_s": tokens / max(wall, 1e-9), "finish_reasons": reasons,
            "out": str(out)}
