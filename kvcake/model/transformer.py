"""A layer-wise decoder-only transformer (Llama, Qwen2, Mistral) written as explicit steps.

The steps are public because KV reuse needs them separately: K comes out of `qkv`
*before* RoPE (so a stored chunk can be placed at any position), RoPE is applied at
explicit positions, and `attend` lets any set of query tokens attend over any set of
KV tokens with a causal mask derived from their positions.

Shapes (one request, no batch dimension): hidden states `(T, hidden)`, queries
`(num_heads, T, head_dim)`, keys and values `(num_kv_heads, T, head_dim)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.attention.bias import causal_lower_right

from kvcake.chunk import ChunkKV
from kvcake.model import cpu_kernels
from kvcake.model.config import ModelConfig, RopeConfig
from kvcake.model.kv import CachePool, KVCache


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ForwardOutput:
    """Logits, and with `keep_kv` the chunk's own K/V (empty otherwise)."""

    logits: torch.Tensor
    kv: ChunkKV


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

PACKED_BATCH_HINT = 8
"""Rows oneDNN lays a packed weight out for. Measured on a 2-core EPYC (bf16, smollm2's shapes):
packed for 8 rows, a decode step of 1 row reads the weights 1.6x faster than unpacked, of 8 rows
2.1x, and a 256-token prefill chunk multiplies ~5% faster; packed for 1 or 256 rows is no better."""


