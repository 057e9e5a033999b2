"""The CPU attention kernel (kvcake/model/cpu_attention.cpp): built where the CPU can run it, equal to a float64
reference (float32; bfloat16 within its rounding and closer than the attention it replaces), and a query's result
the same bits whichever pass it is computed in."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvcake.model import cpu_kernels
from kvcake.model.transformer import _attend_causal_bf16_cpu, attend_with_mask

CAN_RUN = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernel = pytest.mark.skipif(not CAN_RUN, reason="the kernel needs AVX-512 and a C++ compiler")
needs_bf16 = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="bfloat16 needs AVX512-BF16")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention in float64 of the last Tq of Tk tokens, as (Tq, H * d)."""
    num_queries, num_keys = q.shape[1], k.shape[1]
    positions = torch.arange(num_keys)
    allowed = positions[None, :] <= positions[num_keys - num_queries :, None]
    out = F.scaled_dot_product_attention(q[None].double(), k[None].double(), v[None].double(), attn_mask=allowed, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(num_queries, -1).float()


def operands(heads: int, kv_heads: int, head_dim: int, num_queries: int, num_keys: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """q as the projections give it (a transposed view), k and v as views of a cache with room to spare."""
    generator = torch.Generator().manual_seed(heads * 1000 + num_keys)
    q = torch.randn(num_queries, heads, head_dim, generator=generator).to(dtype).transpose(0, 1)
    cache = (torch.randn(2, kv_heads, num_keys + 40, head_dim, generator=generator) * 2).to(dtype)
    return q, cache[0, :, :num_keys], cache[1, :, :num_keys]


@needs_kernel
def test_the_kernel_builds_on_a_cpu_with_avx512_and_a_compiler(cpu_attention_kernel: bool) -> None:
    assert cpu_attention_kernel


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (12, 2, 128), (14, 2, 64), (4, 4, 16), (4, 1, 96), (2, 2, 256)])
@pytest.mark.parametrize("num_queries,num_keys", [(200, 200), (37, 500), (1, 97), (300, 1000)])
def test_causal_attention_equals_the_float64_reference(heads: int, kv_heads: int, head_dim: int, num_queries: int, num_keys: int) -> None:
    q, k, v = operands(heads, kv_heads, head_dim, num_queries, num_keys)
    assert cpu_kernels.applies(q, k, v)
    torch.testing.assert_close(cpu_kernels.attend_causal(q, k, v), reference(q, k, v), rtol=1e-5, atol=2e-5)


@needs_kernel
@needs_bf16
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (12, 2, 128), (4, 1, 48)])
@pytest.mark.parametrize("num_queries,num_keys", [(200, 200), (37, 501), (1, 97)])
def test_bfloat16_attention_is_within_its_rounding_and_closer_than_the_products_it_replaces(
    heads: int, kv_heads: int, head_dim: int, num_queries: int, num_keys: int
) -> None:
    """Scores and sums in float32, weights rounded to bfloat16 for the values' product (as flash kernels do); the
    oneDNN products it replaces round the scores to bfloat16 (as Hugging Face's eager attention does)."""
    q, k, v = operands(heads, kv_heads, head_dim, num_queries, num_keys, torch.bfloat16)
    expected = reference(q, k, v)
    error = (cpu_kernels.attend_causal(q, k, v).float() - expected).abs().max()
    products = _attend_causal_bf16_cpu(q[None], k[None], v[None])[0].transpose(0, 1).reshape(num_queries, -1)
    assert error <= 2 ** -8 * expected.abs().max()
    assert error < (products.float() - expected).abs().max()


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [[333], [1, 95, 96, 97, 400], [250, 251, 599]])
def test_a_querys_result_is_the_same_bits_in_whichever_pass_it_is_computed(splits: list[int], dtype: torch.dtype) -> None:
    q, k, v = operands(9, 3, 64, 600, 600, dtype)
    whole = cpu_kernels.attend_causal(q, k, v)
    bounds = [0, *splits, 600]
    passes = [cpu_kernels.attend_causal(q[:, start:end], k[:, :end], v[:, :end]) for start, end in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(passes), whole)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_after_a_query_do_not_change_its_bits(dtype: torch.dtype) -> None:
    """A pass that ends at a query gives it what a longer pass gives it (the keys after it enter as exact zeros)."""
    q, k, v = operands(6, 2, 128, 300, 300, dtype)
    whole = cpu_kernels.attend_causal(q, k, v)
    for end in (1, 95, 96, 97, 191, 299):
        assert torch.equal(cpu_kernels.attend_causal(q[:, end - 1 : end], k[:, :end], v[:, :end]), whole[end - 1 : end])


