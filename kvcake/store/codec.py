"""Binary format of one stored chunk: versioned header + raw tensor bytes (no object serialization).

Layout (all integers little-endian)::

    fixed header   magic "KVCK", codec version, flags, header length, L, T, H, D,
                   page_tokens, storage dtype, original dtype, key digest (16 bytes)
    layer sums     uint32 per layer: XXH3 of the layer's byte range (its K and V blocks)
    page sums      uint32 per (block, page); int8 entries add one sum per block for scales
    header sum     uint32 XXH3 of everything above

(A checksum is the low 32 bits of XXH3-64.)
    blocks         for layer 0..L-1: K block, then V block
                   block = [per-channel scales, float32 (H, D), int8 only]
                           [tensor bytes in token-major order (T, H, D)]

Token-major blocks make a token range [a, b) of a layer one contiguous byte range, and
the K and V blocks of a layer are adjacent, so a layer is one range as well. A whole
layer (a full read, a layer read) is verified by one checksum call over its range; a
token-range read verifies the pages of ``page_tokens`` tokens it overlaps, never the
whole entry.

Decoding makes no copy: the tensors are (H, T, D) views of the token-major bytes, so the
buffer handed to a decoder must be private to the result (a pooled read buffer); an
immutable ``bytes`` input is copied once first. The one copy a load needs is the
reader's, into its KV cache.

An entry is bound to the key it was written under: the header holds a digest of that
key (covered by the header checksum), and every read names the key it expects, so valid
bytes copied under another key are refused (``foreign_key``), not served.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import xxhash

from kvcake.chunk import ChunkKV

CODEC_VERSION = 4
MAGIC = b"KVCK"
DEFAULT_PAGE_TOKENS = 16
#: bytes a reader fetches first: the whole header when layers x pages <= ~1000 (e.g. 30 layers
#: x 512 tokens at 16-token pages); a larger header costs a second read
HEADER_PROBE_BYTES = 8192

_FIXED = struct.Struct("<4sHHIIIIIIBBH16s")
_KEY_DIGEST_BYTES = 16
_CRC = struct.Struct("<I")

# code -> (name, torch dtype, element size, numpy dtype of the stored bits; bf16 bits as uint16)
_DTYPES: dict[int, tuple[str, torch.dtype, int, np.dtype]] = {
    1: ("fp32", torch.float32, 4, np.dtype("<f4")),
    2: ("fp16", torch.float16, 2, np.dtype("<f2")),
    3: ("bf16", torch.bfloat16, 2, np.dtype("<u2")),
    4: ("int8", torch.int8, 1, np.dtype("i1")),
}
_ALIASES = {
    "fp32": 1, "float32": 1, "float": 1,
    "fp16": 2, "float16": 2, "half": 2,
    "bf16": 3, "bfloat16": 3,
    "int8": 4,
}
_BF16 = 3
_INT8 = 4
_INT8_MAX = 127
_BF16_NAN = 0x7FC0


class CodecError(Exception):
    """An entry that cannot be trusted; ``kind`` is the stats error kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def key_digest(key: str) -> bytes:
    """What the header stores of the key an entry was written under."""
    return hashlib.blake2b(key.encode(), digest_size=_KEY_DIGEST_BYTES, person=b"kvcake.entry").digest()