def _onednn_packs(dtype: torch.dtype) -> bool:
    if _ONEDNN_LINEAR is None:
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A projection's weight as `linear` reads it fastest: on a CPU, oneDNN's blocked layout (an opaque
    tensor only `linear` can use); elsewhere the weight itself."""
    if weight.device.type != "cpu" or not _onednn_packs(weight.dtype):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, through oneDNN on a CPU build that has it (`weight` plain or from `pack_weight`).

    On a CPU, `F.linear` in float32 goes to the BLAS, which reads a weight matrix for one token at
    about a third of the memory's speed; oneDNN's kernel reads it twice as fast (decode) and
    multiplies 10-20% faster (prefill). Elsewhere (CUDA, a build without oneDNN, float16, which oneDNN multiplies only
    on CPUs with AVX512-FP16) it is `F.linear`.
    """
    if weight.is_mkldnn or (x.device.type == "cpu" and _onednn_packs(x.dtype)):
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x, weight, bias)``; through oneDNN in float32 and bfloat16, the sum is the product's epilogue
    (one pass fewer, rounded once; its float16 form needs instructions most CPUs lack)."""
    if x.device.type == "cpu" and _onednn_packs(x.dtype) and residual.dtype == x.dtype:
        return _ONEDNN_LINEAR.binary(x, residual, weight, bias, "add")
    return residual + linear(x, weight, bias)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 whatever the activation dtype, as the reference models do (on a CPU, in one pass)."""
    if cpu_kernels.layer_ops_apply(hidden, weight):
        return cpu_kernels.rms_norm(hidden, weight, eps)
    hidden32 = hidden.float()
    normed = hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_frequencies(inv_freq, rope)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3 scaling: long wavelengths slowed by `factor`, short kept, a smooth ramp between."""
    wavelengths = 2 * math.pi / inv_freq
    old_context = rope.original_max_position_embeddings
    ramp = (old_context / wavelengths - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    ramp = ramp.clamp(0.0, 1.0)
    return (1 - ramp) * inv_freq / rope.factor + ramp * inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Transformer:
    """Weights plus the per-layer math; owns no request state (that lives in `KVCache`)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.layers = [self._layer_weights(tensors, i) for i in range(config.num_layers)]
        self.embedding = self._take(tensors, "model.embed_tokens.weight")
        self.final_norm = self._take(tensors, "model.norm.weight")
        lm_head = tensors.get("lm_head.weight")
        self.lm_head = pack_weight(self.embedding if config.tie_word_embeddings or lm_head is None else self._move(lm_head))
        self.inv_freq = rope_inverse_frequencies(config.rope, config.head_dim).to(device)
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self._padded_rows: _PaddedRows | None = None
        """The last decode step's rows (`decode_batch`), whose float32 copy of their K/V the next step extends.
        One decoding thread per model (the server's compute thread): two would rebuild it at every step."""

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
        config = ModelConfig.from_folder(folder)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            tensors.update(load_file(path))
        return cls(config, tensors, torch.device(device), dtype)

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def _take(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"weight {name!r} missing from checkpoint")
        return self._move(tensors[name])

    def _projection(self, tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        missing = [name for name in names if name not in tensors]
        if missing:
            raise KeyError(f"weight {missing[0]!r} missing from checkpoint")
        return pack_weight(self._move(torch.cat([tensors[name] for name in names])))

    def _optional(self, tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor | None:
        if not all(name in tensors for name in names):
            return None
        return self._move(torch.cat([tensors[name] for name in names]))

    def _layer_weights(self, tensors: dict[str, torch.Tensor], index: int) -> LayerWeights:
        attn = f"model.layers.{index}.self_attn"
        mlp = f"model.layers.{index}.mlp"
        qkv_names = [f"{attn}.{p}_proj.weight" for p in "qkv"]
        gate_up_names = [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]
        return LayerWeights(
            input_norm=self._take(tensors, f"model.layers.{index}.input_layernorm.weight"),
            qkv=self._projection(tensors, qkv_names),
            qkv_bias=self._optional(tensors, [f"{attn}.{p}_proj.bias" for p in "qkv"]),
            o=self._projection(tensors, [f"{attn}.o_proj.weight"]),
            o_bias=self._optional(tensors, [f"{attn}.o_proj.bias"]),
            post_norm=self._take(tensors, f"model.layers.{index}.post_attention_layernorm.weight"),
            gate_up=self._projection(tensors, gate_up_names),
            gate_up_bias=self._optional(tensors, [f"{mlp}.gate_proj.bias", f"{mlp}.up_proj.bias"]),
            down=self._projection(tensors, [f"{mlp}.down_proj.weight"]),
            down_bias=self._optional(tensors, [f"{mlp}.down_proj.bias"]),
        )

    # ---- the steps ---------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids.to(self.device), self.embedding)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (T, head_dim) for the given absolute positions."""
        angles = positions.to(self.device).float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (H, T, d) rotated by the tables (T, d) of its tokens' positions."""
        if x.dim() == 3 and cos.shape == sin.shape == x.shape[1:] and cpu_kernels.layer_ops_apply(x, cos, sin):
            return cpu_kernels.rope(x, cos, sin)
        return x * cos + rotate_half(x) * sin

    def qkv(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalise and project: q (H, T, d), k (Hkv, T, d) before RoPE, v (Hkv, T, d)."""
        weights = self.layers[layer]
        normed = rms_norm(hidden, weights.input_norm, self.config.rms_norm_eps)
        projected = linear(normed, weights.qkv, weights.qkv_bias)
        q, k, v = projected.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        head_dim = self.config.head_dim
        num_tokens = hidden.shape[0]
        return (
            q.view(num_tokens, -1, head_dim).transpose(0, 1),
            k.view(num_tokens, -1, head_dim).transpose(0, 1),
            v.view(num_tokens, -1, head_dim).transpose(0, 1),
        )

    def attention_output(self, layer: int, attended: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream `hidden` plus the attention's output projection."""
        weights = self.layers[layer]
        return linear_add(attended, weights.o, weights.o_bias, hidden)

    def mlp(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream `hidden` plus the MLP's branch (norm, SwiGLU, down projection): the layer's output."""
        weights = self.layers[layer]
        normed = rms_norm(hidden, weights.post_norm, self.config.rms_norm_eps)
        gate_up = linear(normed, weights.gate_up, weights.gate_up_bias)
        if gate_up.dim() == 2 and cpu_kernels.layer_ops_apply(gate_up):
            activated = cpu_kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            activated = F.silu(gate) * up
        return linear_add(activated, weights.down, weights.down_bias, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return linear(normed, self.lm_head).float()

    # ---- composed passes -----------------------------------------------------------

    def layer_forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
        slot: slice,
        mask: Mask,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One layer for the tokens in cache slot `slot`, attending over the cache up to its end.

        Returns the new hidden states and the layer's K before RoPE, K after it, and V for these tokens. `hidden` may
        hold a padding row after the slot's tokens (`_padded_for_products`), which takes part in the row-wise steps only.
        """
        num_tokens = slot.stop - slot.start
        q, k, v = (x[:, :num_tokens] for x in self.qkv(layer, hidden))
        cos, sin = rope
        rotated_k = self.apply_rope(k, cos, sin)
        cache.write(layer, slot, rotated_k, v)
        cached_k, cached_v = cache.layer(layer, slot.stop)
        attended = attend_with_mask(self.apply_rope(q, cos, sin), cached_k, cached_v, mask)
        if hidden.shape[0] > num_tokens:
            attended = F.pad(attended, (0, 0, 0, hidden.shape[0] - num_tokens))
        hidden = self.attention_output(layer, attended, hidden)
        return self.mlp(layer, hidden), k, rotated_k, v

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        *,
        all_logits: bool = False,
        keep_kv: bool = False,
        rotated_keys: bool = False,
    ) -> ForwardOutput:
        """Run new tokens through every layer, appending their KV to `cache`.

        Logits are returned for the last token only unless `all_logits`; with `keep_kv`
        the chunk's own K and V are returned for storing: K before RoPE (a document, which
        is placed at other positions later), or after it with `rotated_keys` (a prefix
        chunk, which only ever sits at these positions).
        """
        slot = cache.reserve(positions.to(self.device))
        rope = self.rope_tables(positions)
        mask = causal_mask(cache.positions[slot], cache.positions[: slot.stop])
        hidden = self._padded_for_products(self.embed(token_ids))
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in range(self.config.num_layers):
            hidden, k, rotated_k, v = self.layer_forward(layer, hidden, rope, cache, slot, mask)
            if keep_kv:
                keys.append((rotated_k if rotated_keys else k).contiguous())
                values.append(v.contiguous())
        cache.commit(slot)
        num_tokens = len(token_ids)
        last = hidden[:num_tokens] if all_logits else hidden[num_tokens - 1 : num_tokens]
        return ForwardOutput(self.logits(last), ChunkKV(keys, values))

    def _padded_for_products(self, hidden: torch.Tensor) -> torch.Tensor:
        """A one-token pass's hidden state with a copy of its row after it, on a CPU whose products run in oneDNN.

        oneDNN multiplies a single row on another path than several (a matrix-vector product, whose sums run in
        another order for K >= 1536 in float32: smollm2's down projection), and a row's bits are the same for any
        number of rows from 2 up. A prompt's last token computed alone after a prefix hit thus gets the bits it has
        inside the full prefill's pass, so the exact modes stay exact to the bit; decode steps (`decode_batch`),
        whose bits nothing compares, stay one row."""
        if hidden.shape[0] != 1 or hidden.device.type != "cpu" or not _onednn_packs(hidden.dtype):
            return hidden
        return hidden.expand(2, -1).contiguous()

    def decode_batch(self, token_ids: torch.Tensor, positions: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """One new token for each of several sequences, each with its own cache: (B, vocab) logits.

        The projections and the MLP run on all B rows at once (on a CPU, a decode step
        reads every weight once whatever B is, so B sequences cost little more than one);
        attention runs per sequence over its own cache. Row i equals
        ``forward(token_ids[i:i+1], positions[i:i+1], caches[i])`` up to float rounding.
        """
        slots = [cache.reserve(positions[i : i + 1].to(self.device)) for i, cache in enumerate(caches)]
        masks = [causal_mask(cache.positions[slot], cache.positions[: slot.stop]) for cache, slot in zip(caches, slots)]
        lengths = [slot.stop for slot in slots]
        group = self.config.num_heads // self.config.num_kv_heads
        direct = all(mask is None for mask in masks) and cpu_kernels.supports(self.device, self.dtype, self.config.head_dim, group)
        kept, self._padded_rows = self._padded_rows, None
        padded = None if direct else _PaddedRows.for_step(kept, caches, slots, masks, self.dtype, self.config.num_layers)
        self._padded_rows = padded
        cos, sin = self.rope_tables(positions)
        hidden = self.embed(token_ids)
        for layer in range(self.config.num_layers):
            q, k, v = self.qkv(layer, hidden)
            rotated_q, rotated_k = self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin)
            if direct:
                keys, values = [cache.keys[layer] for cache in caches], [cache.values[layer] for cache in caches]
                attended = cpu_kernels.attend_rows(rotated_q, keys, values, lengths, rotated_k, v)
            else:
                attended = _attend_rows_in_torch(layer, caches, slots, masks, padded, rotated_q, rotated_k, v)
            hidden = self.mlp(layer, self.attention_output(layer, attended, hidden))
        for cache, slot in zip(caches, slots):
            cache.commit(slot)
        return self.logits(hidden)

    def forget_decode_rows(self) -> None:
        """Drop the last decode step's kept batch (`decode_batch`): its float32 K/V and its rows' caches."""
        self._padded_rows = None

    def forward_isolated(
        self, segments: Sequence[Sequence[int]], first_positions: Sequence[int], cache: KVCache
    ) -> list[ChunkKV]:
        """Several segments in one pass, each attending only to the cache (a shared preamble) and to itself.

        Segment i sits at positions first_positions[i], ...; returns its per-layer K (before
        RoPE) and V. The cache is left as it was: the segments are not appended to it.
        """
        lengths = [len(segment) for segment in segments]
        ids = torch.tensor([t for segment in segments for t in segment], dtype=torch.long)
        positions = torch.cat([torch.arange(first, first + n) for first, n in zip(first_positions, lengths)])
        owner = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(lengths)).to(self.device)
        slot = cache.reserve(positions.to(self.device))
        query_positions = cache.positions[slot]
        own = (owner[:, None] == owner[None, :]) & (query_positions[None, :] <= query_positions[:, None])
        mask = torch.cat([torch.ones(len(ids), slot.start, dtype=torch.bool, device=self.device), own], dim=1)
        rope = self.rope_tables(positions)
        hidden = self.embed(ids)
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        for layer in range(self.config.num_layers):
            hidden, k, _, v = self.layer_forward(layer, hidden, rope, cache, slot, mask)
            keys.append(list(k.split(lengths, dim=1)))
            values.append(list(v.split(lengths, dim=1)))
        return [ChunkKV([k[i].contiguous() for k in keys], [v[i].contiguous() for v in values]) for i in range(len(segments))]

    def forward_chunks(
        self, token_ids: Sequence[int], cache: KVCache, chunk_size: int, first_position: int = 0, *, keep_kv: bool = False
    ) -> Iterator[tuple[int, ForwardOutput]]:
        """Append tokens chunk by chunk at positions from `first_position`, each chunk attending to
        everything before it; yields (index of the chunk's first token, its output)."""
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        for start in range(0, len(ids), chunk_size):
            end = min(start + chunk_size, len(ids))
            positions = torch.arange(first_position + start, first_position + end)
            yield start, self.forward(ids[start:end], positions, cache, keep_kv=keep_kv)

    def prefill(self, token_ids: Sequence[int], cache: KVCache, chunk_size: int, first_position: int = 0) -> torch.Tensor:
        """Append tokens chunk by chunk; the last token's logits."""
        logits = None
        for _, out in self.forward_chunks(token_ids, cache, chunk_size, first_position):
            logits = out.logits
        if logits is None:
            raise ValueError("prefill needs at least one token")
        return logits[-1]

    def prompt_logprobs(self, token_ids: Sequence[int], chunk_size: int) -> Generator[None, None, list[torch.Tensor]]:
        """Per token after the first, the log-softmax that predicted it from the tokens before it;
        pauses (a bare ``yield``) after every chunk."""
        cache = self.new_cache(len(token_ids))
        rows: list[torch.Tensor] = []
        for start in range(0, len(token_ids) - 1, chunk_size):
            end = min(start + chunk_size, len(token_ids) - 1)
            out = self.forward(torch.tensor(token_ids[start:end]), torch.arange(start, end), cache, all_logits=True)
            rows.extend(torch.log_softmax(out.logits.float(), dim=-1))
            yield
        return rows

    def load_kv(self, cache: KVCache, chunk: ChunkKV, positions: torch.Tensor) -> None:
        """Place a stored chunk (K after RoPE, at these `positions`) into the cache: one copy per tensor."""
        slot = cache.reserve(positions.to(self.device))
        for layer in range(self.config.num_layers):
            cache.place(layer, slot, chunk.keys[layer], chunk.values[layer])
        cache.commit(slot)

    def new_cache(self, capacity: int, pool: CachePool | None = None) -> KVCache:
        """An empty cache for `capacity` tokens (more, rounded up, when its buffers come from `pool`)."""
        config = self.config
        if pool is not None:
            capacity = CachePool.rounded(capacity)
        return KVCache(config.num_layers, config.num_kv_heads, config.head_dim, capacity, self.device, self.dtype, pool)


@dataclass(frozen=True)
class TailCausal:
    """Causal mask of a chunk that is the tail of a contiguous cache: query i sees keys 0 .. i + (Tk - Tq).

    CUDA's flash kernel runs this form (lower-right causal) without a mask tensor, and a CPU
    `_attend_causal_cpu`; elsewhere the equivalent boolean mask `dense` is used.
    """

    dense: torch.Tensor


@dataclass(frozen=True)
class PrefixVisible:
    """Causal mask by position over keys whose positions increase: query i sees the first `counts[i]` keys (int64).
    The CPU kernel takes the counts; elsewhere the equivalent boolean mask `dense` is used."""

    dense: torch.Tensor
    counts: torch.Tensor


Mask = torch.Tensor | bool | TailCausal | PrefixVisible | None
"""What SDPA needs for a causal mask by positions: True = its built-in causal mask, None = none,
a `TailCausal` chunk, a `PrefixVisible` one, or a bool tensor."""


def causal_mask(q_positions: torch.Tensor, kv_positions: torch.Tensor) -> Mask:
    """The cheapest exact form of the mask `pos_kv <= pos_q`, decided once per chunk, not per layer."""
    if q_positions.numel() == kv_positions.numel() and torch.equal(q_positions, kv_positions) and _is_increasing_run(q_positions):
        return True
    if int(kv_positions.max()) <= int(q_positions.min()):
        return None
    dense = kv_positions[None, :] <= q_positions[:, None]
    if q_positions.numel() < kv_positions.numel() and torch.equal(kv_positions[-q_positions.numel() :], q_positions) and _is_increasing_run(kv_positions):
        return TailCausal(dense)
    if _is_sorted(kv_positions):
        return PrefixVisible(dense, torch.searchsorted(kv_positions, q_positions, right=True))
    return dense


def attend_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """q: (H, Tq, d); k, v: (Hkv, Tk, d) with H a multiple of Hkv (GQA). Returns (Tq, H * d)."""
    one_query = q.shape[1] == 1 and mask is None
    causal = mask is True or isinstance(mask, TailCausal)
    if cpu_kernels.applies(q, k, v):
        if isinstance(mask, PrefixVisible):
            return cpu_kernels.attend_causal(q, k, v, mask.counts)
        if causal or one_query:  # one token over all the keys: causal too, and the same bits as in a longer pass
            return cpu_kernels.attend_causal(q, k, v)
    if one_query and q.dtype != torch.float32 and q.device.type == "cpu":
        return _attend_one_query(q, k, v)
    if isinstance(mask, PrefixVisible):
        mask = mask.dense
    q, k, v = q[None], k[None], v[None]
    bf16_products = q.device.type == "cpu" and q.dtype == torch.bfloat16 and _ONEDNN_BF16
    if causal and bf16_products:
        out = _attend_causal_bf16_cpu(q, k, v)
    elif causal and q.device.type == "cpu" and _CPU_FLASH is not None:
        out = _attend_causal_cpu(q, k, v)
    elif bf16_products:
        out = _attend_bf16_cpu(q, k, v, mask)
    elif mask is True:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif isinstance(mask, TailCausal):
        out = _attend_tail(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[2], -1)


def _attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One bf16/fp16 decode token over all of k, v, computed in float32: on a CPU, SDPA's flash kernel
    in half precision takes 4-13x longer for a single query (0.7 ms at 1k keys, 2.4 ms at 4k), and
    half-precision products of these shapes 1.3-2x longer than converting the keys and values first."""
    out = F.scaled_dot_product_attention(q.float()[None], k.float()[None], v.float()[None], enable_gqa=True)
    return out[0].transpose(0, 1).reshape(1, -1).to(q.dtype)


def _attend_rows_in_torch(
    layer: int, caches: Sequence[KVCache], slots: list[slice], masks: list[Mask], padded: _PaddedRows | None,
    rotated_q: torch.Tensor, rotated_k: torch.Tensor, v: torch.Tensor,
) -> torch.Tensor:
    """`decode_batch`'s attention where the CPU kernel does not apply: each row's new K/V into its cache, then one
    padded batch (`padded`) or each row apart under its mask. Returns (B, H * d)."""
    for row, (cache, slot) in enumerate(zip(caches, slots)):
        cache.write(layer, slot, rotated_k[:, row : row + 1], v[:, row : row + 1])
    if padded is not None:
        return padded.attend(rotated_q, rotated_k, v, layer)
    return torch.cat([
        attend_with_mask(rotated_q[:, row : row + 1], *cache.layer(layer, slot.stop), mask)
        for row, (cache, slot, mask) in enumerate(zip(caches, slots, masks))
    ])


class _PaddedRows:
    """Several decode rows' caches as one float32 batch per layer, padded, for one SDPA call per layer; kept from
    one step to the next while the same caches decode, each step's new tokens written as one column.

    Half-precision decode attention on a CPU runs in float32 anyway (see `_attend_one_query`), so each row's keys
    and values were converted every layer of every step: in an 8-row step of short chats those 480 small copies
    took 18% of the step, and their cost is per call, not per byte. A batch keeps every layer's buffer: the rows'
    histories at its start left-aligned (`history`), then one column per step for all rows at once (attention
    does not depend on the order of the keys, whose positions are in their rotation), with room for
    `PADDED_ROWS_HEADROOM` steps. Half-precision batches over `PADDED_ROWS_BYTES` refill one buffer per layer
    every step instead; float32 rows, which need no conversion, use a batch only when it is kept (8 rows, 60
    tokens of context: 44.6 -> 40.2 ms per step; refilled at 1000 tokens it was slower than attending row by row).
    """

    def __init__(self, caches: Sequence[KVCache], lengths: list[int], num_layers: int):
        sample = caches[0].keys[0]
        self.history = torch.tensor(lengths, device=sample.device)
        self.column = max(lengths) - 1
        """The column of this step's tokens (in the first step, the longest history's last)."""
        self.kept = self.can_keep(caches[0], len(caches), max(lengths), num_layers)
        shape = (len(caches), sample.shape[0], max(lengths) + (PADDED_ROWS_HEADROOM if self.kept else 0), sample.shape[2])
        buffers = num_layers if self.kept else 1
        keys = [torch.empty(shape, dtype=torch.float32, device=sample.device) for _ in range(buffers)]
        values = [torch.empty(shape, dtype=torch.float32, device=sample.device) for _ in range(buffers)]
        for buffer in (*keys, *values):  # masked out, but must be finite: 0 x NaN is NaN
            for row, length in enumerate(lengths):
                buffer[row, :, length:] = 0
        self.keys, self.values = (keys, values) if self.kept else (keys * num_layers, values * num_layers)
        self.caches, self.lengths = list(caches), lengths
        self.truncations = [cache.truncations for cache in caches]
        self.filled = [False] * num_layers
        self.columns = torch.arange(shape[2], device=sample.device)
        self.mask = (self.columns[None, :] < self.history[:, None])[:, None, None, :]

    @classmethod
    def for_step(cls, kept: _PaddedRows | None, caches: Sequence[KVCache], slots: list[slice], masks: list[Mask],
                 dtype: torch.dtype, num_layers: int) -> _PaddedRows | None:
        """Several rows on a CPU, each attending to its whole cache (no mask): the batch `kept` from the last step
        if the same caches have each grown by this step's token only, else a new one (None where per-row attention
        applies: float32 rows whose batch could not be kept)."""
        if len(caches) < 2 or caches[0].keys[0].device.type != "cpu" or any(m is not None for m in masks):
            return None
        lengths = [slot.stop for slot in slots]
        if kept is not None and kept.extends(caches, slots):
            kept.next_step(lengths)
            return kept
        if dtype == torch.float32 and not cls.can_keep(caches[0], len(caches), max(lengths), num_layers):
            return None
        return cls(caches, lengths, num_layers)

    @staticmethod
    def can_keep(sample: KVCache, rows: int, longest: int, num_layers: int) -> bool:
        """Every layer's buffer for these rows fits `PADDED_ROWS_BYTES`."""
        kv_heads, _, head_dim = sample.keys[0].shape
        return 2 * rows * kv_heads * (longest + PADDED_ROWS_HEADROOM) * head_dim * 4 * num_layers <= PADDED_ROWS_BYTES

    def extends(self, caches: Sequence[KVCache], slots: list[slice]) -> bool:
        """The same caches, in the same order, each grown by this step's token only since the last step, and room."""
        if not self.kept or self.column + 1 >= self.keys[0].shape[2] or len(self.caches) != len(caches):
            return False
        rows = zip(self.caches, caches, slots, self.lengths, self.truncations)
        return all(old is new and slot.start == length and new.truncations == truncations for old, new, slot, length, truncations in rows)

    def next_step(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.column += 1
        added = (self.columns >= self.history.max()) & (self.columns <= self.column)
        self.mask = ((self.columns[None, :] < self.history[:, None]) | added[None, :])[:, None, None, :]

    def attend(self, rotated_q: torch.Tensor, rotated_k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """rotated_q, rotated_k, v: (H or Hkv, B, d), this step's token of each row, which the rows' caches also
        hold. Returns (B, H * d) in the queries' dtype."""
        keys, values = self.keys[layer], self.values[layer]
        if self.filled[layer]:
            keys[:, :, self.column] = rotated_k.transpose(0, 1)
            values[:, :, self.column] = v.transpose(0, 1)
        else:
            for row, (cache, length) in enumerate(zip(self.caches, self.lengths)):
                keys[row, :, :length].copy_(cache.keys[layer][:, :length])
                values[row, :, :length].copy_(cache.values[layer][:, :length])
            self.filled[layer] = self.kept
        used = self.column + 1
        queries = rotated_q.transpose(0, 1).unsqueeze(2).float()
        out = F.scaled_dot_product_attention(queries, keys[:, :, :used], values[:, :, :used], attn_mask=self.mask[..., :used], enable_gqa=True)
        return out.reshape(len(self.caches), -1).to(rotated_q.dtype)


PADDED_ROWS_BYTES = 256 << 20
PADDED_ROWS_HEADROOM = 64


def _attend_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TailCausal) -> torch.Tensor:
    """Lower-right causal attention: the flash kernel where it applies (CUDA, half precision), else the bool mask."""
    if q.is_cuda and torch.backends.cuda.can_use_flash_attention(torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, True)):
        bias = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=True)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

