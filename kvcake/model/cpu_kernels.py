"""Kernels of our own for CPUs, compiled from C++ on the machine that runs them.

SDPA's CPU flash kernel ran a float32 prefill's attention at about half the machine's matmul rate (~110 against
~210 GFLOP/s on 2 AVX-512 cores), oneDNN's bfloat16 products with their softmax at ~94, and attention is half of a
6k-token prefill's work. `cpu_attention.cpp` runs causal prefill attention at ~175 (float32) and ~300 (bfloat16),
and decode rows over their caches in place; `cpu_layer_ops.cpp` runs RMSNorm, RoPE and SwiGLU's activation in one
pass each where torch ran 3 to 8 ops (12% of a float32 prefill, ~1000 dispatches per decode step; docs/design.md has
the measurements). They need AVX-512 (bfloat16: AVX512-BF16), a C++ compiler and ninja (a Python package kvcake
depends on); they are built once per source, flags and torch version into the cache dir (~25 s) and loaded into
the process. Where they cannot be built, the model stays on torch's paths, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_attention.cpp", "cpu_layer_ops.cpp")]
HEADER = Path(__file__).with_name("cpu_vector.h")
HEAD_DIMS = frozenset({16, 32, 48, 64, 80, 96, 128, 256})
"""Head dims the attention kernel is compiled for (its `switch`); others use torch's attention."""
MAX_GROUP = 48
"""At most this many query heads per KV head (`ROW_SLAB`, one row slab of the kernel)."""
FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp"]
"""AVX512-BF16 instructions run only on bfloat16 operands, which `applies` and `layer_ops_apply` send only to a CPU that
has them."""
STALE_LOCK_S = 300
"""A build lock older than this was left by a build that died (one takes ~25 s): it is removed, or every later
start would wait on it."""

_AVX512_BF16 = torch.cpu._is_avx512_bf16_supported()

_lock = threading.Lock()
_loaded: bool | None = None
"""None until `build_cpu_attention` ran in this process, then whether the kernel is loaded."""


def build_cpu_attention(cache_root: Path) -> bool:
    """Build (once per source, flags and torch version, under `cache_root`/kernels) and load the CPU kernels (attention
    and the layer ops) into this process. Returns whether they are loaded; a machine that cannot build them gets one
    warning and torch's ops."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build(cache_root / "kernels")
        return _loaded


def _build(build_root: Path) -> bool:
    missing = _missing_requirement()
    if missing:
        log.warning("kvcake: attention and the layer ops on this CPU use torch (slower): %s", missing)
        return False
    from torch.utils import cpp_extension

    try:
        code = b"".join(path.read_bytes() for path in [*SOURCES, HEADER])
        digest = hashlib.sha256(code + torch.__version__.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
        folder = build_root / f"cpu-attention-{digest}"
        if not (folder / "kvcake_cpu_attention.so").exists():
            log.warning("kvcake: compiling the CPU kernels into %s (once, ~25 s)", folder)
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(folder / "lock")
        cpp_extension.load(
            name="kvcake_cpu_attention", sources=[str(path) for path in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
            build_directory=str(folder), is_python_module=False,
        )
    except Exception as error:  # a kernel that does not build costs speed, never a request
        log.warning("kvcake: attention and the layer ops on this CPU use torch (slower): the kernels did not build: %s", error)
        return False
    return True


def _remove_stale_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def _missing_requirement() -> str:
    """Why the kernel cannot be built or run here, or '' when it can (then with ninja on PATH)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return f"the CPU has no AVX-512 (torch reports {capability})"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    try:
        _put_ninja_on_path()
    except ImportError:
        return "the ninja package is not installed"
    return ""


def _put_ninja_on_path() -> None:
    """torch runs the bare `ninja` command, and a venv's bin folder (where the ninja package puts it) is on PATH
    only when the venv is activated, which `./run` does not do."""
    import ninja

    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _runs(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernels are loaded and take this device and dtype: float32, or bfloat16 on a CPU with AVX512-BF16."""
    return bool(_loaded) and device.type == "cpu" and (dtype == torch.float32 or (dtype == torch.bfloat16 and _AVX512_BF16))


def supports(device: torch.device, dtype: torch.dtype, head_dim: int, group: int) -> bool:
    """The attention kernel takes this device, dtype, head dim and number of query heads per KV head."""
    return _runs(device, dtype) and head_dim in HEAD_DIMS and group <= MAX_GROUP


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """`supports` these operands, each row contiguous."""
    return (
        q.dtype == k.dtype == v.dtype
        and supports(q.device, q.dtype, q.shape[-1], q.shape[-3] // k.shape[-3])
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    )


def layer_ops_apply(*tensors: torch.Tensor) -> bool:
    """The layer ops (`cpu_layer_ops.cpp`: `rms_norm`, `rope`, `silu_mul`) take these tensors: the kernels are loaded,
    and they are CPU tensors of one dtype, float32 or bfloat16 (on a CPU with AVX512-BF16), each row contiguous."""
    first = tensors[0]
    return _runs(first.device, first.dtype) and all(
        tensor.dtype == first.dtype and tensor.device == first.device and tensor.stride(-1) == 1 for tensor in tensors
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of rows x (..., hidden) in one pass, in float32, the normalised rows rounded to x's dtype before the
    weight as the reference models do."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.kvcake.rms_norm(rows, weight, eps).view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (H, T, d) with tables cos, sin (T, d) in one pass: ``x * cos + rotate_half(x) * sin``,
    rounded once. Returns a contiguous (H, T, d)."""
    return torch.ops.kvcake.rope(x, cos.contiguous(), sin.contiguous())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of rows (T, 2I) holding [gate | up], in one pass, rounded once."""
    return torch.ops.kvcake.silu_mul(gate_up)


def attend_rows(
    q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: list[int],
    new_keys: torch.Tensor | None = None, new_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per row: q (H, B, d), row i over the first lengths[i] of keys[i], values[i] (Hkv, capacity,
    d), its whole cache (no mask). Returns (B, H * d). With `new_keys`, `new_values` (Hkv, B, d), each row's new
    token is first written into its cache at lengths[i] - 1 (two small torch copies per row and layer cost more
    than the attention). Reads half-precision caches as they are: the attention it replaces converted each row's
    keys and values to float32 every layer of every step (`_PaddedRows`)."""
    return torch.ops.kvcake.attend_rows(q, keys, values, lengths, new_keys, new_values)


def attend_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """q (H, Tq, d) over k, v (Hkv, Tk, d), the last dim contiguous; returns (Tq, H * d). Without `visible` the
    queries are the last Tq of the Tk tokens, each attending to itself and the tokens before it; with it (int64,
    one per query, 1 to Tk) query i attends to the first visible[i] keys. A query's result depends only on the
    keys it sees, never on which queries share its pass."""
    return torch.ops.kvcake.attend_causal(q, k, v, visible)
