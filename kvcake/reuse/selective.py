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

Which tokens stay (`selection`): `deviation` ranks them by how far their fresh V at the
check layer lies from the stored V (CacheBlend); `question` by how much attention the
question (the tokens after the last document) pays them at the check layer, over every key
it sees, averaged over heads and question tokens and smoothed over a few neighbours;
`probe` by the same attention summed over the first half of the layers, from a pass of
only the tokens outside the documents over the stored KV before the blend (middle layers
locate the evidence better than early ones; the pass costs those tokens' share of half the
layers, and needs those layers loaded before the blend starts). Its scores exist before the
first layer, so `probe` selects there and computes no layer in full: every layer computes the
selected tokens and the rest of the prompt, and the two layers a check at layer 1 computes in
full go to more selected tokens at the same cost. The other tokens keep their stored K/V
from layer 0 on; at layer 0 that matches the fresh K/V (it depends on the token alone) as long
as the store keeps the model's dtype (its default; a `dtype=int8` or `fp16` store URL rounds it).
`correction = offset` shifts the stored K/V of the tokens that are not recomputed, per
document, layer and KV head, by the mean difference between fresh and stored K/V of an
evenly spaced sample of the document's tokens (every `OFFSET_STRIDE`-th, 3%), which stays
recomputed within the ratio (at ratio 0, and so for CacheTune, whose recomputed tokens are
not among the stored rows, the sample is computed besides them): a shared offset, what the
missing cross-attention moved. The
sample must be even: the selected tokens deviate most or matter most to the question, and
an offset taken from them moved the other tokens' K/V 1.3-3.5x further from fresh than no
correction (qwen2.5-0.5b, Disfl-QA prompts), where an even sample brought K to 0.28-0.87
and V to 0.56-1.08 of the uncorrected error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator

import torch
import torch.nn.functional as F

from kvcake.reuse.layers import LayerPrefetcher
from kvcake.chunk import ChunkKV
from kvcake.model import KVCache, Transformer
from kvcake.model.transformer import Mask, attend_with_mask, causal_mask
from kvcake.reuse.contract import DocumentReport


ATTENTION_BLOCK = 512
"""Active tokens attend in blocks of this many rows, as in a chunked prefill: a block only
reads the cache up to its last position (about half the attention work of all rows at
once over the whole cache), and one block's mask and scores exist at a time."""


SELECTIONS = ("deviation", "question", "probe")
CORRECTIONS = ("none", "offset")
QUESTION_SMOOTHING = 5
"""Tokens a question score is averaged over: the evidence is a span, and a span's middle tokens need their neighbours."""
OFFSET_STRIDE = 32
"""`offset` estimates each document's shift from every this-many-th of its tokens (from the 8th on, past the sink)."""
PROBE_DEPTH = 0.5
"""`probe` runs the tokens outside the documents through this share of the layers before the blend."""


class BlendFallback(RuntimeError):
    """Stored KV could not be read mid-blend; the caller computes the tokens instead."""