CAUSAL_GRID = 256
"""On a CPU, a query attends to the keys before the multiple of this many tokens at or below its position apart
from the keys after it (`_attend_causal_cpu`)."""


def _attend_causal_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a prefill pass on a CPU where `cpu_kernels`' kernel does not apply (float16, bfloat16
    where the CPU has no bf16 instructions, float32 without AVX-512 or a compiler): q (1, H, Tq, d) are the last Tq
    of the Tk tokens of k, v (1, Hkv, Tk, d), each attending to itself and the tokens before it.

    SDPA's CPU flash kernel runs at ~120 GFLOP/s with a mask, which it first turns into a float bias (an extra pass
    over Tq x Tk); unmasked, with each KV head's query heads stacked into one longer query (GQA without copying
    K/V), at ~155. So each query attends to the keys before its grid line (`CAUSAL_GRID`) unmasked and stacked, and
    to the keys from that line to the next with a small mask (padded to the cell), and the two softmaxes are joined
    by their log-sum-exps. Both parts depend only on the query's position, never on where its pass starts or ends,
    so a token's result is the same whatever was loaded before it (to the bit from 4 queries per cell on, within a
    few float32 ulps below that, as with SDPA's own mask): the exact modes stay exact.
    """
    num_queries = q.shape[2]
    first = k.shape[2] - num_queries
    cells = []
    row = 0
    while row < num_queries:
        line = (first + row) // CAUSAL_GRID * CAUSAL_GRID
        end = min(num_queries, line + CAUSAL_GRID - first)
        cell_q, cell_k, cell_v = q[:, :, row:end], k[:, :, : first + end], v[:, :, : first + end]
        cells.append(_attend_first_cell(cell_q, cell_k, cell_v) if line == 0 else _attend_grid_cell(cell_q, cell_k, cell_v, line))
        row = end
    if len(cells) == 1:
        return cells[0].to(q.dtype)
    return torch.cat([cell.float() for cell in cells], dim=2).to(q.dtype)


def native_bf16_cpu() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 prefills ~1.5x faster than
    float32 at the answers' quality of bf16-trained models; without it bf16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


_ONEDNN_BF16 = torch.backends.mkldnn.is_available() and native_bf16_cpu()
"""oneDNN multiplies bfloat16 with the CPU's own bf16 instructions (it emulates them elsewhere)."""

