"""The layer-wise runner against Hugging Face transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import FAMILY_CONFIGS
from transformers import AutoModelForCausalLM

from kvcake.model import Transformer, transformer
from kvcake.model.transformer import PrefixVisible, TailCausal, attend_with_mask, causal_mask, linear, linear_add, pack_weight

TOLERANCE = 1e-4


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0]


def full_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(len(ids))
    return model.forward(ids, torch.arange(len(ids)), cache, all_logits=True).logits


def chunked_logits(model: Transformer, ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    cache = model.new_cache(len(ids))
    pieces = []
    for start in range(0, len(ids), chunk_size):
        end = min(start + chunk_size, len(ids))
        pieces.append(model.forward(ids[start:end], torch.arange(start, end), cache, all_logits=True).logits)
    return torch.cat(pieces)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_logits_match_transformers(tiny_folders: dict[str, Path], test_device: torch.device, family: str) -> None:
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1))
    ours = full_logits(Transformer.from_folder(tiny_folders[family], test_device), ids)
    reference = hf_logits(tiny_folders[family], ids)
    assert ours.shape == reference.shape
    assert (ours.cpu() - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 256])
def test_chunked_prefill_equals_one_shot(tiny_folders: dict[str, Path], test_device: torch.device, family: str, chunk_size: int) -> None:
    model = Transformer.from_folder(tiny_folders[family], test_device)
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(2))
    assert (chunked_logits(model, ids, chunk_size) - full_logits(model, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_suffix_over_stored_prefix_kv_equals_full_pass(tiny_folders: dict[str, Path], test_device: torch.device, family: str) -> None:
    """Store a prefix's K (after RoPE) and V, place it into a fresh cache, compute only the suffix."""
    model = Transformer.from_folder(tiny_folders[family], test_device)
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(3))
    prefix_len = 120
    stored = model.forward(ids[:prefix_len], torch.arange(prefix_len), model.new_cache(prefix_len), keep_kv=True, rotated_keys=True)

    cache = model.new_cache(len(ids))
    model.load_kv(cache, stored.kv, torch.arange(prefix_len))
    suffix = model.forward(ids[prefix_len:], torch.arange(prefix_len, len(ids)), cache, all_logits=True).logits

    assert (suffix - full_logits(model, ids)[prefix_len:]).abs().max().item() <= 1e-5


def test_attention_over_any_subset_uses_positions(test_device: torch.device) -> None:
    """Scattered queries and shuffled KV give the rows of the full causal attention."""
    generator = torch.Generator().manual_seed(4)
    heads, kv_heads, length, dim = 4, 2, 40, 16
    q, k, v = (
        torch.randn(heads_, length, dim, generator=generator).to(test_device) for heads_ in (heads, kv_heads, kv_heads)
    )
    positions = torch.arange(length, device=test_device)
    full = attend_with_mask(q, k, v, causal_mask(positions, positions))

    chosen = torch.tensor([3, 17, 18, 39], device=test_device)
    order = torch.randperm(length, generator=generator).to(test_device)
    subset = attend_with_mask(q[:, chosen], k[:, order], v[:, order], causal_mask(chosen, order))
    assert (subset - full[chosen]).abs().max().item() <= 1e-5


def test_tail_chunk_mask_gives_the_position_mask_result(test_device: torch.device) -> None:
    """A chunk at the tail of a contiguous cache gets the lower-right causal form (CUDA's flash
    kernel in half precision; on a CPU the earlier tokens and the chunk's own apart, joined by their
    log-sum-exps) with the same result as the boolean mask; a gap gets per-query counts of visible keys (the CPU
    kernel's form), with the same result too; keys out of order keep the boolean mask."""
    dtype = torch.bfloat16 if test_device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(4, 5, 16, generator=generator).to(test_device, dtype)
    k, v = (torch.randn(2, 12, 16, generator=generator).to(test_device, dtype) for _ in range(2))
    kv_positions = torch.arange(30, 42, device=test_device)
    mask = causal_mask(kv_positions[-5:], kv_positions)
    assert isinstance(mask, TailCausal)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(attend_with_mask(q, k, v, mask), attend_with_mask(q, k, v, mask.dense), atol=tolerance, rtol=tolerance)
    gap = causal_mask(kv_positions[-5:], torch.cat([kv_positions[:3], kv_positions[4:]]))
    assert isinstance(gap, PrefixVisible) and gap.counts.tolist() == [7, 8, 9, 10, 11]
    k_gap, v_gap = k[:, 1:], v[:, 1:]
    torch.testing.assert_close(attend_with_mask(q, k_gap, v_gap, gap), attend_with_mask(q, k_gap, v_gap, gap.dense), atol=tolerance, rtol=tolerance)
    assert isinstance(causal_mask(kv_positions[-5:], kv_positions.flip(0)), torch.Tensor)


