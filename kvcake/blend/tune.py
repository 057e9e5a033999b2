"""CacheTune's online side: the token order stored with a document, and the recompute ratio chosen from measured costs.

A scored document entry holds its tokens sorted by offline score (highest first), so
recomputing a fraction r means recomputing its first ceil(r n) rows and loading the
rest, one contiguous byte range per layer. The order itself is stored next to it as a
one-layer entry whose K holds each row's original token index in base-128 digits (exact
in every storage dtype: fp16 and bf16 hold integers up to 256, int8's per-channel scale
is then 1) and whose V holds the score.

The ratio: per layer the compute side needs r N C_comp and the loader (1 - r) N C_io,
so r* = C_io / (C_io + C_comp) balances them; below `floor` quality drops, so
r = max(floor, r*). The costs per token come from this engine's own requests.
"""

from __future__ import annotations

import threading

import torch

from kvcake.store import ChunkKV

ORDER_DIGITS = 3
ORDER_BASE = 128
MAX_DOCUMENT_TOKENS = ORDER_BASE**ORDER_DIGITS


def order_entry(order: torch.Tensor, scores: torch.Tensor) -> ChunkKV:
    """The stored form of a token order (original index per stored row) and its scores."""
    if len(order) > MAX_DOCUMENT_TOKENS:
        raise ValueError(f"a scored document holds at most {MAX_DOCUMENT_TOKENS} tokens, got {len(order)}")
    digits = torch.stack([(order // ORDER_BASE**i) % ORDER_BASE for i in range(ORDER_DIGITS)], dim=1).float()
    return ChunkKV([digits[None]], [scores.float().view(1, -1, 1).expand(1, -1, ORDER_DIGITS).contiguous()])


def order_from_entry(entry: ChunkKV) -> torch.Tensor:
    digits = entry.keys[0][0].float().round().long()
    return sum(digits[:, i] * ORDER_BASE**i for i in range(ORDER_DIGITS))


class TuneProfile:
    """Seconds per computed token and per loaded token, smoothed over this engine's tune requests."""

    def __init__(self, smoothing: float = 0.5):
        self.smoothing = smoothing
        self.compute_s_per_token: float | None = None
        self.io_s_per_token: float | None = None
        self._lock = threading.Lock()

    def record(self, compute_s: float, computed_tokens: int, io_s: float, loaded_tokens: int) -> None:
        with self._lock:
            if computed_tokens:
                self.compute_s_per_token = self._smooth(self.compute_s_per_token, compute_s / computed_tokens)
            if loaded_tokens:
                self.io_s_per_token = self._smooth(self.io_s_per_token, io_s / loaded_tokens)

    def ratio(self, floor: float) -> float:
        """max(floor, C_io / (C_io + C_comp)); the floor until both costs have been seen."""
        with self._lock:
            if not self.compute_s_per_token or self.io_s_per_token is None:
                return floor
            balanced = self.io_s_per_token / (self.io_s_per_token + self.compute_s_per_token)
            return min(1.0, max(floor, balanced))

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)
