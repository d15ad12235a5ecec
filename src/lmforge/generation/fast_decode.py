"""One decode step of a Llama/Mistral/Qwen2 model through its own modules, minus transformers'
per-call framework overhead (equal logits, tested)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

# The model families whose decoder layer is exactly: x + attn(norm(x)), then x + mlp(norm(x)),
# with rotary position embeddings (see each one's modeling file in transformers).
_FAST_DECODE_MODELS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


class FastDecode:
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
    def for_model(cls, model: Any) -> "FastDecode | None":
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