def test_operands_the_kernel_was_not_built_for_go_elsewhere() -> None:
    q, k, v = operands(4, 2, 24, 10, 10)
    assert not cpu_kernels.applies(q, k, v)
    assert not cpu_kernels.applies(*operands(4, 2, 64, 10, 10, torch.float16))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (12, 2, 128), (4, 4, 16), (32, 1, 48)])
def test_decode_rows_each_attend_to_their_own_cache(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """Rows of different lengths, each over the start of its own cache (what lies after its length must not count)."""
    generator = torch.Generator().manual_seed(heads + head_dim)
    lengths = [1, 40, 17, 97]
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype).transpose(0, 1)
    keys = [(torch.randn(kv_heads, 120, head_dim, generator=generator) * 2).to(dtype) for _ in lengths]
    values = [torch.randn(kv_heads, 120, head_dim, generator=generator).to(dtype) for _ in lengths]
    expected = torch.cat([reference(q[:, row : row + 1], keys[row][:, :length], values[row][:, :length]) for row, length in enumerate(lengths)])
    tolerance = {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 2**-8}
    torch.testing.assert_close(cpu_kernels.attend_rows(q, keys, values, lengths).float(), expected, **tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_queries_anywhere_see_the_keys_their_counts_give(dtype: torch.dtype) -> None:
    """A blend's recomputed tokens: queries at scattered positions, each over the keys up to its own (a prefix of
    the cache, by count), equal to the masked reference; the same queries alone give the same bits."""
    q, k, v = operands(12, 2, 128, 7, 700, dtype)
    visible = torch.tensor([1, 5, 96, 97, 300, 650, 700])
    allowed = torch.arange(700)[None, :] < visible[:, None]
    expected = F.scaled_dot_product_attention(q[None].double(), k[None].double(), v[None].double(), attn_mask=allowed, enable_gqa=True)
    expected = expected[0].transpose(0, 1).reshape(7, -1).float()
    got = cpu_kernels.attend_causal(q, k, v, visible)
    tolerance = {"rtol": 1e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 2**-7}
    torch.testing.assert_close(got.float(), expected, **tolerance)
    for row in (0, 3, 6):
        assert torch.equal(cpu_kernels.attend_causal(q[:, row : row + 1], k, v, visible[row : row + 1]), got[row : row + 1])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (14, 2, 128)])
