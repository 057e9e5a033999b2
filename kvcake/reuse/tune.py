"""CacheTune's online side: the token order stored with a document, and the recompute ratio chosen from measured costs.

A scored document entry holds its tokens sorted by offline score (highest first), so
recomputing a fraction r means recomputing its first ceil(r n) rows and loading the
rest, one contiguous byte range per layer. The order itself is stored next to it as a
one-layer entry whose K holds each row's original token index in base-128 digits (exact
in every storage dtype: fp16 and bf16 hold integers up to 256, int8's per-channel scale
is then 1) and whose V holds the score.

The ratio: per layer the compute side needs r N C_comp and the loader (1 - r) N C_io,
so r* = C_io / (C_io + C_comp) balances them; below `floor` quality drops, so
r = max(floor, r*). The costs per token come from this engine's own requests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator
from dataclasses import dataclass

import torch

from kvcake.reuse.documents import DocumentPlan, DocumentReuse, DocumentSettings
from kvcake.reuse.layers import LayerSource
from kvcake.reuse.scores import RULES, token_scores
from kvcake.reuse.selective import BlendPrefill
from kvcake.chunk import ChunkKV
from kvcake.model import CachePool, KVCache
from kvcake.model.segments import PromptLayout
from kvcake.reuse.cake import Waiting
from kvcake.reuse.contract import Filled, ReuseChoice
from kvcake.reuse.prefetch import PrefixPrefetch
from kvcake.reuse.prefix import PrefixReuse

ORDER_DIGITS = 3
ORDER_BASE = 128
MAX_DOCUMENT_TOKENS = ORDER_BASE**ORDER_DIGITS


def order_entry(order: torch.Tensor, scores: torch.Tensor) -> ChunkKV:
    """The stored form of a token order (original index per stored row) and its scores."""
    if len(order) > MAX_DOCUMENT_TOKENS:
        raise ValueError(f"a scored document holds at most {MAX_DOCUMENT_TOKENS} tokens, got {len(order)}")
    digits = torch.stack([(order // ORDER_BASE**i) % ORDER_BASE for i in range(ORDER_DIGITS)], dim=1).float()
    return ChunkKV([digits[None]], [scores.float().view(1, -1, 1).expand(1, -1, ORDER_DIGITS).contiguous()])


def order_from_entry(entry: ChunkKV) -> torch.Tensor:
    digits = entry.keys[0][0].float().round().long()
    return sum(digits[:, i] * ORDER_BASE**i for i in range(ORDER_DIGITS))


class TuneProfile:
    """Seconds per computed token and per loaded token, smoothed over this engine's tune requests."""

    def __init__(self, smoothing: float = 0.5):
        self.smoothing = smoothing
        self.compute_s_per_token: float | None = None
        self.io_s_per_token: float | None = None
        self._lock = threading.Lock()

    def record(self, compute_s: float, computed_tokens: int, io_s: float, loaded_tokens: int) -> None:
        with self._lock:
            if computed_tokens:
                self.compute_s_per_token = self._smooth(self.compute_s_per_token, compute_s / computed_tokens)
            if loaded_tokens:
                self.io_s_per_token = self._smooth(self.io_s_per_token, io_s / loaded_tokens)

    def ratio(self, floor: float) -> float:
        """max(floor, C_io / (C_io + C_comp)); the floor until both costs have been seen."""
        with self._lock:
            if not self.compute_s_per_token or self.io_s_per_token is None:
                return floor
            balanced = self.io_s_per_token / (self.io_s_per_token + self.compute_s_per_token)
            return min(1.0, max(floor, balanced))

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)


@dataclass(frozen=True)
class ScoredDocument:
    """A document in CacheTune's layout: `order[i]` is the original index of stored row i (highest score first).

    One computed in this request carries its sorted KV (`computed`) and its order entry
    (`stored_order`), both still to be stored under `key` and `order_key`."""

    key: str
    order_key: str
    order: torch.Tensor
    length: int
    computed: ChunkKV | None = None
    stored_order: ChunkKV | None = None


