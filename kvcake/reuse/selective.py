"""Blended prefill (CacheBlend): reuse documents' stored KV anywhere in a prompt, recomputing a few tokens.

A document's KV was computed in isolation, so it lacks the attention to the text
before it. The layers before the first check layer are computed in full. At a check
layer every still-active token's K/V is recomputed and compared with the stored K/V;
the document tokens that deviate most (a fraction `ratio` of them), plus every token
that is not in a document (the query), stay active. Later layers compute only the
active tokens (Q/K/V, attention over the whole cache, MLP), scatter their fresh K/V
into the cache, and use the stored K/V (rotated at this prompt's positions) for the
rest. With several check layers the active set shrinks gradually.

ratio = 1 recomputes everything and loads nothing: exactly the full prefill.
ratio = 0 loads every layer of every document and computes only the query: the
stored caches concatenated, with no check pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import torch

from kvcake.reuse.layers import LayerPrefetcher
from kvcake.model import KVCache, Transformer
from kvcake.model.transformer import Mask, attend_with_mask, causal_mask
from kvcake.reuse.contract import BlendReport


ATTENTION_BLOCK = 512
"""Active tokens attend in blocks of this many rows, as in a chunked prefill: a block only
reads the cache up to its last position (about half the attention work of all rows at
once over the whole cache), and one block's mask and scores exist at a time."""


class BlendFallback(RuntimeError):
    """Stored KV could not be read mid-blend; the caller computes the tokens instead."""


def kept_fractions(ratio: float, num_checks: int) -> list[float]:
    """Fraction of document tokens kept at each check layer: from near 1 down to `ratio` (gradual filtering)."""
    return [ratio + (1.0 - ratio) * (num_checks - 1 - j) / num_checks for j in range(num_checks)]


def token_deviation(
    fresh_keys: torch.Tensor, fresh_values: torch.Tensor, stored_keys: torch.Tensor, stored_values: torch.Tensor, doc_rows: torch.Tensor
) -> torch.Tensor:
    """Squared distance per token between recomputed and stored V (K before RoPE is used as a tie-breaker).

    V carries no position, so its deviation is purely the missing cross-attention;
    that is the signal CacheBlend ranks by.
    """
    value_gap = (fresh_values.float() - stored_values[:, doc_rows].float()).pow(2).sum(dim=(0, 2))
    key_gap = (fresh_keys.float() - stored_keys[:, doc_rows].float()).pow(2).sum(dim=(0, 2))
    return value_gap + 1e-6 * key_gap


