"""Fully sharded data parallel training (PyTorch FSDP2) for the shared loop.

`train.fsdp: true` under `accelerate launch` / `torchrun` with N processes: each process holds
1/N of every parameter, gradient and optimizer state instead of a full copy (DDP), so a model
about N times larger fits, at the cost of all-gathering each decoder layer's weights in every
forward and backward. The update is the same as DDP's (gradients are averaged over processes).

Sharding is applied here with torch's `fully_shard`, not through accelerate's FSDP plugin:
accelerate 1.x turns an FSDP request into DDP on CPU, so its path could only run on GPUs, while
this one runs on CPU (gloo, where the tests run it) and GPU (NCCL) alike.

Weights and optimizer state leave a sharded model only through `full_model_state` /
`full_optimizer_state` (collectives: every process calls them; process 0 receives full tensors
on CPU), so checkpoints and saved models have the same format as with DDP or one process. They
come back through process 0 too (`load_*` with `broadcast_from_rank0`): one CPU copy of the
full state per machine, not one per process.

With bf16, FSDP computes with bf16 copies of the weights (fp32 masters, fp32 gradient
reduction), where DDP autocasts op by op: the two agree to bf16 precision, not to fp32's.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the outermost modules of the classes transformers
    lists in `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...). Each becomes one all-gather."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found: list[torch.nn.Module] = []
    inside: set[int] = set()  # modules within a block already found (modules() is parent first)
    for m in model.modules():
        if type(m).__name__ in names and id(m) not in inside:
            found.append(m)
            inside.update(id(c) for c in m.modules())
    return found


def shard(model, acc) -> None:
    """Shard `model` in place over all processes: every decoder block, then the rest (embeddings,
    final norm, output layer) as one group. bf16 mixed precision keeps fp32 master weights and
    reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if acc.mixed_precision == "fp16":
        raise LmforgeError("train.fsdp does not support train.precision fp16 (it needs a gradient scaler); use bf16 or fp32.")
    blocks = _blocks(model)
    if not blocks:
        raise LmforgeError(
            f"train.fsdp: {type(model).__name__} names no decoder block class (`_no_split_modules`) to shard; "
            "use DDP (train.fsdp: false)."
        )
    # No model.to(device) first: fully_shard moves each group to the mesh device as it shards
    # it, so no process ever holds the whole model on the GPU.
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    mp = MixedPrecisionPolicy()
    if acc.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in blocks:
        fully_shard(b, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _resharded(model) -> None:
    # After an evaluation forward (no backward) the root group stays unsharded (FSDP does not
    # reshard the root after forward), and the state-dict helpers then see plain tensors where
    # they expect shards. Resharding first makes every call start from the same layout.
    model.reshard()


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as full CPU tensors on process 0 ({} elsewhere). Collective.
    A tied weight appears once (as named_parameters lists it), as in the model's own save."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _resharded(model)
    full = get_model_state_dict(model, options=_options(cpu_offload=True))
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    return {k: v for k, v in full.items() if k not in aliases}


def weights_to_save(model) -> dict[str, torch.Tensor] | None:
    """What a stage passes to `save_model(state_dict=...)`: a sharded model's gathered weights
    (a collective: every process calls it, process 0 gets them), None for a plain model."""
    return full_model_state(model) if is_sharded(model) else None


def load_model_state(model, weights: dict[str, torch.Tensor]) -> None:
    """Scatter full tensors that process 0 passes (the others pass {}) into the shards. Collective.
    Not strict: a checkpoint holds the trainable parameters only (the caller checks the names)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    _resharded(model)
    set_model_state_dict(model, weights, options=_options(strict=False, broadcast_from_rank0=True))


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name, full tensors on process 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _resharded(model)
    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Scatter the optimizer state process 0 passes (the others pass {}). Collective. Not strict:
    a parameter that never had a gradient has no state, as in DDP's optimizer.load_state_dict."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    _resharded(model)
    set_optimizer_state_dict(model, optimizer, state, options=_options(strict=False, broadcast_from_rank0=True))


def grad_norm_value(norm) -> float:
    """clip_grad_norm_ of sharded gradients returns a DTensor; its full value is the global norm."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
