"""The working KV cache of one request: rotated K and V per layer, with each token's position."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer buffers; tokens are appended in slots.

    A slot is reserved for a group of new tokens, every layer writes its K/V into it,
    and `commit` makes it part of the cache. Attention reads the cache up to the end
    of the current slot, so a token sees its own slot's keys (masked by position).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (num_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.positions = torch.empty(capacity, device=device, dtype=torch.long)
        self.capacity = capacity
        self.length = 0

    def reserve(self, positions: torch.Tensor) -> slice:
        end = self.length + positions.numel()
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens exceed its capacity of {self.capacity}")
        self.positions[self.length : end] = positions
        return slice(self.length, end)

    def write(self, layer: int, slot: slice, rotated_keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer][:, slot] = rotated_keys
        self.values[layer][:, slot] = values

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def commit(self, slot: slice) -> None:
        self.length = slot.stop

    def fork(self) -> KVCache:
        """An independent cache holding the same tokens (e.g. for another choice decoded from one prefill)."""
        forked = KVCache(len(self.keys), self.keys[0].shape[0], self.keys[0].shape[2], self.capacity, self.positions.device, self.keys[0].dtype)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            forked.keys[layer][:, : self.length] = keys[:, : self.length]
            forked.values[layer][:, : self.length] = values[:, : self.length]
        forked.positions[: self.length] = self.positions[: self.length]
        forked.length = self.length
        return forked

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (e.g. to reuse a shared preamble for another segment)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