SCORE_BLOCK_BYTES = 16 << 20
"""At most this many bytes of bfloat16 scores at once in the bf16 attention (their softmax as much again; a 32k
context's cell would otherwise hold 150 MB); at 6k tokens, blocks of 4-16 MB run at the same speed."""


def _attend_causal_bf16_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a bfloat16 prefill pass on a CPU whose oneDNN multiplies bfloat16 natively; shapes as
    `_attend_causal_cpu`.

    SDPA's CPU flash kernel multiplies half precision through MKL, which on this machine (AMD, AVX512-BF16)
    converts to float32 and runs at the float32 rate (~145 GFLOP/s, the same as in float32); oneDNN's bfloat16
    matmul runs at 300-420. So the scores are one matmul per grid cell (`CAUSAL_GRID`) over the keys up to the
    cell's end (`_attend_bf16_block`), the keys after each query filled with -inf: a 2k prefill 18% faster, a 6k
    one 28%. A query's row covers the keys up to the end of its cell, and the keys after it add
    exact zeros; a pass that ends inside a cell has its keys padded with zeros to the cell's end, so every query
    of a cell sums over the same keys and its result does not depend on where its pass starts or ends (for
    passes of two or more tokens: a single token goes to `_attend_one_query`).
    """
    heads, num_queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
    total = k.shape[2]
    first = total - num_queries
    cell_end = -(-total // CAUSAL_GRID) * CAUSAL_GRID
    scaled_q, keys, values = _bf16_operands(q, k, v, cell_end)
    positions = torch.arange(cell_end, device=q.device)
    out = torch.empty(heads, num_queries, head_dim, dtype=q.dtype, device=q.device)
    row = 0
    while row < num_queries:
        line = (first + row) // CAUSAL_GRID * CAUSAL_GRID
        seen = line + CAUSAL_GRID
        end = min(num_queries, seen - first, row + _rows_in_budget(heads, seen, q.element_size()))
        future = positions[line:seen][None, :] > positions[first + row : first + end, None]
        out[:, row:end] = _attend_bf16_block(scaled_q[:, row:end], keys[:, :seen], values[:, :seen], future)
        row = end
    return out[None]


def _attend_bf16_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Attention of bfloat16 queries under a boolean mask `allowed` (Tq, Tk) or none, on a CPU whose oneDNN
    multiplies bfloat16 natively (why: `_attend_causal_bf16_cpu`); q (1, H, Tq, d), k, v (1, Hkv, Tk, d)."""
    heads, num_queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
    scaled_q, keys, values = _bf16_operands(q, k, v, k.shape[2])
    out = torch.empty(heads, num_queries, head_dim, dtype=q.dtype, device=q.device)
    step = _rows_in_budget(heads, k.shape[2], q.element_size())
    for row in range(0, num_queries, step):
        end = min(num_queries, row + step)
        hidden = None if allowed is None else ~allowed[row:end]
        out[:, row:end] = _attend_bf16_block(scaled_q[:, row:end], keys, values, hidden)
    return out[None]


