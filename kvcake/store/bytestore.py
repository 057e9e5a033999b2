"""``KVStore`` over any byte backend: codec, partial reads, failure handling, stats."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from kvcake.store import codec
from kvcake.store.backend import Backend, Buffer, Range, Reader
from kvcake.store.base import KVStore, StatsCounter, StoreStats
from kvcake.store.buffers import BufferPool, private_copy, shared_pool
from kvcake.store.codec import ChunkKV, CodecError, Header
from kvcake.store.memory import SizedLru

logger = logging.getLogger(__name__)

T = TypeVar("T")
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
_HEADER_CACHE_ENTRIES = 4096


class _BadRequest(Exception):
    """A read that does not fit the stored entry (e.g. layer beyond its layer count)."""


class ByteStore(KVStore):
    """Encodes chunks, reads whole entries or byte ranges, and never lets a failure escape.

    * corrupt/truncated entry -> miss, entry deleted, ``errors[checksum|truncated|bad_header]``;
    * an entry written under another key (bytes copied or renamed) -> miss, entry deleted,
      ``errors[foreign_key]``; one of another format version -> miss, kept (another release
      may share the store), ``errors[other_version]``;
    * backend down or timing out -> miss, one warning per outage of a route, and for
      ``backend.retry_s`` seconds that route is skipped (a miss without a network wait);
    * write refused (disk full, entry too large, Redis OOM) -> ``put`` returns False.

    Headers of recently read entries are cached so a layer-by-layer load makes one
    backend round trip per layer; a checksum failure under a cached header re-reads the
    header once before the entry is declared corrupt. Decoded tensors view the bytes
    read: a backend's private buffers directly, immutable bytes (Redis, memory) after
    one copy into a buffer of `pool`.
    """

    def __init__(self, backend: Backend, *, dtype: str | None = None,
                 page_tokens: int = codec.DEFAULT_PAGE_TOKENS, pool: BufferPool | None = None) -> None:
        self.backend = backend
        self._pool = pool or shared_pool()
        self._dtype = dtype
        self.page_tokens = page_tokens
        self._stats = StatsCounter()
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._warned: set[str] = set()
        self._headers: SizedLru[Header] = SizedLru(_HEADER_CACHE_ENTRIES, lambda _: 1)

    def __repr__(self) -> str:
        return f"ByteStore({self.backend.name})"

    # -- reads ---------------------------------------------------------------------------
    def get(self, key: str) -> ChunkKV | None:
        check_key(key)
        return self._count(self._guarded(key, lambda: self._read_whole(key, lambda data: codec.decode(self._private(data), key=key)), None))

    def get_encoded(self, key: str) -> bytes | None:
        check_key(key)
        return self._count(self._guarded(key, lambda: self._read_whole(key, lambda data: _verified(data, key)), None))

    def get_layer(self, key: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        check_key(key)
        if layer < 0:
            raise ValueError(f"layer must be >= 0, got {layer}")

        def ranges(h: Header) -> list[Range]:
            if layer >= h.num_layers:
                raise _BadRequest(f"layer {layer} of an entry with {h.num_layers} layers")
            return [codec.layer_range(h, layer)]

        def decode(h: Header, parts: list[Buffer]) -> tuple[torch.Tensor, torch.Tensor]:
            return codec.decode_layer(h, layer, self._private(parts[0]))

        return self._count(self._guarded(key, lambda: self._read_partial(key, ranges, decode), None))

    def get_tokens(self, key: str, start: int, end: int, layers: Sequence[int] | None = None) -> ChunkKV | None:
        check_key(key)
        if not 0 <= start < end:
            raise ValueError(f"token range must satisfy 0 <= start < end, got [{start}, {end})")
        if layers is not None and (not layers or min(layers) < 0):
            raise ValueError(f"layers must be a non-empty list of layer numbers >= 0, got {list(layers)}")

        def ranges(h: Header) -> list[Range]:
            if end > h.num_tokens:
                raise _BadRequest(f"tokens [{start}, {end}) of an entry with {h.num_tokens} tokens")
            if layers is not None and max(layers) >= h.num_layers:
                raise _BadRequest(f"layers {list(layers)} of an entry with {h.num_layers} layers")
            return codec.token_ranges(h, start, end, layers)

        def decode(h: Header, parts: list[Buffer]) -> ChunkKV:
            return codec.decode_tokens(h, start, end, [self._private(part) for part in parts], layers)

        return self._count(self._guarded(key, lambda: self._read_partial(key, ranges, decode), None))

    def contains(self, key: str) -> bool:
        check_key(key)
        return self._guarded(key, lambda: self.backend.exists(key), False)

    def stored_prefix(self, keys: Sequence[str]) -> int:
        """One `exists_many` call (one Redis pipeline); a backend that is down stores nothing (counted)."""
        if not keys:
            return 0
        for key in keys:
            check_key(key)
        try:
            present = self.backend.exists_many(keys)
        except Exception as exc:
            classified = self.backend.classify(exc)
            if classified is None:
                raise
            self._stats.error(classified[0])  # counted, but no route marked down: a cluster's keys span nodes
            return 0
        return next((index for index, found in enumerate(present) if not found), len(keys))

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, chunk: ChunkKV, beside: Sequence[str] | None = None) -> bool:
        check_key(key)
        return self.put_encoded(key, codec.encode(chunk, self._dtype, self.page_tokens, key), beside)

    def put_encoded(self, key: str, data: bytes, beside: Sequence[str] | None = None) -> bool:
        """Store an encoded entry; one bound to another key is refused (``errors[foreign_key]``), and one that
        does not fit in the backend's budget beside the entries `beside` is skipped (``errors[over_budget]``)."""
        check_key(key)
        self._forget_header(key)
        try:
            codec.parse_header(data, key)
        except CodecError as exc:
            self._stats.error(exc.kind)
            self._stats.add(puts_failed=1)
            self._note(exc.kind, f"{self.backend.name}: refused to store {key}: {exc}")
            return False

        def write() -> bool:
            if beside is not None and not self.backend.fits(beside, len(data)):
                self._stats.error("over_budget")
                return False
            self.backend.write(key, data)
            return True

        ok = self._guarded(key, write, False)
        if ok:
            self._stats.add(puts=1, bytes_written=len(data))
        else:
            self._stats.add(puts_failed=1)
        return ok

    def touch(self, keys: Sequence[str]) -> None:
        """Best effort: a failure is counted, never marks a route as down (a cluster's keys span nodes)."""
        for key in keys:
            check_key(key)
        try:
            self.backend.touch(keys)
        except Exception as exc:
            classified = self.backend.classify(exc)
            if classified is None:
                raise
            self._stats.error(classified[0])

    def delete(self, key: str) -> None:
        check_key(key)
        self._forget_header(key)
        self._guarded(key, lambda: self.backend.remove(key), None)

    def map_read_buffers(self, chunk_shape: tuple[int, int, int, int], dtype: torch.dtype, count: int) -> int:
        num_layers, n_heads, num_tokens, head_dim = chunk_shape
        nbytes = codec.entry_bytes(num_layers, n_heads, num_tokens, head_dim, dtype, self._dtype, self.page_tokens)
        return self._pool.reserve(nbytes, count)

    def stats(self) -> StoreStats:
        snap = self._stats.snapshot()
        snap.evictions = self.backend.evictions
        return snap

    def close(self) -> None:
        self.backend.close()

    # -- internals -----------------------------------------------------------------------
    def _private(self, data: Buffer) -> memoryview:
        """Bytes the decoded tensors may view: the backend's own buffer, or one pooled copy of immutable bytes."""
        view = memoryview(data)
        return private_copy(view, self._pool) if view.readonly else view

    def _read_whole(self, key: str, decode: Callable[[Buffer], T]) -> tuple[T, int] | None:
        data = self.backend.read_all(key)
        if data is None:
            return None
        return decode(data), len(data)

    def _read_partial(
        self, key: str, ranges: Callable[[Header], list[Range]], decode: Callable[[Header, list[Buffer]], T]
    ) -> tuple[T, int] | None:
        with self.backend.open_reader(key) as reader:
            if reader is None:
                return None
            header = self._cached_header(key)
            nbytes = 0
            retry = header is not None
            while True:
                if header is None:
                    header, header_bytes = _read_header(reader, key)
                    nbytes += header_bytes
                    if header is None:
                        return None
                parts = reader.read(ranges(header))
                nbytes += sum(len(p) for p in parts)
                try:
                    value = decode(header, parts)
                except CodecError:
                    if not retry:
                        raise
                    # the entry may have been rewritten since its header was cached
                    self._forget_header(key)
                    header, retry = None, False
                    continue
                self._remember_header(key, header)
                return value, nbytes

    def _count(self, got: tuple[T, int] | None) -> T | None:
        if got is None:
            self._stats.add(misses=1)
            return None
        value, nbytes = got
        self._stats.add(hits=1, bytes_read=nbytes)
        return value

    def _guarded(self, key: str, op: Callable[[], T], default: T) -> T:
        """Run a backend operation; a backend or codec failure becomes ``default`` and a counted error.

        Other exceptions (programming errors) propagate: a silent miss would hide them.
        """
        route = self.backend.name
        try:
            route = self.backend.route(key)
            if self._skipping(route):
                self._stats.error("unavailable")
                return default
            result = op()
        except CodecError as exc:
            if exc.kind == "other_version":
                self._stats.error(exc.kind)  # another release's entry: not ours to delete
                self._note(exc.kind, f"{self.backend.name}: {key}: {exc}")
                return default
            self._drop_corrupt(key, exc)
            return default
        except _BadRequest as exc:
            self._stats.error("out_of_range")
            self._note("out_of_range", f"{self.backend.name}: {exc}")
            return default
        except Exception as exc:
            if self.backend.classify(exc) is None:
                raise  # not a backend failure but a bug: let it surface
            self._failed(route, exc)
            return default
        self._recovered(route)
        return result

    def _skipping(self, route: str) -> bool:
        with self._lock:
            until = self._down_until.get(route)
        return until is not None and time.monotonic() < until

    def _failed(self, route: str, exc: Exception) -> None:
        kind, outage = self.backend.classify(exc) or ("internal", False)
        self._stats.error(kind)
        if not outage:
            self._note(kind, f"{self.backend.name}: {kind}: {exc!r}", exc_info=kind == "internal")
            return
        with self._lock:
            new = route not in self._down_until
            self._down_until[route] = time.monotonic() + self.backend.retry_s
        if new:
            logger.warning("%s: %s unavailable (%s: %s); reads miss and writes are skipped until it is back",
                           self.backend.name, route, kind, exc)

    def _recovered(self, route: str) -> None:
        if not self._down_until:
            return
        with self._lock:
            was_down = self._down_until.pop(route, None) is not None
        if was_down:
            logger.warning("%s: %s is back", self.backend.name, route)

    def _note(self, kind: str, message: str, exc_info: bool = False) -> None:
        """Count-only errors: warn on the first of each kind, debug afterwards."""
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s (further ones logged at debug level)", message, exc_info=exc_info)
        else:
            logger.debug(message)

    def _drop_corrupt(self, key: str, exc: CodecError) -> None:
        self._stats.error(exc.kind)
        logger.warning("%s: dropping entry %s: %s", self.backend.name, key, exc)
        self._forget_header(key)
        self._guarded(key, lambda: self.backend.remove(key), None)

    def _cached_header(self, key: str) -> Header | None:
        return self._headers.get(key)

    def _remember_header(self, key: str, header: Header) -> None:
        self._headers.put(key, header)

    def _forget_header(self, key: str) -> None:
        self._headers.remove(key)


def _read_header(reader: Reader, key: str) -> tuple[Header | None, int]:
    """Header of the entry behind a reader for `key` (None if the entry is absent) and bytes read."""
    probe = reader.read([(0, codec.HEADER_PROBE_BYTES)])[0]
    if len(probe) == 0:
        if reader.entry_known:
            raise CodecError("truncated", "empty entry")
        return None, 0
    length = codec.header_length(probe)
    if length > len(probe) == codec.HEADER_PROBE_BYTES:
        probe = bytes(probe) + bytes(reader.read([(len(probe), length)])[0])
    return codec.parse_header(probe, key), len(probe)


def _verified(data: Buffer, key: str) -> bytes:
    codec.verify(data, key)
    return bytes(data)


def check_key(key: str) -> None:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid store key {key!r}: use letters, digits, '-' and '_'")
