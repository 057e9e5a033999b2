"""The working KV cache of one request: rotated K and V per layer, with each token's position."""

from __future__ import annotations

import threading

import numpy as np
import torch


class KVCache:
    """Preallocated per-layer buffers; tokens are appended in slots.

    A slot is reserved for a group of new tokens, every layer writes its K/V into it,
    and `commit` makes it part of the cache. Attention reads the cache up to the end
    of the current slot, so a token sees its own slot's keys (masked by position).
    """

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, device: torch.device, dtype: torch.dtype,
        pool: CachePool | None = None,
    ):
        shape = (num_kv_heads, capacity, head_dim)
        reused = pool.take(num_layers, shape, device, dtype) if pool is not None else None
        if reused is None:
            reused = ([torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)],
                      [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)])
        self.keys, self.values = reused
        self.positions = torch.empty(capacity, device=device, dtype=torch.long)
        self.capacity = capacity
        self.length = 0
        self.truncations = 0
        """How often tokens were forgotten (`truncate`): a copy of the K/V made before then may be stale."""
        self._pool = pool

    def release(self) -> None:
        """Hand the buffers to the pool for the next request; the cache must not be used afterwards."""
        if self._pool is not None and self.keys:
            self._pool.give_back(self.keys, self.values)
        self.keys, self.values = [], []
        self.capacity = self.length = 0

    def reserve(self, positions: torch.Tensor) -> slice:
        end = self.length + positions.numel()
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens exceed its capacity of {self.capacity}")
        self.positions[self.length : end] = positions
        return slice(self.length, end)

    def write(self, layer: int, slot: slice, rotated_keys: torch.Tensor, values: torch.Tensor) -> None:
        """A forward's own K/V (the copy runs between the layer's products, on torch's warm threads)."""
        self.keys[layer][:, slot] = rotated_keys
        self.values[layer][:, slot] = values

    def place(self, layer: int, slot: slice, rotated_keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stored K/V loaded into the cache: many copies in a row, each as one `copy_into`."""
        copy_into(self.keys[layer][:, slot], rotated_keys)
        copy_into(self.values[layer][:, slot], values)

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def commit(self, slot: slice) -> None:
        self.length = slot.stop

    def fork(self) -> KVCache:
        """An independent cache holding the same tokens (e.g. for another choice decoded from one prefill)."""
        forked = KVCache(len(self.keys), self.keys[0].shape[0], self.keys[0].shape[2], self.capacity, self.positions.device,
                         self.keys[0].dtype, self._pool)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            copy_into(forked.keys[layer][:, : self.length], keys[:, : self.length])
            copy_into(forked.values[layer][:, : self.length], values[:, : self.length])
        forked.positions[: self.length] = self.positions[: self.length]
        forked.length = self.length
        return forked

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (e.g. to reuse a shared preamble for another segment)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        self.truncations += 1


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """`target[...] = source`; on CPU a single-threaded numpy copy of the same dtype.

    torch parallelises a copy of a few hundred KB over its intra-op threads, and waking
    them cost more than the copy itself: placing a 24-chunk prefix (1440 copies, 283 MB)
    took ~100 ms through torch after a prefill had started the thread pool, 19 ms in numpy.
    """
    if target.device.type != "cpu" or source.device.type != "cpu" or target.dtype != source.dtype:
        target.copy_(source)
        return
    if target.dtype == torch.bfloat16:
        target, source = target.view(torch.int16), source.view(torch.int16)
    np.copyto(target.numpy(), source.numpy())


class CachePool:
    """Buffers of released caches, by shape, for the next request's cache.

    A fresh buffer costs page faults on first touch, and here those ran at ~3 GB/s: for a
    24-chunk load from memory they took longer than copying the KV itself. A serving
    system keeps its KV memory mapped (vLLM preallocates it); this pool does the same for
    whatever sizes requests use, keeping at most `max_free_bytes` idle.
    """

    CAPACITY_STEP = 256
    """Capacities are rounded up to a multiple of this, so requests of similar lengths share buffers."""

    def __init__(self, max_free_bytes: int) -> None:
        self.max_free_bytes = max_free_bytes
        self._free: dict[tuple, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def rounded(cls, capacity: int) -> int:
        return -(-capacity // cls.CAPACITY_STEP) * cls.CAPACITY_STEP

    def take(self, num_layers: int, shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        with self._lock:
            free = self._free.get((num_layers, shape, str(device), dtype))
            if not free:
                return None
            buffers = free.pop()
            self._free_bytes -= _nbytes(buffers)
            return buffers

    def give_back(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        nbytes = _nbytes((keys, values))
        if nbytes > self.max_free_bytes:
            return
        sample = keys[0]
        shape_key = (len(keys), tuple(sample.shape), str(sample.device), sample.dtype)
        with self._lock:
            while self._free_bytes + nbytes > self.max_free_bytes:
                self._drop_one()
            self._free.setdefault(shape_key, []).append((keys, values))
            self._free_bytes += nbytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._free_bytes

    def _drop_one(self) -> None:
        """Forget the largest idle buffers first (a long request's cache is the least likely to fit the next one)."""
        shape_key = max(self._free, key=lambda k: _nbytes(self._free[k][0]))
        self._free_bytes -= _nbytes(self._free[shape_key].pop())
        if not self._free[shape_key]:
            del self._free[shape_key]


def _nbytes(buffers: tuple[list[torch.Tensor], list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in (*buffers[0], *buffers[1]))
