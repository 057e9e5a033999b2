from __future__ import annotations

import struct

import pytest
import torch

from kvcake.store import codec
from kvcake.store.codec import ChunkKV, CodecError


def _split(data: bytes) -> tuple[codec.Header, memoryview]:
    return codec.parse_header(data), memoryview(data)


def test_chunk_helpers(make_chunk) -> None:
    chunk = make_chunk(layers=3, heads=2, tokens=40, dim=8)
    assert (chunk.num_layers, chunk.num_tokens, chunk.nbytes) == (3, 40, 2 * 3 * 2 * 40 * 8 * 4)


@pytest.mark.parametrize(("dtype", "store_dtype", "page_tokens"), [
    (torch.float32, None, 16), (torch.bfloat16, None, 7), (torch.float32, "fp16", 16), (torch.float16, "int8", 5), (torch.bfloat16, "fp32", 64),
])
def test_entry_bytes_is_the_length_encode_writes(make_chunk, dtype, store_dtype, page_tokens) -> None:
    chunk = make_chunk(layers=3, heads=2, tokens=40, dim=8, dtype=dtype)
    expected = len(codec.encode(chunk, store_dtype, page_tokens))
    assert codec.entry_bytes(3, 2, 40, 8, dtype, store_dtype, page_tokens) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact_in_the_original_dtype(make_chunk, same, dtype) -> None:
    chunk = make_chunk(dtype=dtype)
    if dtype == torch.float32:  # special values and their exact bits survive
        chunk.keys[0][0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    assert same(codec.decode(codec.encode(chunk)), chunk)


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_storage_dtype_is_what_decode_returns(make_chunk, same, name, dtype) -> None:
    chunk = make_chunk()
    expected = ChunkKV([k.to(dtype) for k in chunk.keys], [v.to(dtype) for v in chunk.values])
    assert same(codec.decode(codec.encode(chunk, name)), expected)


@pytest.mark.parametrize("source", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "target"), [("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_conversions_round_like_torch(source, name, target) -> None:
    """Rounding (to nearest even), overflow, subnormals and NaN match ``tensor.to(dtype)``."""
    special = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 6e-8, 3e-39,
               65504.0, 65520.0, 3.4e38, 1.00390625, 1.01171875, -1.00390625, 1 + 2**-11, 1 + 3 * 2**-11]
    x = torch.tensor(special + torch.randn(47, generator=torch.Generator().manual_seed(3)).tolist())
    x = x.reshape(1, 64, 1).to(source)
    out = codec.decode(codec.encode(ChunkKV([x], [x]), name)).keys[0]
    expected = x.to(target)
    nan = expected.isnan()
    assert out.dtype == target and torch.equal(out.isnan(), nan)  # torch itself is not consistent on NaN bits
    assert torch.equal(out[~nan].view(torch.uint8), expected[~nan].view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_is_bounded_per_channel(make_chunk, dtype) -> None:
    chunk = make_chunk(tokens=64, dtype=dtype)
    chunk.keys[1][:, :, 3] *= 50  # an outlier channel does not hurt the other channels
    out = codec.decode(codec.encode(chunk, "int8"))
    for x, y in zip(chunk.keys + chunk.values, out.keys + out.values, strict=True):
        assert y.dtype == dtype and y.shape == x.shape
        x32, y32 = x.float(), y.float()
        bound = x32.abs().amax(dim=1, keepdim=True) / 254  # half a quantization step
        slack = 1e-6 if dtype == torch.float32 else 2 ** -8 * x32.abs()  # bf16 output rounding
        assert ((x32 - y32).abs() <= bound + slack + 1e-7).all()


def test_int8_of_zero_channels(make_chunk) -> None:
    chunk = make_chunk()
    chunk.values[0].zero_()
    assert torch.equal(codec.decode(codec.encode(chunk, "int8")).values[0], chunk.values[0])


@pytest.mark.parametrize("name", ["keep", "fp16", "int8"])
@pytest.mark.parametrize("page_tokens", [1, 7, 16, 64])
def test_layer_and_token_range_reads_match_full_decode(make_chunk, same, tokens_of, name, page_tokens) -> None:
    chunk = make_chunk(layers=3, tokens=40)
    data = codec.encode(chunk, name, page_tokens)
    full = codec.decode(data)
    h, mv = _split(data)
    for layer in range(3):
        start, end = codec.layer_range(h, layer)
        k, v = codec.decode_layer(h, layer, mv[start:end])
        assert same(ChunkKV([k], [v]), ChunkKV([full.keys[layer]], [full.values[layer]]))
    for a, b in [(0, 40), (0, 1), (39, 40), (5, 6), (7, 21), (16, 32), (15, 33), (3, 40)]:
        parts = [mv[s:e] for s, e in codec.token_ranges(h, a, b)]
        assert same(codec.decode_tokens(h, a, b, parts), tokens_of(full, a, b))


@pytest.mark.parametrize("name", ["keep", "int8"])
def test_token_range_of_some_layers(make_chunk, same, tokens_of, name) -> None:
    chunk = make_chunk(layers=4, tokens=40)
    data = codec.encode(chunk, name, 16)
    full = codec.decode(data)
    h, mv = _split(data)
    for layers in ([2], [0, 3], [3, 1]):
        ranges = codec.token_ranges(h, 9, 33, layers)
        assert len(ranges) == 2 * len(layers) * (2 if name == "int8" else 1)
        got = codec.decode_tokens(h, 9, 33, [mv[s:e] for s, e in ranges], layers)
        want = tokens_of(full, 9, 33)
        assert same(got, ChunkKV([want.keys[i] for i in layers], [want.values[i] for i in layers]))


def test_token_range_reads_only_the_pages_it_needs(make_chunk) -> None:
    chunk = make_chunk(layers=2, heads=2, tokens=64, dim=8)
    h = codec.parse_header(codec.encode(chunk, page_tokens=16))
    ranges = codec.token_ranges(h, 20, 30)  # inside page 1 only
    assert len(ranges) == 4 and all(e - s == 16 * h.token_bytes for s, e in ranges)
    assert sum(e - s for s, e in ranges) * 4 == 2 * 2 * 64 * h.token_bytes


def test_layout_is_token_major(make_chunk) -> None:
    chunk = make_chunk(layers=1, heads=2, tokens=5, dim=3)
    data = codec.encode(chunk)
    h = codec.parse_header(data)
    token_2 = data[h.block_offset(0) + 2 * h.token_bytes : h.block_offset(0) + 3 * h.token_bytes]
    assert token_2 == chunk.keys[0][:, 2, :].contiguous().numpy().tobytes()


def test_every_corrupted_byte_is_detected(make_chunk) -> None:
    for name in ("keep", "int8"):
        data = codec.encode(make_chunk(layers=2, tokens=20, dim=4), name, page_tokens=8)
        for pos in range(0, len(data), 7):
            bad = bytearray(data)
            bad[pos] ^= 0x40
            with pytest.raises(CodecError):
                codec.decode(bytes(bad))
            with pytest.raises(CodecError):
                codec.verify(bytes(bad))


def test_partial_reads_verify_their_pages(make_chunk) -> None:
    data = bytearray(codec.encode(make_chunk(layers=2, tokens=32), page_tokens=8))
    h = codec.parse_header(bytes(data))
    data[h.pages_range(3, 2, 3)[0] + 5] ^= 1  # a byte of page 2 of layer 1's V block
    mv = memoryview(bytes(data))
    with pytest.raises(CodecError, match="checksum"):
        codec.decode_layer(h, 1, mv[slice(*codec.layer_range(h, 1))])
    codec.decode_layer(h, 0, mv[slice(*codec.layer_range(h, 0))])  # the other layer is intact
    with pytest.raises(CodecError, match="checksum"):
        codec.decode_tokens(h, 17, 18, [mv[s:e] for s, e in codec.token_ranges(h, 17, 18)])
    codec.decode_tokens(h, 0, 16, [mv[s:e] for s, e in codec.token_ranges(h, 0, 16)])


def test_truncated_and_foreign_entries(make_chunk) -> None:
    data = codec.encode(make_chunk())
    for cut in (0, 10, codec.parse_header(data).header_len, len(data) - 1):
        with pytest.raises(CodecError) as err:
            codec.decode(data[:cut])
        assert err.value.kind == "truncated"
    with pytest.raises(CodecError) as err:
        codec.decode(b"\x80\x04NOTKVCK" + data[11:])
    assert err.value.kind == "bad_header"
    newer = bytearray(data)
    struct.pack_into("<H", newer, 4, codec.CODEC_VERSION + 1)
    with pytest.raises(CodecError) as err:
        codec.decode(bytes(newer))
    assert err.value.kind == "other_version"
    with pytest.raises(CodecError):
        codec.decode(data + b"\0")


def test_encode_rejects_malformed_chunks(make_chunk) -> None:
    chunk = make_chunk()
    with pytest.raises(ValueError):
        codec.encode(ChunkKV(chunk.keys, chunk.values[:-1]))
    with pytest.raises(ValueError):
        codec.encode(ChunkKV([chunk.keys[0].to(torch.float16), *chunk.keys[1:]], chunk.values))
    with pytest.raises(ValueError):
        codec.encode(ChunkKV([k.int() for k in chunk.keys], [v.int() for v in chunk.values]))
    with pytest.raises(ValueError):
        codec.encode(chunk, "fp8")


def test_non_contiguous_inputs(make_chunk, same) -> None:
    chunk = make_chunk(tokens=12)
    strided = ChunkKV([k.transpose(0, 1).contiguous().transpose(0, 1) for k in chunk.keys], chunk.values)
    assert same(codec.decode(codec.encode(strided)), chunk)
