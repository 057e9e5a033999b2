"""Local-disk tier: one file per entry, atomic replace, LRU by mtime, shared by processes.

* A write goes to a unique temp file in the entry's directory, then ``os.replace``: a
  reader opens either the old or the new file, never a partial one. A reader holds its
  file descriptor, so a concurrent replace or eviction does not change what it reads.
* No fsync: after a crash an entry may be empty or short; the codec's checksums turn
  that into a miss.
* Reads set the file's mtime (ns clock), so eviction (oldest mtime first) is LRU across
  every process using the directory. Eviction is done by one process at a time (flock on
  ``<dir>/.lock``); each process rescans the directory when its own estimate of the usage
  crosses the budget or every few seconds, so the directory may exceed the budget by
  what other processes wrote since their last scan.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from kvcake.store.backend import Backend, BackendError, Buffer, Range, Reader
from kvcake.store.buffers import BufferPool, shared_pool

logger = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_LOW_WATER = 0.9  # eviction frees down to this fraction of the budget
_RESCAN_S = 5.0
_STALE_TMP_NS = 3600 * 10**9  # temp files of crashed writers older than this are removed
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _read_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill `buf` from `offset` (fewer bytes at the end of the file); the number of bytes read."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


class _FileReader(Reader):
    """Reads ranges into one pooled buffer: no fresh allocation, no page faults per read."""

    def __init__(self, fd: int, pool: BufferPool) -> None:
        self._fd = fd
        self._pool = pool

    def read(self, ranges: Sequence[Range]) -> list[Buffer]:
        lease = self._pool.lease(sum(end - start for start, end in ranges))
        parts: list[Buffer] = []
        at = 0
        for start, end in ranges:
            got = _read_into(self._fd, lease[at : at + end - start], start)
            parts.append(lease[at : at + got])
            at += end - start
        return parts


class FileBackend(Backend):
    """Entries at ``<root>/<key[:2]>/<key>.kv``; ``max_bytes=None`` means no budget."""

    def __init__(self, root: Path, max_bytes: int | None, pool: BufferPool | None = None) -> None:
        self.root = root
        self._pool = pool or shared_pool()
        self.name = f"file({root})"
        self._max = max_bytes
        self._lock = threading.Lock()
        self._used = 0
        self._last_scan = 0.0
        self._evicted = 0
        root.mkdir(parents=True, exist_ok=True)
        if max_bytes is not None:
            self._evict()

    @property
    def evictions(self) -> int:
        return self._evicted

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def read_all(self, key: str) -> Buffer | None:
        """The whole file in a pooled buffer (`readinto`, no intermediate bytes object)."""
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            _touch(fd)
            lease = self._pool.lease(os.fstat(fd).st_size)
            return lease[: _read_into(fd, lease, 0)]
        finally:
            os.close(fd)

    @contextmanager
    def open_reader(self, key: str) -> Iterator[Reader | None]:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            _touch(fd)
            yield _FileReader(fd, self._pool)
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes) -> None:
        if self._max is not None and len(data) > self._max:
            raise BackendError("too_large", f"entry of {len(data)} bytes exceeds the budget of {self._max}")
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.parent / f".{key}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                _touch(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        self._account(len(data))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def touch(self, keys: Sequence[str]) -> None:
        """Set mtimes in increasing order, so the last key is the most recently used."""
        now = time.time_ns()
        for offset, key in enumerate(keys):
            with suppress(FileNotFoundError, PermissionError):
                os.utime(self._path(key), ns=(now + offset, now + offset))

    def classify(self, exc: Exception) -> tuple[str, bool] | None:
        if isinstance(exc, OSError):
            return ("disk_full" if exc.errno in _FULL_ERRNOS else "io_error"), False
        return super().classify(exc)

    def _account(self, nbytes: int) -> None:
        if self._max is None:
            return
        with self._lock:
            self._used += nbytes
            due = self._used > self._max or time.monotonic() - self._last_scan > _RESCAN_S
        if due:
            self._evict()

    def _evict(self) -> None:
        """Rescan the directory and delete least recently used entries down to the low-water mark."""
        assert self._max is not None
        with _exclusive(self.root / ".lock") as locked:
            if not locked:
                return  # another process or thread is evicting right now
            entries, total = self._scan()
            if total > self._max:
                entries.sort()
                for _, size, path in entries:
                    if total <= self._max * _LOW_WATER:
                        break
                    with suppress(FileNotFoundError):
                        os.unlink(path)
                        self._evicted += 1
                    total -= size
            with self._lock:
                self._used = total
                self._last_scan = time.monotonic()

    def _scan(self) -> tuple[list[tuple[int, int, str]], int]:
        entries: list[tuple[int, int, str]] = []
        now = time.time_ns()
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(_SUFFIX):
                    entries.append((st.st_mtime_ns, st.st_size, entry.path))
                elif entry.name.endswith(_TMP_SUFFIX) and now - st.st_mtime_ns > _STALE_TMP_NS:
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)
        return entries, sum(size for _, size, _ in entries)


def _touch(fd: int) -> None:
    """Mark an entry as just used (ns clock: the kernel's own timestamps are too coarse for LRU)."""
    now = time.time_ns()
    try:
        os.utime(fd, ns=(now, now))
    except PermissionError:
        logger.debug("cannot update the mtime of a file owned by another user; LRU order degrades")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Non-blocking exclusive flock; yields whether it was acquired."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
