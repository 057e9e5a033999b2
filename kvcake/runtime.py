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


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks (up to 32 MiB each) in the process instead of unmapping them.

    KV chunks and activations are allocated and freed by the megabyte on every request.
    When freed memory goes back to the OS, the next allocation pays page faults again;
    on VMs with free page reporting (virtio-balloon) that costs up to seconds per request
    (measured here: 4 chunk placements took 0.9-3.4 s instead of 15 ms). The same advice
    is usually given as "use jemalloc/tcmalloc" for CPU inference.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable; freed memory goes back to the OS")