def layers_in_full(selection: str, check_layers: list[int] | tuple[int, ...]) -> int:
    """Layers a blend at 0 < ratio < 1 computes for every token: up to the first check layer, none for `probe`
    (whose scores exist before the first layer)."""
    return 0 if selection == "probe" else check_layers[0] + 1


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

    def __init__(self, model: Transformer, ratio: float, check_layers: list[int], selection: str = "deviation", correction: str = "none"):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"blend ratio must lie in [0, 1], got {ratio}")
        if selection not in SELECTIONS or correction not in CORRECTIONS:
            raise ValueError(f"blend selection must be one of {SELECTIONS} and correction one of {CORRECTIONS}, got {selection!r}, {correction!r}")
        if not check_layers or sorted(set(check_layers)) != list(check_layers):
            raise ValueError(f"check layers must be increasing and distinct, got {check_layers}")
        if check_layers[0] < 0 or check_layers[-1] >= model.config.num_layers:
            raise ValueError(f"check layers must lie in [0, {model.config.num_layers}), got {check_layers}")
        self.model = model
        self.ratio = ratio
        self.check_layers = check_layers
        self.selection = selection
        self.correction = correction

    def loaded_layers(self, num_doc_tokens: int) -> range:
        """The layers whose stored KV the blend reads: from the first check layer on (all of them at r = 0, none at r = 1)."""
        num_layers = self.model.config.num_layers
        if self.ratio == 0.0 or (self.selection == "probe" and self._checks(num_doc_tokens)):
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
        document_of: torch.Tensor | None = None,
    ) -> Generator[None, None, tuple[torch.Tensor, DocumentReport]]:
        """Append `token_ids` (at `positions`) to `cache`; returns the last token's logits.

        Pauses (``yield``) after every layer, so a scheduler can run other requests'
        work in between (the loader keeps loading); `compute_s` leaves the pauses out.

        `stored_tokens` are the indices of the tokens whose stored KV `prefetcher` yields,
        in the order of its rows, layer by layer over `loaded_layers`; the caller starts
        it as early as it can. Every other token is computed. The last token must not be
        stored. `from_store` marks the rows read from the store (default all; the others
        were computed in isolation for this request): reused ones count as `tokens_loaded`.
        `document_of[i]` is the document of stored row i (default: one document), the unit of
        the offset correction. Raises `BlendFallback` when a layer cannot be loaded; the cache
        is then left as it was (nothing committed). The report's `compute_share` is the
        token-layers computed over those of a full prefill of these tokens.
        """
        if bool((stored_tokens == len(token_ids) - 1).any()):
            raise ValueError("the last token must belong to the query, not to a document")
        device = self.model.device
        doc_tokens = stored_tokens.to(device)
        doc_row = torch.full((len(token_ids),), -1, dtype=torch.long, device=device)
        doc_row[doc_tokens] = torch.arange(len(doc_tokens), device=device)
        document_of = torch.zeros(len(doc_tokens), dtype=torch.long) if document_of is None else document_of
        checks = self._checks(len(doc_tokens))
        report = DocumentReport(
            ratio=self.ratio, check_layers=[] if self.selection == "probe" else list(checks), selection=self.selection, correction=self.correction, document_tokens=len(doc_tokens))
        first_loaded = self.loaded_layers(len(doc_tokens)).start
        started = time.perf_counter()
        waited_before = prefetcher.wait_s
        layers = self._layers(cache, token_ids, positions, doc_tokens, doc_row, document_of.to(device), checks, first_loaded, prefetcher, report)
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
        owner = document_of.cpu()
        documents = int(owner.max()) + 1 if len(owner) else 0
        report.tokens_per_document = torch.bincount(owner, minlength=documents).tolist()
        report.recomputed_per_document = torch.bincount(owner[~reused.cpu()], minlength=documents).tolist()
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
        document_of: torch.Tensor,
        checks: dict[int, int],
        first_loaded: int,
        prefetcher: LayerPrefetcher,
        report: DocumentReport,
    ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        model = self.model
        device = model.device
        positions = positions.to(device)
        slot = cache.reserve(positions)
        cos, sin = model.rope_tables(positions)
        sampled = _offset_sample(document_of) if self.correction == "offset" else torch.zeros(len(doc_tokens), dtype=torch.bool, device=device)
        if self.ratio > 0:
            active = torch.arange(len(token_ids), device=device)
        else:  # every stored token reused but the offset's sample (tune: the recomputed ones are not stored)
            computed = doc_row < 0
            computed[doc_tokens] = sampled
            active = computed.nonzero().squeeze(1)
        hidden = model.embed(token_ids.to(device)[active])
        mask = self._mask(cache, slot, positions, active)
        token_layers = 0
        held: dict[int, ChunkKV] = {}
        if self.selection == "probe" and checks:
            probe_scores, held, token_layers = yield from self._probe(cache, slot, token_ids, positions, doc_tokens, doc_row, prefetcher, cos, sin)
            keep = _top(active, doc_row, probe_scores.masked_fill(sampled, float("inf")), math.ceil(self.ratio * len(doc_tokens)))
            report.kept_per_check.append(int((doc_row[active[keep]] >= 0).sum()))
            active, hidden, checks = active[keep], hidden[keep], {}
            mask = self._mask(cache, slot, positions, active)
        for layer in range(model.config.num_layers):
            token_layers += len(active)
            q, k, v = model.qkv(layer, hidden)
            fresh_written = False
            if layer >= first_loaded:
                loaded = held.pop(layer) if layer in held else _checked(prefetcher, layer, len(doc_tokens))
                stored_keys, stored_values = loaded.keys[0].to(device), loaded.values[0].to(device)
                if self.correction == "offset" and len(doc_tokens):
                    rows = doc_row[active]
                    sample_rows = torch.where(rows >= 0, torch.where(sampled[rows.clamp(min=0)], rows, -1), -1)
                    stored_keys, stored_values = _shifted(stored_keys, stored_values, k, v, sample_rows, document_of)
                self._write(cache, layer, slot, doc_tokens, stored_keys, stored_values, cos, sin)
                if layer in checks:
                    self._write(cache, layer, slot, active, k, v, cos, sin)
                    fresh_written = True
                    if self.selection == "question":
                        scores = self._question_scores(cache, layer, slot, positions, active, doc_tokens, model.apply_rope(q, cos[active], sin[active]))
                    else:
                        rows = doc_row[active]
                        in_doc = rows >= 0
                        scores = torch.zeros(len(doc_tokens), device=device)
                        scores[rows[in_doc]] = token_deviation(k[:, in_doc], v[:, in_doc], stored_keys, stored_values, rows[in_doc])
                    keep = _top(active, doc_row, scores.masked_fill(sampled, float("inf")), checks[layer])
                    report.kept_per_check.append(int((doc_row[active[keep]] >= 0).sum()))
                    active, q, hidden = active[keep], q[:, keep], hidden[keep]
                    mask = self._mask(cache, slot, positions, active)
            if not fresh_written:
                self._write(cache, layer, slot, active, k, v, cos, sin)
            cached_k, cached_v = cache.layer(layer, slot.stop)
            rotated = model.apply_rope(q, cos[active], sin[active])
            attended = torch.cat([attend_with_mask(rotated[:, rows], cached_k[:, :end], cached_v[:, :end], block_mask) for rows, end, block_mask in mask])
            hidden = model.mlp(layer, model.attention_output(layer, attended, hidden))
            yield
        cache.commit(slot)
        report.compute_share = token_layers / (model.config.num_layers * len(token_ids))
        return active, hidden

    def _question_scores(
        self, cache: KVCache, layer: int, slot: slice, positions: torch.Tensor, active: torch.Tensor, doc_tokens: torch.Tensor, rotated_q: torch.Tensor
    ) -> torch.Tensor:
        """Per stored row: the attention the question's tokens (the active ones after the last document) pay it at
        `layer`, normalised over every key each sees, averaged over heads and question tokens, then smoothed over
        `QUESTION_SMOOTHING` neighbouring rows. Call after the layer's fresh K is in the cache."""
        question = (active > doc_tokens.max()).nonzero().squeeze(1)
        keys, _ = cache.layer(layer, slot.stop)
        weights = question_attention(rotated_q[:, question], keys, positions[active[question]], cache.positions[: slot.stop])
        return _smoothed(weights[slot.start + doc_tokens])

    def _probe(
        self,
        cache: KVCache,
        slot: slice,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        doc_tokens: torch.Tensor,
        doc_row: torch.Tensor,
        prefetcher: LayerPrefetcher,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Generator[None, None, tuple[torch.Tensor, dict[int, ChunkKV], int]]:
        """`probe` selection's pass: the tokens outside the documents through the first `PROBE_DEPTH` of the layers
        over the stored document KV (as naive reuse computes them), summing per stored row the attention the
        question pays it at each layer. Returns the smoothed scores, the layers it loaded (the blend reuses
        them) and the token-layers it computed; pauses after every layer. The slot's K/V it writes are all
        overwritten by the blend."""
        model = self.model
        device = model.device
        active = (doc_row < 0).nonzero().squeeze(1)
        question = (active > doc_tokens.max()).nonzero().squeeze(1)
        hidden = model.embed(token_ids.to(device)[active])
        mask = self._mask(cache, slot, positions, active)
        depth = max(1, round(PROBE_DEPTH * model.config.num_layers))
        scores = torch.zeros(len(doc_tokens), device=device)
        held: dict[int, ChunkKV] = {}
        for layer in range(depth):
            loaded = held[layer] = _checked(prefetcher, layer, len(doc_tokens))
            q, k, v = model.qkv(layer, hidden)
            self._write(cache, layer, slot, doc_tokens, loaded.keys[0].to(device), loaded.values[0].to(device), cos, sin)
            self._write(cache, layer, slot, active, k, v, cos, sin)
            rotated = model.apply_rope(q, cos[active], sin[active])
            keys, values = cache.layer(layer, slot.stop)
            scores += question_attention(rotated[:, question], keys, positions[active[question]], cache.positions[: slot.stop])[slot.start + doc_tokens]
            attended = torch.cat([attend_with_mask(rotated[:, rows], keys[:, :end], values[:, :end], block_mask) for rows, end, block_mask in mask])
            hidden = model.mlp(layer, model.attention_output(layer, attended, hidden))
            yield
        return _smoothed(scores), held, depth * len(active)

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


def _checked(prefetcher: LayerPrefetcher, layer: int, rows: int) -> ChunkKV:
    """The stored layer, holding one row per stored token; `BlendFallback` when it cannot be read or its rows do not match."""
    loaded = prefetcher.get(layer)
    if loaded is None:
        why = "did not arrive in time" if prefetcher.timed_out else "could not be read"
        raise BlendFallback(f"layer {layer} of the stored documents {why}")
    if loaded.num_tokens != rows:
        raise BlendFallback(f"layer {layer} of the stored documents holds {loaded.num_tokens} rows for {rows} stored tokens")
    return loaded


def question_attention(rotated_q: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Per key (Hkv, S, d after RoPE): the attention probability the queries (H, Tq, d after RoPE) give it, each
    query's softmax over the keys at or before its position, averaged over heads and queries: (S,)."""
    query = rotated_q.float()
    group = query.shape[0] // keys.shape[0]
    logits = query @ keys.float().repeat_interleave(group, dim=0).transpose(1, 2) * query.shape[-1] ** -0.5
    hidden_keys = key_positions[None, :] > query_positions[:, None]
    return logits.masked_fill(hidden_keys, float("-inf")).softmax(dim=-1).mean(dim=(0, 1))


def _offset_sample(document_of: torch.Tensor) -> torch.Tensor:
    """Per stored row: whether it belongs to its document's evenly spaced offset sample (every `OFFSET_STRIDE`-th row
    from row `OFFSET_STRIDE // 2` of the document on)."""
    starts = torch.ones_like(document_of, dtype=torch.bool)
    starts[1:] = document_of[1:] != document_of[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(document_of), device=document_of.device), 0), dim=0).values
    within = torch.arange(len(document_of), device=document_of.device) - first
    return (within >= OFFSET_STRIDE // 2) & ((within - OFFSET_STRIDE // 2) % OFFSET_STRIDE == 0)


def _smoothed(scores: torch.Tensor) -> torch.Tensor:
    """Each stored row's score averaged with its neighbours' (`QUESTION_SMOOTHING` rows)."""
    return F.avg_pool1d(scores[None, None], QUESTION_SMOOTHING, stride=1, padding=QUESTION_SMOOTHING // 2, count_include_pad=False)[0, 0]


def _top(active: torch.Tensor, doc_row: torch.Tensor, scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices into `active` of the tokens that stay: every non-document token and the `num_keep` active
    document tokens of highest score (`scores` per stored row)."""
    rows = doc_row[active]
    in_doc = (rows >= 0).nonzero().squeeze(1)
    order = scores[rows[in_doc]].argsort(descending=True)
    top = in_doc[order[: min(num_keep, len(in_doc))]]
    return torch.cat([(rows < 0).nonzero().squeeze(1), top]).sort().values


def _shifted(
    stored_keys: torch.Tensor, stored_values: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, document_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored K/V (per KV head, stored row, dim) moved, per document and KV head, by the mean difference between
    the fresh K/V (`keys`, `values` of the active tokens, whose stored rows are `rows`, -1 for none) and the stored
    K/V of that document's active rows; a document with no active row is left as stored."""
    fresh = (rows >= 0).nonzero().squeeze(1)
    if len(fresh) == 0:
        return stored_keys, stored_values
    stored_rows = rows[fresh]
    documents = document_of[stored_rows]
    count = torch.bincount(documents, minlength=int(document_of.max()) + 1).clamp(min=1).to(torch.float32)
    moved = []
    for fresh_kv, stored in ((keys, stored_keys), (values, stored_values)):
        gap = fresh_kv[:, fresh].float() - stored[:, stored_rows].float()
        total = torch.zeros(stored.shape[0], len(count), stored.shape[2], device=stored.device).index_add_(1, documents, gap)
        moved.append(stored + (total / count[None, :, None])[:, document_of].to(stored.dtype))
    return moved[0], moved[1]


def parse_check_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """The `blend_check_layers` setting: comma-separated, increasing layers of the model."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"blend_check_layers must be comma-separated layer numbers, got {text!r}") from None
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"blend_check_layers must be increasing layers in [0, {num_layers}), got {text!r}")
    return layers