def test_a_one_token_pass_gives_the_bits_of_a_longer_pass(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    """A prompt's last token left alone after a prefix hit attends as it would inside the full prefill's pass, and so
    do the tokens of a short pass (at most 16 rows run in slabs of one vector, more in slabs of three)."""
    q, k, v = operands(heads, kv_heads, head_dim, 300, 300, dtype)
    whole = attend_with_mask(q, k, v, True)
    for end in (1, 96, 200, 300):
        assert torch.equal(attend_with_mask(q[:, end - 1 : end], k[:, :end], v[:, :end], None), whole[end - 1 : end])
    for start, end in ((0, 2), (195, 197), (290, 292), (10, 15)):
        assert torch.equal(cpu_kernels.attend_causal(q[:, start:end], k[:, :end], v[:, :end]), whole[start:end])


def test_a_build_lock_left_by_a_dead_build_is_removed(tmp_path: Path) -> None:
    """cpp_extension waits on its lock file forever; one older than any build means its build died."""
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.touch()
    fresh.touch()
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(stale, (old, old))
    cpu_kernels._remove_stale_lock(stale)
    cpu_kernels._remove_stale_lock(fresh)
    cpu_kernels._remove_stale_lock(tmp_path / "absent")
    assert not stale.exists() and fresh.exists()


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_rows_write_their_new_token_into_their_caches_first(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    lengths = [3, 50]
    q = torch.randn(2, 6, 64, generator=generator).to(dtype).transpose(0, 1)
    keys = [torch.randn(2, 64, 64, generator=generator).to(dtype) for _ in lengths]
    values = [torch.randn(2, 64, 64, generator=generator).to(dtype) for _ in lengths]
    new_keys, new_values = (torch.randn(2, 2, 64, generator=generator).to(dtype) for _ in range(2))
    written_keys, written_values = [k.clone() for k in keys], [v.clone() for v in values]
    for row, length in enumerate(lengths):
        written_keys[row][:, length - 1], written_values[row][:, length - 1] = new_keys[:, row], new_values[:, row]
    expected = cpu_kernels.attend_rows(q, written_keys, written_values, lengths)
    assert torch.equal(cpu_kernels.attend_rows(q, keys, values, lengths, new_keys, new_values), expected)
    assert all(torch.equal(k, w) for k, w in zip(keys + values, written_keys + written_values))


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the reference models compute it, the normalised rows rounded to x's dtype before the weight."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.double().chunk(2, dim=-1)
    return (x.double() * cos.double() + torch.cat((-second, first), dim=-1) * sin.double()).float()


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(1, 576), (300, 200), (7, 24)])
def test_rms_norm_equals_the_reference_models_norm(dtype: torch.dtype, rows: int, width: int) -> None:
    generator = torch.Generator().manual_seed(rows + width)
    x = (torch.randn(rows, width, generator=generator) * 3).to(dtype)
    weight = torch.randn(width, generator=generator).to(dtype)
    assert cpu_kernels.layer_ops_apply(x, weight)
    got = cpu_kernels.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got.float(), _rms_norm_reference(x, weight, 1e-6).float(), **_tolerance(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,tokens,head_dim", [(9, 300, 64), (3, 5, 24), (2, 1, 128)])
def test_rope_equals_the_rotation_of_the_halves(dtype: torch.dtype, heads: int, tokens: int, head_dim: int) -> None:
    """On the strided (H, T, d) views the projections give, and head dims whose halves are not whole vectors."""
    generator = torch.Generator().manual_seed(heads * tokens)
    projected = torch.randn(tokens, 2 * heads * head_dim, generator=generator).to(dtype)
    x = projected[:, : heads * head_dim].view(tokens, heads, head_dim).transpose(0, 1)
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 100
    cos, sin = torch.cat((angles, angles), dim=-1).cos().to(dtype), torch.cat((angles, angles), dim=-1).sin().to(dtype)
    got = cpu_kernels.rope(x, cos, sin)
    assert got.is_contiguous()
    torch.testing.assert_close(got.float(), _rope_reference(x, cos, sin), **_tolerance(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_the_reference_including_extreme_gates(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(37, 2 * 100, generator=generator) * 4).to(dtype)
    gate_up[0, :8] = torch.tensor([-1000.0, -100.0, -1e-30, 0.0, 1e-30, 100.0, 1000.0, 20.0]).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    expected = (F.silu(gate) * up).float()
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up).float(), expected, **_tolerance(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_ops_give_a_row_the_same_bits_in_any_pass(dtype: torch.dtype) -> None:
    """Exact modes compute a token in passes of other sizes than the full prefill: its row must not change."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(600, 576, generator=generator).to(dtype)
    weight = torch.randn(576, generator=generator).to(dtype)
    assert torch.equal(cpu_kernels.rms_norm(x, weight, 1e-5)[250:251], cpu_kernels.rms_norm(x[250:251], weight, 1e-5))
    assert torch.equal(cpu_kernels.silu_mul(x)[250:253], cpu_kernels.silu_mul(x[250:253]))
    heads = x[:, :576].view(600, 9, 64).transpose(0, 1)
    cos, sin = x[:, :64].contiguous(), x[:, 64:128].contiguous()
    assert torch.equal(cpu_kernels.rope(heads, cos, sin)[:, 250:251], cpu_kernels.rope(heads[:, 250:251], cos[250:251], sin[250:251]))
