"""Process-wide settings the engine needs to run at speed."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 1 << 40


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name is not None else None


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks (up to 32 MiB each) in the process instead of unmapping them.

    KV chunks and activations are allocated and freed by the megabyte on every request.
    When freed memory goes back to the OS, the next allocation pays page faults again;
    on VMs with free page reporting (virtio-balloon) that costs up to seconds per request
    (measured here: 4 chunk placements took 0.9-3.4 s instead of 15 ms). The same advice
    is usually given as "use jemalloc/tcmalloc" for CPU inference.
    """
    try:
        libc = _glibc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; freed memory goes back to the OS")


def release_freed_memory() -> None:
    """Hand the freed memory `keep_freed_memory` kept back to the OS (glibc's `malloc_trim`).

    For a process that is done with one large working set before it starts another (a
    benchmark between its cells): blocks freed by threads that have ended sit in their
    arenas, where the next threads' allocations may never reuse them.
    """
    try:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("malloc_trim unavailable")