class BlendPrefill:
    """Runs the tokens after an exact prefix through every layer, blending stored document KV."""

    def __init__(self, model: Transformer, ratio: float, check_layers: list[int]):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"blend ratio must lie in [0, 1], got {ratio}")
        if not check_layers or sorted(set(check_layers)) != list(check_layers):
            raise ValueError(f"check layers must be increasing and distinct, got {check_layers}")
        if check_layers[0] < 0 or check_layers[-1] >= model.config.num_layers:
            raise ValueError(f"check layers must lie in [0, {model.config.num_layers}), got {check_layers}")
        self.model = model
        self.ratio = ratio
        self.check_layers = check_layers

    def loaded_layers(self, num_doc_tokens: int) -> range:
        """The layers whose stored KV the blend reads: from the first check layer on (all of them at r = 0, none at r = 1)."""
        num_layers = self.model.config.num_layers
        if self.ratio == 0.0:
            return range(num_layers)
        return range(min(self._checks(num_doc_tokens), default=num_layers), num_layers)

    def run(
        self,
        cache: KVCache,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        stored_tokens: torch.Tensor,
        prefetcher: LayerPrefetcher,
        from_store: torch.Tensor | None = None,
    ) -> Generator[None, None, tuple[torch.Tensor, BlendReport]]:
        """Append `token_ids` (at `positions`) to `cache`; returns the last token's logits.

        Pauses (``yield``) after every layer, so a scheduler can run other requests'
        work in between (the loader keeps loading); `compute_s` leaves the pauses out.

        `stored_tokens` are the indices of the tokens whose stored KV `prefetcher` yields,
        in the order of its rows, layer by layer over `loaded_layers`; the caller starts
        it as early as it can. Every other token is computed. The last token must not be
        stored. `from_store` marks the rows read from the store (default all; the others
        were computed in isolation for this request): reused ones count as `tokens_loaded`. Raises `BlendFallback` when a layer cannot be loaded; the cache is then
        left as it was (nothing committed).
        """
        if bool((stored_tokens == len(token_ids) - 1).any()):
            raise ValueError("the last token must belong to the query, not to a document")
        device = self.model.device
        doc_tokens = stored_tokens.to(device)
        doc_row = torch.full((len(token_ids),), -1, dtype=torch.long, device=device)
        doc_row[doc_tokens] = torch.arange(len(doc_tokens), device=device)
        report = BlendReport(ratio=self.ratio, check_layers=list(self.check_layers), document_tokens=len(doc_tokens))
        checks = self._checks(len(doc_tokens))
        first_loaded = self.loaded_layers(len(doc_tokens)).start
        started = time.perf_counter()
        waited_before = prefetcher.wait_s
        layers = self._layers(cache, token_ids, positions, doc_tokens, doc_row, checks, first_loaded, prefetcher, report)
        paused_s = 0.0
        while True:
            try:
                next(layers)
            except StopIteration as done:
                active, active_hidden = done.value
                break
            left = time.perf_counter()
            yield
            paused_s += time.perf_counter() - left
        report.load_wait_s = prefetcher.wait_s - waited_before
        report.compute_s = time.perf_counter() - started - report.load_wait_s - paused_s
        report.load_s, report.bytes_loaded = prefetcher.load_s, prefetcher.bytes_loaded
        report.tokens_recomputed = int((doc_row[active] >= 0).sum())
        report.tokens_reused = len(doc_tokens) - report.tokens_recomputed
        reused = torch.ones(len(doc_tokens), dtype=torch.bool, device=device)
        reused[doc_row[active][doc_row[active] >= 0]] = False
        stored = torch.ones_like(reused) if from_store is None else from_store.to(device)
        report.tokens_loaded = int((reused & stored).sum())
        return self.model.logits(active_hidden[-1:])[-1], report

    def _checks(self, num_doc_tokens: int) -> dict[int, int]:
        """Check layer -> number of document tokens kept there (none when nothing is dropped)."""
        if self.ratio in (0.0, 1.0) or num_doc_tokens == 0:
            return {}
        fractions = kept_fractions(self.ratio, len(self.check_layers))
        return {layer: math.ceil(f * num_doc_tokens) for layer, f in zip(self.check_layers, fractions)}

    def _layers(
        self,
        cache: KVCache,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        doc_tokens: torch.Tensor,
        doc_row: torch.Tensor,
        checks: dict[int, int],
        first_loaded: int,
        prefetcher: LayerPrefetcher,
        report: BlendReport,
    ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        model = self.model
        device = model.device
        positions = positions.to(device)
        slot = cache.reserve(positions)
        cos, sin = model.rope_tables(positions)
        active = torch.arange(len(token_ids), device=device) if self.ratio > 0 else (doc_row < 0).nonzero().squeeze(1)
        hidden = model.embed(token_ids.to(device)[active])
        mask = self._mask(cache, slot, positions, active)
        for layer in range(model.config.num_layers):
            q, k, v = model.qkv(layer, hidden)
            fresh_written = False
            if layer >= first_loaded:
                loaded = prefetcher.get(layer)
                if loaded is None:
                    why = "did not arrive in time" if prefetcher.timed_out else "could not be read"
                    raise BlendFallback(f"layer {layer} of the stored documents {why}")
                stored_keys, stored_values = loaded.keys[0].to(device), loaded.values[0].to(device)
                self._write(cache, layer, slot, doc_tokens, stored_keys, stored_values, cos, sin)
                if layer in checks:
                    keep = self._select(active, k, v, stored_keys, stored_values, doc_row, checks[layer])
                    report.kept_per_check.append(int((doc_row[active[keep]] >= 0).sum()))
                    self._write(cache, layer, slot, active, k, v, cos, sin)
                    fresh_written = True
                    active, q, hidden = active[keep], q[:, keep], hidden[keep]
                    mask = self._mask(cache, slot, positions, active)
            if not fresh_written:
                self._write(cache, layer, slot, active, k, v, cos, sin)
            cached_k, cached_v = cache.layer(layer, slot.stop)
            rotated = model.apply_rope(q, cos[active], sin[active])
            attended = torch.cat([attend_with_mask(rotated[:, rows], cached_k[:, :end], cached_v[:, :end], block_mask) for rows, end, block_mask in mask])
            hidden = hidden + model.attention_output(layer, attended)
            hidden = hidden + model.mlp(layer, hidden)
            yield
        cache.commit(slot)
        return active, hidden

    @staticmethod
    def _mask(cache: KVCache, slot: slice, positions: torch.Tensor, active: torch.Tensor) -> list[tuple[slice, int, Mask]]:
        """Per block of `ATTENTION_BLOCK` active rows: the rows, how much of the cache they can see
        (up to the last entry at or before their last position; all later ones are masked anyway),
        and the causal mask over that part."""
        query_positions, kv_positions = positions[active], cache.positions[: slot.stop]
        blocks = []
        for start in range(0, len(active), ATTENTION_BLOCK):
            rows = slice(start, start + ATTENTION_BLOCK)
            end = int((kv_positions <= query_positions[rows].max()).nonzero().max()) + 1
            blocks.append((rows, end, causal_mask(query_positions[rows], kv_positions[:end])))
        return blocks

    def _write(
        self,
        cache: KVCache,
        layer: int,
        slot: slice,
        rows: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> None:
        """Rotate `keys` at the positions of `rows` (indices into this slot) and write K/V there."""
        dtype = cache.keys[layer].dtype
        rotated = self.model.apply_rope(keys.to(dtype), cos[rows], sin[rows])
        cache.keys[layer].index_copy_(1, rows + slot.start, rotated)
        cache.values[layer].index_copy_(1, rows + slot.start, values.to(dtype))

    @staticmethod
    def _select(
        active: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        stored_keys: torch.Tensor,
        stored_values: torch.Tensor,
        doc_row: torch.Tensor,
        num_keep: int,
    ) -> torch.Tensor:
        """Indices into `active` of the tokens that stay: non-document tokens and the `num_keep` top deviating document tokens."""
        rows = doc_row[active]
        in_doc = (rows >= 0).nonzero().squeeze(1)
        deviation = token_deviation(keys[:, in_doc], values[:, in_doc], stored_keys, stored_values, rows[in_doc])
        order = deviation.argsort(descending=True)
        top = in_doc[order[: min(num_keep, len(in_doc))]]
        return torch.cat([(rows < 0).nonzero().squeeze(1), top]).sort().values


def parse_check_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """The `blend_check_layers` setting: comma-separated, increasing layers of the model."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"blend_check_layers must be comma-separated layer numbers, got {text!r}") from None
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"blend_check_layers must be increasing layers in [0, {num_layers}), got {text!r}")
    return layers