class TuneReuse(DocumentReuse):
    """CacheTune: recompute each document's top-scored tokens in every layer, load only the others' KV
    (the `Reuse` contract).

    The ratio is the request's, else `tune_ratio`, where `auto` follows this engine's measured
    costs (`profile`). No check pass: the stored order says which rows to recompute, so the
    loader reads one contiguous range per document and layer, and never the bytes of
    recomputed tokens.
    """

    def __init__(self, prefix: PrefixReuse, pool: CachePool, settings: DocumentSettings):
        super().__init__(prefix, pool, settings)
        if settings.tune_scoring not in RULES:
            raise ValueError(f"tune_scoring must be one of {', '.join(RULES)}, got {settings.tune_scoring!r}")
        self.profile = TuneProfile()

    @property
    def layout(self) -> str:  # type: ignore[override]
        """Documents scored by another rule are stored under another layout."""
        return f"scored-{self.settings.tune_scoring}"

    def ratio(self) -> float:
        """The ratio a request gets when it names none."""
        if self.settings.tune_ratio != "auto":
            return float(self.settings.tune_ratio)
        return self.profile.ratio(self.settings.tune_min_ratio)

    def plan(self, prompt: PromptLayout, choice: ReuseChoice) -> DocumentPlan:
        ratio = self.ratio() if choice.ratio is None else choice.ratio
        keys, order_keys = zip(*self._keys(choice.tenant, prompt.preamble, prompt.documents())) if prompt.document_spans else ((), ())
        stored = [self.store.contains(key) for key in keys]
        return DocumentPlan(prompt, self._plan_prefix(prompt, choice), list(keys), stored, ratio, order_keys=tuple(order_keys))

    def fill(self, plan: DocumentPlan, cache: KVCache, prefetched: PrefixPrefetch | None = None) -> Generator[None, None, Filled]:
        """Documents missing from the store are computed together, scored, sorted and queued for write-back."""
        prompt = plan.prompt
        documents = yield from self._scored(prompt.documents(), prompt.preamble, list(zip(plan.keys, plan.order_keys)), plan.stored)
        for document in documents:
            if document.computed is not None and document.stored_order is not None:
                self.writeback.submit(document.key, document.computed)
                self.writeback.submit(document.order_key, document.stored_order)
        stored_rows, row_from_store, row_document, reads = [], [], [], []
        for index, ((start, _), document) in enumerate(zip(prompt.document_spans, documents)):
            recomputed = self._recomputed_rows(plan.ratio, document.length)
            stored_rows.append(document.order[recomputed:] + start - prompt.prefix_length)
            row_from_store.append(torch.full((document.length - recomputed,), document.computed is None))
            row_document.append(torch.full((document.length - recomputed,), index))
            reads.append((document, recomputed))
        stored_tokens = torch.cat(stored_rows) if stored_rows else torch.empty(0, dtype=torch.long)
        from_store = torch.cat(row_from_store) if row_from_store else torch.empty(0, dtype=torch.bool)
        document_of = torch.cat(row_document) if row_document else torch.empty(0, dtype=torch.long)
        blender = BlendPrefill(self.model, 0.0, list(self.settings.check_layers), correction=self.settings.correction)
        all_layers = range(self.model.config.num_layers)
        filled, blend = yield from self._blend(plan, cache, prefetched, blender, self._source(reads), all_layers, stored_tokens, from_store, document_of)
        document_tokens = sum(d.length for d in documents)
        if not blend.fallback:
            sampled = blend.tokens_recomputed  # stored rows computed anyway: the offset correction's sample
            blend.tokens_recomputed = document_tokens - len(stored_tokens) + sampled
            blend.tokens_reused = len(stored_tokens) - sampled
            sampled_per_document = blend.recomputed_per_document + [0] * (len(documents) - len(blend.recomputed_per_document))
            blend.recomputed_per_document = [recomputed + sample for (_, recomputed), sample in zip(reads, sampled_per_document)]
            blend.tokens_per_document = [document.length for document in documents]
            computed_tokens = len(prompt.token_ids) - prompt.prefix_length - len(stored_tokens) + sampled
            self.profile.record(blend.compute_s, computed_tokens, blend.load_s, len(stored_tokens))
        blend.ratio, blend.mode, blend.document_tokens = plan.ratio, "tune", document_tokens
        blend.documents = len(documents)
        blend.documents_stored = sum(1 for d in documents if d.computed is None)
        blend.documents_computed = blend.documents - blend.documents_stored
        return filled

    def store_documents(
        self, documents: list[list[int]], preamble: tuple[int, ...], tenant: str
    ) -> Generator[Waiting | None, None, list[tuple[str, bool]]]:
        """Compute, score and store the documents not stored yet, pausing after every pass; each one's
        key and whether it was stored before."""
        keys = self._keys(tenant, preamble, documents)
        present = yield from self._claim([key for key, _ in keys])
        try:
            for document in (yield from self._scored(documents, preamble, keys, present)):
                if document.computed is not None and document.stored_order is not None:
                    self.store.put(document.key, document.computed)
                    self.store.put(document.order_key, document.stored_order)
        finally:
            self.in_flight.release(key for (key, _), stored in zip(keys, present) if not stored)
        return [(key, stored) for (key, _), stored in zip(keys, present)]

    def _keys(self, tenant: str, preamble: tuple[int, ...], documents: list[list[int]]) -> list[tuple[str, str]]:
        """Each document's (entry key, order key)."""
        return [(self.document_key(tenant, preamble, ids), self.document_key(tenant, preamble, ids, f"{self.layout}-order")) for ids in documents]

    def _scored(
        self,
        documents: list[list[int]],
        preamble: tuple[int, ...],
        keys: list[tuple[str, str]],
        present: list[bool],
    ) -> Generator[None, None, list[ScoredDocument]]:
        """Each document's (entry key, order key): its stored row order where both entries are there,
        else computed together (pausing after every pass), scored and sorted (`computed` and
        `stored_order` still to be stored)."""
        found: dict[int, ScoredDocument] = {}
        for index, ((key, order_key), ids, stored) in enumerate(zip(keys, documents, present)):
            entry = self.store.get(order_key) if stored else None
            if entry is not None and entry.num_tokens == len(ids):
                found[index] = ScoredDocument(key, order_key, order_from_entry(entry), len(ids))
        missing = [i for i in range(len(documents)) if i not in found]
        for index, plain in zip(missing, (yield from self.compute([documents[i] for i in missing], preamble))):
            scores = token_scores(plain.keys, plain.values, self.settings.tune_scoring)
            order = torch.argsort(scores, descending=True, stable=True)
            sorted_kv = ChunkKV([k[:, order] for k in plain.keys], [v[:, order] for v in plain.values])
            key, order_key = keys[index]
            found[index] = ScoredDocument(key, order_key, order, len(documents[index]), sorted_kv, order_entry(order, scores[order]))
        return [found[i] for i in sorted(found)]

    def _recomputed_rows(self, ratio: float, length: int) -> int:
        """ceil(ratio * length), rounded up to the store's page: the reused rows then start on a page
        boundary, so the store reads exactly their bytes (at most a page of tokens more is recomputed)."""
        wanted = math.ceil(ratio * length)
        if wanted == 0:
            return 0
        page = self.store.page_tokens
        return min(length, -(-wanted // page) * page)

    def _source(self, reads: list[tuple[ScoredDocument, int]]) -> LayerSource:
        """Per layer, rows [recomputed, length) of every scored document: only the KV that is reused."""
        heads, head_dim = self.model.config.num_kv_heads, self.model.config.head_dim

        def read_layer(layer: int) -> tuple[ChunkKV, int] | None:
            keys, values, nbytes = [torch.empty(heads, 0, head_dim)], [torch.empty(heads, 0, head_dim)], 0
            for document, recomputed in reads:
                if recomputed >= document.length:
                    continue
                if document.computed is not None:
                    keys.append(document.computed.keys[layer][:, recomputed:])
                    values.append(document.computed.values[layer][:, recomputed:])
                    continue
                got = self.store.get_tokens(document.key, recomputed, document.length, layers=[layer])
                if got is None:
                    return None
                keys.append(got.keys[0])
                values.append(got.values[0])
                nbytes += got.nbytes
            dtype = keys[-1].dtype
            return ChunkKV([torch.cat([k.to(dtype) for k in keys], dim=1)], [torch.cat([v.to(dtype) for v in values], dim=1)]), nbytes

        return read_layer
