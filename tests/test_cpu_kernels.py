"""The CPU attention kernel (kvcake/model/cpu_attention.cpp): built where the CPU can run it, equal to a float64
reference, and a query's result the same bits whichever pass it is computed in."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvcake.model import cpu_kernels

CAN_RUN = torch.backends.cpu.get_cpu_capability().startswith("AVX512") and shutil.which("c++") is not None
needs_kernel = pytest.mark.skipif(not CAN_RUN, reason="the kernel needs AVX-512 and a C++ compiler")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention in float64 of the last Tq of Tk tokens, as (Tq, H * d)."""
    num_queries, num_keys = q.shape[1], k.shape[1]
    positions = torch.arange(num_keys)
    allowed = positions[None, :] <= positions[num_keys - num_queries :, None]
    out = F.scaled_dot_product_attention(q[None].double(), k[None].double(), v[None].double(), attn_mask=allowed, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(num_queries, -1).float()


def operands(heads: int, kv_heads: int, head_dim: int, num_queries: int, num_keys: int) -> tuple[torch.Tensor, ...]:
    """q as the projections give it (a transposed view), k and v as views of a cache with room to spare."""
    generator = torch.Generator().manual_seed(heads * 1000 + num_keys)
    q = torch.randn(num_queries, heads, head_dim, generator=generator).transpose(0, 1)
    cache = torch.randn(2, kv_heads, num_keys + 40, head_dim, generator=generator) * 2
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
@pytest.mark.parametrize("splits", [[333], [1, 95, 96, 97, 400], [250, 251, 599]])
def test_a_querys_result_is_the_same_bits_in_whichever_pass_it_is_computed(splits: list[int]) -> None:
    q, k, v = operands(9, 3, 64, 600, 600)
    whole = cpu_kernels.attend_causal(q, k, v)
    bounds = [0, *splits, 600]
    passes = [cpu_kernels.attend_causal(q[:, start:end], k[:, :end], v[:, :end]) for start, end in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(passes), whole)


@needs_kernel
def test_keys_after_a_query_do_not_change_its_bits() -> None:
    """A pass that ends at a query gives it what a longer pass gives it (the keys after it enter as exact zeros)."""
    q, k, v = operands(6, 2, 128, 300, 300)
    whole = cpu_kernels.attend_causal(q, k, v)
    for end in (1, 95, 96, 97, 191, 299):
        assert torch.equal(cpu_kernels.attend_causal(q[:, end - 1 : end], k[:, :end], v[:, :end]), whole[end - 1 : end])


def test_operands_the_kernel_was_not_built_for_go_elsewhere() -> None:
    q, k, v = operands(4, 2, 24, 10, 10)
    assert not cpu_kernels.applies(q, k, v)
    assert not cpu_kernels.applies(*(t.to(torch.bfloat16) for t in operands(4, 2, 64, 10, 10)))