def _bf16_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled queries (H, Tq, d); keys less the first key and values (Hkv, length, d), zeros after the Tk given.

    Subtracting one key from every key shifts each query's scores by one constant, which softmax ignores, and
    takes away what all keys share (Qwen2's key bias makes it large), so the bfloat16 rounding of the scores
    (as in Hugging Face's eager attention) is relative to their differences: on qwen2.5-1.5b the next-token KL
    to float32 is 0.0078 without it and 0.00053 with it, as with the flash kernel (0.00050).
    """
    keys, values = k[0], v[0]
    centred = torch.empty((keys.shape[0], length, keys.shape[2]), dtype=keys.dtype, device=keys.device)
    torch.sub(keys, keys[:, :1], out=centred[:, : keys.shape[1]])
    centred[:, keys.shape[1] :] = 0
    if length > values.shape[1]:
        values = F.pad(values, (0, 0, 0, length - values.shape[1]))
    return q[0] * q.shape[3] ** -0.5, centred, values


def _rows_in_budget(heads: int, num_keys: int, itemsize: int) -> int:
    """Query rows whose scores over `num_keys` keys fit `SCORE_BLOCK_BYTES`."""
    return max(1, SCORE_BLOCK_BYTES // (heads * num_keys * itemsize))


def _attend_bf16_block(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """q (H, n, d) over keys, values (Hkv, Tk, d), each KV head's query heads stacked into one product; `hidden`
    (n, m) marks keys a query must not see among the last m. Returns (H, n, d)."""
    heads, num_queries, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(kv_heads, group * num_queries, head_dim), keys.transpose(1, 2))
    if hidden is not None:
        scores.view(kv_heads, group, num_queries, -1)[..., scores.shape[-1] - hidden.shape[1] :].masked_fill_(hidden, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).view(heads, num_queries, head_dim)


def _attend_first_cell(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Queries before the first grid line (the last of the keys): nothing lies before the line, so SDPA itself,
    as cheap there, in the input's precision."""
    num_queries, total = q.shape[2], k.shape[2]
    if num_queries == total:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    key_positions = torch.arange(total, device=q.device)
    dense = key_positions[None, :] <= key_positions[total - num_queries :, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)


def _attend_grid_cell(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, line: int) -> torch.Tensor:
    """Queries that all lie between grid line `line` (> 0) and the next (the last of the keys), in float32."""
    heads, num_queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    near_k, near_v = _grid_cell_keys(k, line, group), _grid_cell_keys(v, line, group)
    first_row = total - num_queries - line
    out_near, lse_near = _CPU_FLASH(q.float(), near_k, near_v, attn_mask=_causal_bias(q.device)[first_row : first_row + num_queries])[:2]
    stacked = q.reshape(1, kv_heads, group * num_queries, head_dim)
    out_far, lse_far = _CPU_FLASH(stacked, k[:, :, :line], v[:, :, :line])[:2]
    lse_far = lse_far.reshape(1, heads, num_queries, 1)
    lse_near = lse_near.reshape(1, heads, num_queries, 1)
    joint = torch.logaddexp(lse_far, lse_near)
    joined = out_far.reshape(1, heads, num_queries, head_dim).float() * (lse_far - joint).exp()
    return joined.add_(out_near * (lse_near - joint).exp())


def _grid_cell_keys(k: torch.Tensor, line: int, group: int) -> torch.Tensor:
    """The cell's keys (or values) from `line`, one copy per query head, in float32, padded with zeros to the
    whole cell (masked out), so every query's sum runs over the same length."""
    cell = k[:, :, line : line + CAUSAL_GRID].float().repeat_interleave(group, dim=1)
    if cell.shape[2] == CAUSAL_GRID:
        return cell
    return F.pad(cell, (0, 0, 0, CAUSAL_GRID - cell.shape[2]))


_CAUSAL_BIAS: dict[torch.device, torch.Tensor] = {}


def _causal_bias(device: torch.device) -> torch.Tensor:
    """(CAUSAL_GRID, CAUSAL_GRID) float32: 0 on and below the diagonal, -inf above."""
    if device not in _CAUSAL_BIAS:
        index = torch.arange(CAUSAL_GRID, device=device)
        _CAUSAL_BIAS[device] = torch.zeros(CAUSAL_GRID, CAUSAL_GRID, device=device).masked_fill_(index[None, :] > index[:, None], float("-inf"))
    return _CAUSAL_BIAS[device]


def _is_sorted(positions: torch.Tensor) -> bool:
    """Positions never decrease, so the keys a query sees by position are a prefix of them."""
    return positions.numel() < 2 or bool((positions[1:] >= positions[:-1]).all())


def _is_increasing_run(positions: torch.Tensor) -> bool:
    """True when positions are p, p+1, ..., so SDPA's built-in causal mask is exactly ours."""
    if positions.numel() < 2:
        return True
    return bool((positions[1:] - positions[:-1] == 1).all())
