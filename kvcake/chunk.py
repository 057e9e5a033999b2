"""The one type for the K/V of some tokens, shared by every layer of the code.

A forward pass returns it, the store encodes and decodes it, loaders and prefetchers
hand it over, the write-back queue stores it. It depends on torch only, so the model
(below the store) and the store (which knows no model) can both use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """Per layer a K and a V tensor shaped (n_kv_heads, T, head_dim).

    Whether K is rotated depends on what the tokens are: a prefix chunk's K is stored
    after RoPE (it only ever sits at its own positions), a document's before it.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_tokens(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def to_cpu(self) -> ChunkKV:
        return ChunkKV([k.cpu() for k in self.keys], [v.cpu() for v in self.values])
