"""The KV cache the engine decodes into: full-attention layers become preallocated buffers."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
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


def new_cache(model: Any, reserve: int) -> DynamicCache:
    """A `DynamicCache` for `model`; plain full-attention layers become buffered layers.

    Other layer kinds (sliding-window, recurrent, ...) are kept as transformers builds them;
    the engine then runs static batches instead of letting new requests join mid-generation.
    """
    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [BufferedLayer() for _ in cache.layers]
        for layer in cache.layers:
            layer.reserve = reserve
    return cache


def is_buffered(cache: DynamicCache) -> bool:
    return bool(cache.layers) and all(isinstance(layer, BufferedLayer) for layer in cache.layers)
