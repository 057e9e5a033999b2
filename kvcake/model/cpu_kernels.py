"""Attention kernels of our own for CPUs, compiled from C++ on the machine that runs them.

SDPA's CPU flash kernel runs a float32 prefill's attention at about half the machine's matmul rate (~110 against
~210 GFLOP/s on 2 AVX-512 cores), and attention is half of a 6k-token prefill's work. `cpu_attention.cpp` does the
same causal attention at ~175 (`kvcake bench peers` and docs/design.md have the numbers). It needs AVX-512, a C++
compiler and ninja (a Python package kvcake depends on); it is built once per source and torch version into the
cache dir (~20 s) and loaded into the process. Where it cannot be built, attention stays on SDPA, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
HEAD_DIMS = frozenset({16, 32, 48, 64, 80, 96, 128, 256})
"""Head dims the kernel is compiled for (its `switch`); others use SDPA."""
MAX_GROUP = 48
"""At most this many query heads per KV head (one row slab of the kernel)."""
FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
"""AVX512-BF16 instructions run only on bfloat16 operands, which `applies` sends only to a CPU that has them."""

_AVX512_BF16 = torch.cpu._is_avx512_bf16_supported()

_lock = threading.Lock()
_state: dict[str, bool] = {}


def build_cpu_attention(build_root: Path) -> bool:
    """Build (once per source and torch version, under `build_root`) and load the causal attention kernel into this
    process. Returns whether it is loaded; a machine that cannot build it gets one warning and SDPA."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _build(build_root)
        return _state["loaded"]


def _build(build_root: Path) -> bool:
    missing = _missing_requirement()
    if missing:
        log.warning("kvcake: float32 attention on this CPU uses SDPA (about 1.6x slower): %s", missing)
        return False
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    folder = build_root / f"cpu-attention-{digest}"
    fresh = not (folder / "kvcake_cpu_attention.so").exists()
    if fresh:
        log.warning("kvcake: compiling the CPU attention kernel into %s (once, ~20 s)", folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="kvcake_cpu_attention", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(folder), is_python_module=False,
        )
    except (OSError, RuntimeError, ImportError) as error:
        log.warning("kvcake: float32 attention on this CPU uses SDPA (about 1.6x slower): the kernel did not build: %s", error)
        return False
    return True


def _missing_requirement() -> str:
    """Why the kernel cannot be built or run here, or '' when it can."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU has no AVX-512 (torch reports {capability})"
    if shutil.which("c++") is None:
        return "no C++ compiler (c++) on PATH"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return ""


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The kernel is loaded and takes these operands: float32, or bfloat16 on a CPU with AVX512-BF16, a head dim it
    was compiled for, each row contiguous."""
    return (
        _state.get("loaded", False)
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and (q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _AVX512_BF16))
        and q.shape[-1] in HEAD_DIMS
        and q.shape[-3] // k.shape[-3] <= MAX_GROUP
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )


def attends_rows(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """`attend_rows` takes decode rows of this device, dtype, head dim and query heads per KV head."""
    probe = torch.empty(group, 0, head_dim, dtype=dtype, device=device)
    return applies(probe, probe[:1], probe[:1])


def attend_rows(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """One decode token per row: q (H, B, d), row i over the first lengths[i] of keys[i], values[i] (Hkv, capacity,
    d), its whole cache (no mask). Returns (B, H * d). Reads half-precision caches as they are: the attention it
    replaces converted each row's keys and values to float32 every layer of every step (`_PaddedRows`)."""
    return torch.ops.kvcake.attend_rows(q, keys, values, lengths)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """q (H, Tq, d) over k, v (Hkv, Tk, d), the last dim contiguous; returns (Tq, H * d). Without `visible` the
    queries are the last Tq of the Tk tokens, each attending to itself and the tokens before it; with it (int64,
    one per query, 1 to Tk) query i attends to the first visible[i] keys. A query's result depends only on the
    keys it sees, never on which queries share its pass."""
    return torch.ops.kvcake.attend_causal(q, k, v, visible)
