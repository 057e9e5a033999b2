"""Process-wide settings the engine needs to run at speed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 1 << 40
TOP_PAD = 64 << 20


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

    The heap also grows 64 MiB at a time (`M_TOP_PAD`, default 128 KiB): a fresh process's
    first 2k-token bf16 prefill took 3.1-3.3 s growing it in small steps, 2.4 s this way (the
    later ones 2.2-2.4 s either way).
    """
    try:
        libc = _glibc()
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            libc.mallopt(M_TOP_PAD, TOP_PAD)
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


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (GNU's libgomp or Intel's libiomp5), found among the process's mappings."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if re.search(r"/lib(gomp|iomp5)[^/]*\.so", line)}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def confine_torch_to_this_thread() -> None:
    """Let torch ops called from this (helper) thread run on it alone, never on an OpenMP team of its own.

    Each thread that runs a parallel torch op gets its own OpenMP team, and once a process has
    more OpenMP threads than CPUs, GNU's runtime stops letting idle team threads spin: every
    parallel op of the thread that computes then waits for a sleeping thread to wake up. On this
    2-core VM that made a decode step of the compute thread 1.4x slower (22 -> 30 ms/token) and a
    small linear 2x slower. Helper threads (store I/O, write-back, prefetch) only copy, so they
    give up their team; the per-thread setting leaves the compute thread's count as it is.
    """
    import torch

    torch.get_num_threads()  # torch sets each thread's OpenMP count on its first use; set ours after that
    runtime = _openmp()
    if runtime is not None:
        runtime.omp_set_num_threads(1)


def in_fresh_thread(build: Callable[[], T]) -> T:
    """`build()` on a thread that ends when it returns, so the OpenMP team its torch ops started ends too.

    For work done once before serving (loading a model) by a thread that will not compute: its
    team would otherwise outlive it and slow the compute thread (see `confine_torch_to_this_thread`).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcake-load") as one_thread:
        return one_thread.submit(build).result()
