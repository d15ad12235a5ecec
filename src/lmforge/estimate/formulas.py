"""The arithmetic of an estimate: parameters, memory, FLOPs and KV cache, as pure functions.

Conventions (every figure in bytes, 1 GB = 1e9 bytes):

    weights      parameters x bytes of their storage dtype. lmforge's stages hold fp32 master
                 weights (4 B) and train under bf16 autocast on a GPU; QLoRA stores the frozen
                 linear layers in 4-bit NF4 (0.5 B + its quantisation constants).
    gradients    trainable parameters x bytes of the gradient (= the parameter's dtype).
    optimizer    AdamW: two fp32 moments per trainable parameter, 8 B (no extra master copy).
    activations  what the forward saves for the backward, per token (see `layer_activation_bytes`).

So a 7B Llama whose weights are held in bf16 (the usual way the figure is quoted) needs 14 GB of
weights, 14 GB of gradients and 56 GB of AdamW states; in lmforge's fp32-master layout the first
two are 28 GB each (tested in tests/test_estimate.py).

FLOPs: 6 per matmul parameter per token for a training step (2 forward, 4 backward; a frozen
weight skips its weight gradient: 4), plus attention's score and value products, 12 x layers x
d_model x context per token (PaLM's count; a causal kernel may skip half of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BF16, FP32 = 2, 4
ADAMW_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
NF4_BYTES = 0.5 + 4 / 64  # 4 bits + one fp32 absmax per block of 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # absmax in 8 bits + one fp32 per 256 blocks


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Shape:
    """What an estimate needs to know about a causal LM (read from its transformers config)."""

    model_type: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    gated_mlp: bool
    tied: bool
    context: int
    params: int  # every parameter, counted exactly on the meta device
    linears: tuple[Linear, ...] = field(default=(), repr=False)  # every matmul layer, lm_head included

    @property
    def matmul_params(self) -> int:
        return sum(x.in_features * x.out_features for x in self.linears)

    @property
    def head_params(self) -> int:
        return sum(x.in_features * x.out_features for x in self.linears if x.name.endswith("lm_head"))


def lora_params(shape: Shape, targets: list[str] | str, r: int, *, dora: bool = False) -> int:
    """Trainable parameters of a LoRA (or DoRA) adapter: r x (in + out) per adapted layer (+ out for
    DoRA's magnitude vector). `targets` are peft's: names matched against the end of module names,
    or "all-linear" (every linear layer but the output head)."""
    total = 0
    for lin in _adapted(shape, targets):
        total += r * (lin.in_features + lin.out_features) + (lin.out_features if dora else 0)
    return total


def _adapted(shape: Shape, targets: list[str] | str) -> list[Linear]:
    if targets == "all-linear":
        return [x for x in shape.linears if not x.name.endswith("lm_head")]
    return [x for x in shape.linears if any(x.name == t or x.name.endswith("." + t) for t in targets)]


def lora_activation_elements(shape: Shape, targets: list[str] | str, r: int) -> int:
    """Elements per token a LoRA adapter adds to the saved activations: each adapted layer keeps its
    own dropout of the input (in_features) and the rank-r projection (r), for the backward."""
    return sum(x.in_features + r for x in _adapted(shape, targets))


def prefix_params(shape: Shape, num_virtual_tokens: int) -> int:
    """peft prefix tuning without projection: a key and a value vector per layer per virtual token."""
    return num_virtual_tokens * shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim


def state_bytes(params: int, trainable: int, *, weight_bytes: float, grad_bytes: float,
                optim_bytes: float = ADAMW_STATE_BYTES) -> dict[str, float]:
    """Weights, gradients and optimizer states: the part of training memory that does not scale with the batch."""
    return {"weights": params * weight_bytes, "gradients": trainable * grad_bytes, "optimizer": trainable * optim_bytes}


def layer_activation_bytes(shape: Shape, act_bytes: float) -> float:
    """Bytes one transformer block saves for its backward, per token.

    Attention: the two RMSNorm tensors (input, normalised), q, k, v, the rotated q and k and the
    attention output (flash/efficient SDPA keeps no T x T matrix): 5 d + 3 d_kv. MLP: the norm
    (2 d), the input, and for a gated MLP gate, up, act(gate) and their product (4 f); a plain
    MLP saves its hidden layer before and after the activation (2 f)."""
    d, kv = shape.d_model, shape.n_kv_heads * shape.head_dim
    attn = 5 * d + 3 * kv + 2 * d
    mlp = 3 * d + (4 if shape.gated_mlp else 2) * shape.d_ff
    return (attn + mlp) * act_bytes


def head_activation_bytes(shape: Shape, act_bytes: float) -> float:
    """Per token that reaches the output head: the logits in the compute dtype, their fp32 copy for
    the loss, the log-softmax the cross-entropy keeps, and the logits' gradient (fp32)."""
    return shape.vocab * (act_bytes + 3 * FP32)


def activation_bytes(shape: Shape, tokens: int, head_tokens: int, act_bytes: float, *, checkpointing: bool,
                     frozen_base: bool = False) -> float:
    """Activations of one micro-batch: `tokens` through the blocks, `head_tokens` through the output head.

    With gradient checkpointing only each block's input is kept (d per token) and one block's
    activations are rebuilt at a time in the backward. A frozen base (LoRA) keeps the same tensors:
    the input gradients still need them."""
    del frozen_base  # same tensors: kept as a parameter so callers state it
    per_layer = layer_activation_bytes(shape, act_bytes)
    if checkpointing:
        blocks = tokens * (shape.n_layers * shape.d_model * act_bytes + per_layer)
    else:
        blocks = tokens * shape.n_layers * per_layer
    embed = tokens * shape.d_model * act_bytes * 2  # embedding output + final norm input
    return blocks + embed + head_tokens * head_activation_bytes(shape, act_bytes)


def kv_bytes_per_token(shape: Shape, dtype_bytes: float) -> float:
    """Key + value cache per token of context: 2 x layers x kv_heads x head_dim x dtype bytes."""
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * dtype_bytes


def train_flops_per_token(shape: Shape, seq_len: int, *, trainable_matmul: int | None = None,
                          checkpointing: bool = False) -> float:
    """Forward + backward FLOPs per token. `trainable_matmul`: matmul parameters that get a weight
    gradient (None = all of them; a LoRA run: the adapter's). Checkpointing adds one more forward."""
    n = shape.matmul_params
    t = n if trainable_matmul is None else trainable_matmul
    attn_fwd = 4 * shape.n_layers * shape.d_model * seq_len
    # forward 2N, input gradients 2N, weight gradients 2 x trainable; attention: 1x forward, 2x backward
    flops = 2 * n + 2 * n + 2 * t + 3 * attn_fwd
    if t != n:  # LoRA's own matmuls: forward and both gradients of r x (in + out) per token
        flops += 4 * t
    if checkpointing:
        flops += 2 * n + attn_fwd
    return float(flops)


def forward_flops_per_token(shape: Shape, seq_len: int) -> float:
    return float(2 * shape.matmul_params + 4 * shape.n_layers * shape.d_model * seq_len)