@dataclass(frozen=True)
class Header:
    """Parsed header; knows where every block, page and checksum lives (sizes computed once)."""

    num_layers: int
    num_tokens: int
    n_heads: int
    head_dim: int
    page_tokens: int
    store_code: int
    orig_code: int
    layer_crcs: tuple[int, ...]
    crcs: tuple[int, ...]

    @cached_property
    def is_int8(self) -> bool:
        return self.store_code == _INT8

    @cached_property
    def n_pages(self) -> int:
        return -(-self.num_tokens // self.page_tokens)

    @cached_property
    def crcs_per_block(self) -> int:
        return self.n_pages + (1 if self.is_int8 else 0)

    @cached_property
    def elem_size(self) -> int:
        return _DTYPES[self.store_code][2]

    @cached_property
    def token_bytes(self) -> int:
        return self.n_heads * self.head_dim * self.elem_size

    @cached_property
    def scale_bytes(self) -> int:
        return self.n_heads * self.head_dim * 4 if self.is_int8 else 0

    @cached_property
    def block_bytes(self) -> int:
        return self.scale_bytes + self.num_tokens * self.token_bytes

    @cached_property
    def header_len(self) -> int:
        return _header_len(self.num_layers, self.crcs_per_block)

    @cached_property
    def layer_bytes(self) -> int:
        return 2 * self.block_bytes

    @cached_property
    def total_bytes(self) -> int:
        return self.header_len + 2 * self.num_layers * self.block_bytes

    def block_offset(self, block: int) -> int:
        return self.header_len + block * self.block_bytes

    def page_span(self, start: int, end: int) -> tuple[int, int]:
        """Pages [p0, p1) that cover tokens [start, end)."""
        return start // self.page_tokens, -(-end // self.page_tokens)

    def pages_range(self, block: int, p0: int, p1: int) -> tuple[int, int]:
        """Byte range of pages [p0, p1) of a block."""
        base = self.block_offset(block) + self.scale_bytes
        first = p0 * self.page_tokens * self.token_bytes
        last = min(p1 * self.page_tokens, self.num_tokens) * self.token_bytes
        return base + first, base + last


def dtype_code(name: str | None, original: torch.dtype) -> int:
    """Storage dtype code for a name (``None``/``keep`` keeps the tensors' own dtype)."""
    if name is None or name == "keep":
        return _code_of(original)
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown storage dtype {name!r}; use keep, fp32, fp16, bf16 or int8") from None


def _code_of(dtype: torch.dtype) -> int:
    for code, (_, tdtype, _, _) in _DTYPES.items():
        if tdtype == dtype and code != _INT8:
            return code
    raise ValueError(f"unsupported KV dtype {dtype}; use float32, float16 or bfloat16")


def entry_bytes(num_layers: int, n_heads: int, num_tokens: int, head_dim: int, dtype: torch.dtype,
                store_dtype: str | None = None, page_tokens: int = DEFAULT_PAGE_TOKENS) -> int:
    """Bytes `encode` writes for a chunk of this shape and dtype, without encoding one."""
    code = dtype_code(store_dtype, dtype)
    return Header(num_layers, num_tokens, n_heads, head_dim, page_tokens, code, _code_of(dtype), (), ()).total_bytes


def _header_len(num_layers: int, crcs_per_block: int) -> int:
    return _FIXED.size + 4 * num_layers + 4 * 2 * num_layers * crcs_per_block + _CRC.size


def validate(chunk: ChunkKV) -> tuple[int, int, int]:
    if not chunk.keys or len(chunk.keys) != len(chunk.values):
        raise ValueError("a chunk needs the same non-zero number of K and V tensors")
    shape = tuple(chunk.keys[0].shape)
    dtype = chunk.keys[0].dtype
    if len(shape) != 3 or shape[1] == 0:
        raise ValueError(f"KV tensors must be (n_kv_heads, T>0, head_dim), got {shape}")
    for t in (*chunk.keys, *chunk.values):
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError("all K/V tensors of a chunk must share shape and dtype")
    return shape  # type: ignore[return-value]


# Layout changes and dtype conversions run in numpy: single-threaded copies that release
# the GIL, so an I/O thread never competes with the model for torch's intra-op thread pool
# (small permute-copies through that pool cost milliseconds on a loaded 2-core machine).
def _bits(t: torch.Tensor) -> np.ndarray:
    """Numpy view of a float tensor's elements (bf16 as uint16 bits), any strides."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _tensor(a: np.ndarray, code: int) -> torch.Tensor:
    """Tensor over a C-contiguous numpy array of code's stored bits."""
    if code == _BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _to_f32(a: np.ndarray, code: int) -> np.ndarray:
    if code == _BF16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def _from_f32(x: np.ndarray, code: int) -> np.ndarray:
    """float32 -> code's bits, rounding to nearest even exactly like torch's ``.to()``."""
    if code != _BF16:
        with np.errstate(over="ignore"):  # overflow to inf is the intended rounding
            return x.astype(_DTYPES[code][3], copy=False)
    u = x.view(np.uint32)
    bits = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    bits[np.isnan(x)] = _BF16_NAN
    return bits


def _to_storage(t: torch.Tensor, code: int) -> tuple[memoryview, memoryview | None]:
    """Token-major bytes (T, H, D) of one (H, T, D) tensor in the storage dtype (+ int8 scales)."""
    src = _code_of(t.dtype)
    a = _bits(t)
    scales = None
    if code == _INT8:
        x = _to_f32(a, src)
        amax = np.abs(x).max(axis=1, keepdims=True)  # per (head, channel), over tokens
        scale = np.where(amax > 0, amax / _INT8_MAX, 1).astype("<f4")
        a = np.clip(np.rint(x / scale), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        scales = scale.reshape(-1).view(np.uint8).data
    elif code != src:
        a = _from_f32(_to_f32(a, src), code)
    return np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(-1).view(np.uint8).data, scales


def _crc(data: bytes | memoryview) -> int:
    """Low 32 bits of XXH3-64: 65 GB/s on a 196 KB layer here (CRC32C: 24 GB/s), 27 GB/s called per 6 KB page.

    It holds the GIL, for ~3 microseconds per layer; CRC32C releases it, but releasing it
    for every small page made two loader threads slower than one.
    """
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


def _page_crcs(data: memoryview, page_bytes: int) -> list[int]:
    return [_crc(data[i : i + page_bytes]) for i in range(0, len(data), page_bytes)]


def encode(chunk: ChunkKV, dtype: str | None = None, page_tokens: int = DEFAULT_PAGE_TOKENS, key: str = "") -> bytes:
    """Serialize a chunk bound to `key`. ``dtype``: keep (default), fp32, fp16, bf16 or int8."""
    if page_tokens <= 0:
        raise ValueError("page_tokens must be positive")
    n_heads, num_tokens, head_dim = validate(chunk)
    orig = _code_of(chunk.keys[0].dtype)
    code = dtype_code(dtype, chunk.keys[0].dtype)
    page_bytes = page_tokens * n_heads * head_dim * _DTYPES[code][2]
    body: list[memoryview] = []
    layer_crcs: list[int] = []
    page_crcs: list[int] = []
    for layer in range(chunk.num_layers):
        layer_body: list[memoryview] = []
        for t in (chunk.keys[layer], chunk.values[layer]):
            data, scales = _to_storage(t, code)
            if scales is not None:
                layer_body.append(scales)
                page_crcs.append(_crc(scales))
            layer_body.append(data)
            page_crcs.extend(_page_crcs(data, page_bytes))
        layer_crcs.append(_crc(b"".join(layer_body)))
        body.extend(layer_body)
    fixed = _FIXED.pack(
        MAGIC, CODEC_VERSION, 0,
        _header_len(chunk.num_layers, len(page_crcs) // (2 * chunk.num_layers)),
        chunk.num_layers, num_tokens, n_heads, head_dim, page_tokens, code, orig, 0, key_digest(key),
    )
    head = fixed + np.asarray(layer_crcs + page_crcs, dtype="<u4").tobytes()
    return b"".join([head, _CRC.pack(_crc(head)), *body])


def header_length(prefix: bytes | memoryview) -> int:
    """Total header length announced by the first bytes of an entry."""
    if len(prefix) < _FIXED.size:
        raise CodecError("truncated", f"entry is {len(prefix)} bytes, shorter than a header")
    magic, version, _, header_len = _FIXED.unpack_from(prefix)[:4]
    if magic != MAGIC:
        raise CodecError("bad_header", "not a kvcake entry (bad magic)")
    if version != CODEC_VERSION:
        raise CodecError("other_version", f"codec version {version}, this reader is {CODEC_VERSION}")
    return int(header_len)


def parse_header(buf: bytes | memoryview, key: str = "") -> Header:
    """Parse and verify the header of an entry read under `key`; ``buf`` must hold at least ``header_length(buf)`` bytes."""
    header_len = header_length(buf)
    if len(buf) < header_len:
        raise CodecError("truncated", "entry shorter than its header")
    fields = _FIXED.unpack_from(buf)
    layers, tokens, heads, head_dim, page_tokens, code, orig = fields[4:11]
    if (
        code not in _DTYPES or orig not in _DTYPES or orig == _INT8
        or min(layers, tokens, heads, head_dim, page_tokens) == 0
    ):
        raise CodecError("bad_header", "header fields out of range")
    stored_crc = _CRC.unpack_from(buf, header_len - _CRC.size)[0]
    if _crc(memoryview(buf)[: header_len - _CRC.size]) != stored_crc:
        raise CodecError("checksum", "header checksum mismatch")
    n_pages = -(-tokens // page_tokens)
    per_block = n_pages + (1 if code == _INT8 else 0)
    if header_len != _header_len(layers, per_block):
        raise CodecError("bad_header", "header length does not match its fields")
    if fields[12] != key_digest(key):
        raise CodecError("foreign_key", "the entry was written under another key")
    table = np.frombuffer(buf, dtype="<u4", count=layers + 2 * layers * per_block, offset=_FIXED.size).tolist()
    return Header(layers, tokens, heads, head_dim, page_tokens, code, orig, tuple(table[:layers]), tuple(table[layers:]))


def _check_pages(pages: memoryview, page_bytes: int, expected: Sequence[int], first_page: int, block: int) -> None:
    """Compare the CRCs of consecutive pages (numbered from `first_page`) with the stored ones.

    One list of CRCs and one comparison: the error text is built only on a mismatch, so
    the per-page work holding the GIL stays small and loader threads can overlap.
    """
    actual = _page_crcs(pages, page_bytes)
    if actual != list(expected):
        page = first_page + next(i for i, (a, e) in enumerate(zip(actual, expected)) if a != e)
        raise CodecError("checksum", f"checksum mismatch in page {page} of block {block}")


def _check(buf: memoryview, expected: int, what: str) -> None:
    if _crc(buf) != expected:
        raise CodecError("checksum", f"checksum mismatch in {what}")


def _private(buf: bytes | memoryview) -> memoryview:
    """A writable buffer the decoded tensors may view: `buf` itself, or one copy of immutable bytes."""
    view = memoryview(buf)
    return memoryview(bytearray(view)) if view.readonly else view


def _block_tensor(h: Header, buf: memoryview, offset: int, num_tokens: int, scales_offset: int | None) -> torch.Tensor:
    """(H, num_tokens, D) tensor of the token-major bytes of one block at `offset` of `buf`.

    A view of `buf` (``torch.frombuffer`` keeps it alive) except for int8, which is
    dequantized into a new tensor of the original dtype.
    """
    count = num_tokens * h.n_heads * h.head_dim
    if not h.is_int8:
        flat = torch.frombuffer(buf, dtype=_DTYPES[h.store_code][1], count=count, offset=offset)
        return flat.view(num_tokens, h.n_heads, h.head_dim).permute(1, 0, 2)
    assert scales_offset is not None
    values = np.frombuffer(buf, dtype=np.int8, count=count, offset=offset).reshape(num_tokens, h.n_heads, h.head_dim)
    scale = np.frombuffer(buf, dtype="<f4", count=h.n_heads * h.head_dim, offset=scales_offset).reshape(h.n_heads, h.head_dim)
    x = values.astype(np.float32) * scale
    return _tensor(_from_f32(x, h.orig_code), h.orig_code).permute(1, 0, 2)


def _whole_blocks(h: Header, buf: memoryview, offset: int, num_blocks: int) -> list[torch.Tensor]:
    """`num_blocks` consecutive whole blocks from `offset` of `buf`, each (H, T, D).

    Without int8 scales the blocks are one array: one ``frombuffer`` and one ``unbind``,
    so a 60-block entry costs a few microseconds of Python, not one call chain per block.
    """
    if h.is_int8:
        starts = [offset + index * h.block_bytes for index in range(num_blocks)]
        return [_block_tensor(h, buf, start + h.scale_bytes, h.num_tokens, start) for start in starts]
    count = num_blocks * h.num_tokens * h.n_heads * h.head_dim
    flat = torch.frombuffer(buf, dtype=_DTYPES[h.store_code][1], count=count, offset=offset)
    return list(flat.view(num_blocks, h.num_tokens, h.n_heads, h.head_dim).transpose(1, 2).unbind(0))


def _check_layer(h: Header, layer: int, layer_bytes: memoryview) -> None:
    if len(layer_bytes) < h.layer_bytes:
        raise CodecError("truncated", f"layer {layer} is shorter than its header says")
    _check(layer_bytes[: h.layer_bytes], h.layer_crcs[layer], f"layer {layer}")


def verify(buf: bytes | memoryview, key: str = "") -> Header:
    """Check a whole encoded entry read under `key` (header and every layer) without building tensors."""
    mv = memoryview(buf)
    h = parse_header(mv, key)
    _check_length(h, mv)
    _check_layers(h, mv)
    return h


def _check_layers(h: Header, mv: memoryview) -> None:
    for layer in range(h.num_layers):
        start = h.block_offset(2 * layer)
        _check_layer(h, layer, mv[start : start + h.layer_bytes])


def _check_length(h: Header, mv: memoryview) -> None:
    if len(mv) < h.total_bytes:
        raise CodecError("truncated", f"entry is {len(mv)} bytes, header says {h.total_bytes}")
    if len(mv) > h.total_bytes:
        raise CodecError("bad_header", f"entry is {len(mv)} bytes, header says {h.total_bytes}")


def decode(buf: bytes | memoryview, check: bool = True, key: str = "") -> ChunkKV:
    """Whole entry read under `key` -> ChunkKV; ``check=False`` only for bytes already passed to ``verify``.

    Tensors come back in the storage dtype chosen at encode time (the original dtype when
    it was ``keep``), as views of `buf` (see the module docstring); int8 entries are
    dequantized to the original dtype. fp32 kept as fp32 round-trips bit-exactly.
    """
    mv = _private(buf)
    h = parse_header(mv, key)
    _check_length(h, mv)
    if check:
        _check_layers(h, mv)
    blocks = _whole_blocks(h, mv, h.header_len, 2 * h.num_layers)
    return ChunkKV(keys=blocks[0::2], values=blocks[1::2])


def layer_range(h: Header, layer: int) -> tuple[int, int]:
    """Byte range of the K and V blocks of one layer (adjacent, so one range)."""
    start = h.block_offset(2 * layer)
    return start, start + h.layer_bytes


def decode_layer(h: Header, layer: int, buf: bytes | memoryview) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of a layer from the bytes of ``layer_range``, verified by the layer's CRC."""
    mv = _private(buf)
    _check_layer(h, layer, mv)
    keys, values = _whole_blocks(h, mv, 0, 2)
    return keys, values


def token_ranges(h: Header, start: int, end: int, layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Byte ranges a token-range read fetches: per block of `layers` (default all) [scales,] pages covering [start, end)."""
    p0, p1 = h.page_span(start, end)
    ranges = []
    for block in _blocks(h, layers):
        if h.is_int8:
            off = h.block_offset(block)
            ranges.append((off, off + h.scale_bytes))
        ranges.append(h.pages_range(block, p0, p1))
    return ranges


def decode_tokens(h: Header, start: int, end: int, parts: Sequence[bytes | memoryview], layers: Sequence[int] | None = None) -> ChunkKV:
    """ChunkKV of tokens [start, end) of `layers` (default all) from the parts fetched for ``token_ranges``; the pages read are verified."""
    p0, p1 = h.page_span(start, end)
    pages_len = (min(p1 * h.page_tokens, h.num_tokens) - p0 * h.page_tokens) * h.token_bytes
    page_bytes = h.page_tokens * h.token_bytes
    first_page_crc = 1 if h.is_int8 else 0
    step = 2 if h.is_int8 else 1
    tensors = []
    for index, block in enumerate(_blocks(h, layers)):
        pages = _private(parts[step * index + step - 1])
        base = h.crcs_per_block * block
        if len(pages) < pages_len:
            raise CodecError("truncated", f"block {block} is shorter than its header says")
        _check_pages(pages[:pages_len], page_bytes, h.crcs[base + first_page_crc + p0 : base + first_page_crc + p1], p0, block)
        offset = (start - p0 * h.page_tokens) * h.token_bytes
        if not h.is_int8:
            tensors.append(_block_tensor(h, pages, offset, end - start, None))
            continue
        scales = memoryview(parts[step * index])
        if len(scales) < h.scale_bytes:
            raise CodecError("truncated", f"scales of block {block} are shorter than its header says")
        _check(scales[: h.scale_bytes], h.crcs[base], f"scales of block {block}")
        joined = memoryview(bytearray(scales[: h.scale_bytes]) + pages)
        tensors.append(_block_tensor(h, joined, h.scale_bytes + offset, end - start, 0))
    return ChunkKV(keys=tensors[0::2], values=tensors[1::2])


def _blocks(h: Header, layers: Sequence[int] | None) -> list[int]:
    """K and V block numbers of `layers`, in order."""
    chosen = range(h.num_layers) if layers is None else layers
    return [block for layer in chosen for block in (2 * layer, 2 * layer + 1)]
