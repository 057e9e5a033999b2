"""The memory tier: chunks kept as tensors, handed out as they are (no decode, no checksum).

It is the process's own memory, so nothing there needs verifying: a hit is a lookup, and
the reader copies the tensors once, into its KV cache. Bytes that come from another
tier (`put_encoded`: a tiered store's promotion from disk or Redis) are verified and
decoded once, when they enter. With CUDA present the tensors live in pinned host memory,
so a copy to the GPU runs at the link's speed. Readers must not modify what they get.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvcake.store import codec
from kvcake.store.base import KVStore, StatsCounter, StoreStats
from kvcake.store.bytestore import check_key
from kvcake.store.codec import ChunkKV, CodecError
from kvcake.store.memory import SizedLru


class TensorStore(KVStore):
    """An LRU of `ChunkKV` by tensor bytes; `dtype` (fp16, bf16, int8, ...) stores what a byte tier would return."""

    def __init__(self, max_bytes: int, *, dtype: str | None = None, page_tokens: int = codec.DEFAULT_PAGE_TOKENS) -> None:
        self._dtype = dtype
        self.page_tokens = page_tokens
        self._pin = torch.cuda.is_available()
        self._entries: SizedLru[ChunkKV] = SizedLru(max_bytes, lambda chunk: chunk.nbytes)
        self._stats = StatsCounter()

    def __repr__(self) -> str:
        return f"TensorStore(max={self._entries.max_bytes / 1e9:g}GB)"

    def stats(self) -> StoreStats:
        snapshot = self._stats.snapshot()
        snapshot.evictions = self._entries.evictions
        return snapshot

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> ChunkKV | None:
        entry = self._lookup(key)
        return None if entry is None else self._hit(ChunkKV(list(entry.keys), list(entry.values)))

    def get_layer(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")
        entry = self._lookup(key)
        if entry is None:
            return None
        if layer >= entry.num_layers:
            return self._out_of_range()
        self._hit(ChunkKV([entry.keys[layer]], [entry.values[layer]]))
        return entry.keys[layer], entry.values[layer]

    def get_tokens(self, key: str, start: int, end: int, layers: Sequence[int] | None = None) -> ChunkKV | None:
        if not 0 <= start < end:
            raise ValueError(f"token range must satisfy 0 <= start < end, got [{start}, {end})")
        if layers is not None and (not layers or min(layers) < 0):
            raise ValueError(f"layers must be a non-empty list of layer numbers >= 0, got {list(layers)}")
        entry = self._lookup(key)
        if entry is None:
            return None
        chosen = range(entry.num_layers) if layers is None else layers
        if end > entry.num_tokens or max(chosen) >= entry.num_layers:
            return self._out_of_range()
        return self._hit(ChunkKV([entry.keys[i][:, start:end] for i in chosen], [entry.values[i][:, start:end] for i in chosen]))

    def get_encoded(self, key: str) -> bytes | None:
        entry = self._lookup(key)
        if entry is None:
            return None
        self._hit(entry)
        return codec.encode(entry, None, self.page_tokens, key)

    def contains(self, key: str) -> bool:
        check_key(key)
        return self._entries.contains(key)

    def stored_prefix(self, keys: Sequence[str]) -> int:
        for key in keys:
            check_key(key)
        return self._entries.leading(keys)

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, chunk: ChunkKV, beside: Sequence[str] | None = None) -> bool:
        """`beside` needs no check: this tier evicts in the exact recency order `touch` sets."""
        check_key(key)
        if self._dtype not in (None, "keep"):
            chunk = codec.decode(codec.encode(chunk, self._dtype, self.page_tokens, key), key=key)
        return self._store(key, chunk)

    def put_encoded(self, key: str, data: bytes, beside: Sequence[str] | None = None) -> bool:
        """Verify and decode bytes from another tier once; foreign or corrupt ones are refused (counted)."""
        check_key(key)
        try:
            chunk = codec.decode(data, key=key)
        except CodecError as exc:
            self._stats.error(exc.kind)
            self._stats.add(puts_failed=1)
            return False
        return self._store(key, chunk)

    def touch(self, keys: Sequence[str]) -> None:
        self._entries.touch(keys)

    def delete(self, key: str) -> None:
        check_key(key)
        self._entries.remove(key)

    def close(self) -> None:
        self._entries.clear()

    # -- internals -----------------------------------------------------------------------
    def _lookup(self, key: str) -> ChunkKV | None:
        check_key(key)
        entry = self._entries.get(key)
        if entry is None:
            self._stats.add(misses=1)
        return entry

    def _hit(self, chunk: ChunkKV) -> ChunkKV:
        self._stats.add(hits=1, bytes_read=chunk.nbytes)
        return chunk

    def _out_of_range(self) -> None:
        self._stats.error("out_of_range")
        self._stats.add(misses=1)
        return None

    def _store(self, key: str, chunk: ChunkKV) -> bool:
        codec.validate(chunk)
        if chunk.nbytes > self._entries.max_bytes:
            self._stats.error("too_large")
            self._stats.add(puts_failed=1)
            return False
        tensors = [self._resident(t) for t in (*chunk.keys, *chunk.values)]
        entry = ChunkKV(tensors[: chunk.num_layers], tensors[chunk.num_layers :])
        self._entries.put(key, entry)
        self._stats.add(puts=1, bytes_written=entry.nbytes)
        return True

    def _resident(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU copy this store owns (pinned when CUDA is present), made by one copy: the caller may reuse its tensor."""
        owned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin)
        return owned.copy_(tensor.detach())