@pytest.mark.skipif(not transformer._ONEDNN_BF16, reason="the CPU has no bf16 instructions: SDPA's kernel runs instead")
def test_bf16_prefill_attention_on_a_cpu_is_the_same_wherever_a_pass_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's bfloat16 prefill attention (one matmul per grid cell, scores in bfloat16) is causal attention within
    bfloat16 rounding, and gives a query the same bits wherever its pass starts or ends (mid-cell, one row before
    a grid line), and however its scores are blocked; scattered queries over shuffled keys (a dense mask) get the same rows."""
    generator = torch.Generator().manual_seed(8)
    length, split = 600, 300
    q = torch.randn(9, length, 64, generator=generator).bfloat16()
    k, v = (torch.randn(3, length, 64, generator=generator).bfloat16() for _ in range(2))
    positions = torch.arange(length)
    one_pass = attend_with_mask(q, k, v, causal_mask(positions, positions))
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.double()[None], k.double()[None], v.double()[None], is_causal=True, enable_gqa=True)[0].transpose(0, 1).reshape(length, -1)
    torch.testing.assert_close(one_pass.double(), reference, atol=2e-2, rtol=2e-2)
    second_pass = attend_with_mask(q[:, split:], k, v, causal_mask(positions[split:], positions))
    assert torch.equal(second_pass, one_pass[split:])
    for start, end in ((0, 450), (255, 470), (511, 513), (256, 600)):
        part = attend_with_mask(q[:, start:end], k[:, :end], v[:, :end], causal_mask(positions[start:end], positions[:end]))
        assert torch.equal(part, one_pass[start:end]), (start, end)
    monkeypatch.setattr(transformer, "SCORE_BLOCK_BYTES", 40_000)
    assert torch.equal(attend_with_mask(q, k, v, causal_mask(positions, positions)), one_pass)
    chosen = torch.tensor([3, 17, 290, 599])
    order = torch.randperm(length, generator=generator)
    scattered = attend_with_mask(q[:, chosen], k[:, order], v[:, order], causal_mask(chosen, order))
    torch.testing.assert_close(scattered.double(), reference[chosen], atol=2e-2, rtol=2e-2)


def test_a_float16_model_runs_on_any_cpu(tiny_folders: dict[str, Path]) -> None:
    """oneDNN multiplies float16 only on CPUs with AVX512-FP16; elsewhere the projections take torch's path."""
    ids = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(8))
    reference = full_logits(Transformer.from_folder(tiny_folders["qwen2"], "cpu"), ids)
    half = full_logits(Transformer.from_folder(tiny_folders["qwen2"], "cpu", dtype=torch.float16), ids)
    torch.testing.assert_close(half.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_half_precision_chunks_match_one_shot(tiny_folders: dict[str, Path], test_device: torch.device, family: str) -> None:
    """bf16 chunked prefill (tail-chunk attention) against the one-shot pass, within bf16 rounding."""
    model = Transformer.from_folder(tiny_folders[family], test_device, dtype=torch.bfloat16)
    ids = torch.randint(3, 512, (70,), generator=torch.Generator().manual_seed(7))
    one_shot = full_logits(model, ids)
    torch.testing.assert_close(chunked_logits(model, ids, 16), one_shot, atol=3e-2, rtol=3e-2)
    swapped = torch.arange(len(ids), device=test_device)
    swapped[[40, 41]] = swapped[[41, 40]]
    misplaced = model.forward(ids, swapped, model.new_cache(len(ids)), all_logits=True).logits
    assert (misplaced - one_shot).abs().max().item() > 0.1, "two tokens at each other's positions must show beyond the tolerance"


def test_rope_at_shifted_positions_is_a_relative_rotation(tiny_folders: dict[str, Path], test_device: torch.device) -> None:
    """q.k after RoPE depends only on the distance, so a chunk can move as a block."""
    model = Transformer.from_folder(tiny_folders["qwen2"], test_device)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 16, generator=generator).to(test_device)
    k = torch.randn(1, 1, 16, generator=generator).to(test_device)

    def score(q_pos: int, k_pos: int) -> float:
        cos_q, sin_q = model.rope_tables(torch.tensor([q_pos]))
        cos_k, sin_k = model.rope_tables(torch.tensor([k_pos]))
        return float((model.apply_rope(q, cos_q, sin_q) * model.apply_rope(k, cos_k, sin_k)).sum())

    assert score(10, 3) == pytest.approx(score(1010, 1003), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_decode_query_in_half_precision_matches_float32_attention(test_device: torch.device, dtype: torch.dtype) -> None:
    """A single query in bf16/fp16 takes the three-product path on a CPU: same result as float32 SDPA, up to the dtype's rounding."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(heads, tokens, 16, generator=generator) for heads, tokens in ((6, 1), (2, 40), (2, 40)))
    reference = attend_with_mask(q, k, v, None)
    low = attend_with_mask(q.to(test_device, dtype), k.to(test_device, dtype), v.to(test_device, dtype), None)
    assert low.shape == reference.shape
    assert (low.float().cpu() - reference).abs().max().item() <= 2e-2


def test_linear_equals_the_reference_product() -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(5, 24, generator=generator), torch.randn(12, 24, generator=generator), torch.randn(12, generator=generator)
    assert torch.allclose(linear(x, weight, bias), x @ weight.T + bias, atol=1e-5)
    assert torch.allclose(linear(x, weight), x @ weight.T, atol=1e-5)
    packed = pack_weight(weight)
    for rows in (1, 5, 300):
        x = torch.randn(rows, 24, generator=generator)
        assert torch.allclose(linear(x, packed, bias), x @ weight.T + bias, atol=1e-5), f"packed weight, {rows} rows"
    assert torch.allclose(linear(x.T.contiguous().T, packed), x @ weight.T, atol=1e-5), "a transposed (non-contiguous) input"
    residual = torch.randn(rows, 12, generator=generator)
    assert torch.allclose(linear_add(x, packed, bias, residual), residual + x @ weight.T + bias, atol=1e-5)
    assert torch.allclose(linear_add(x, weight, None, residual), residual + x @ weight.T, atol=1e-5)
    half = [tensor.half() for tensor in (x, weight, residual)]
    torch.testing.assert_close(linear_add(half[0], half[1], None, half[2]).float(), residual + x @ weight.T, atol=2e-2, rtol=2e-2)
