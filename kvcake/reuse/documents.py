"""The document side of reuse: a prompt's documents from their stored KV, blended (CacheBlend).

A document is stored once, computed on its own after the prompt's preamble (K before
RoPE), so it serves any prompt with that preamble at any position. A document strategy
takes the exact prefix with Cake (through the prefix strategy it is given), then runs the
tokens after it through `BlendPrefill` with the documents' stored layers loading on
threads meanwhile. A layer that cannot be read mid-way makes it compute those tokens
instead, and the report says why. `TuneReuse` (kvcake.reuse.tune) shares this machinery.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvcake.reuse.layers import LayerPrefetcher, LayerSource
from kvcake.reuse.selective import BlendFallback, BlendPrefill
from kvcake.chunk import ChunkKV
from kvcake.model import CachePool, KVCache
from kvcake.model.segments import PromptLayout
from kvcake.reuse.cake import WAITING, PrefixReport, Strategy, Waiting
from kvcake.reuse.contract import DocumentReport, Filled, ReuseChoice
from kvcake.reuse.prefetch import PrefixPrefetch
from kvcake.reuse.prefix import PrefixPlan, PrefixReuse
from kvcake.reuse.inflight import InFlight


@dataclass(frozen=True, kw_only=True)
class DocumentSettings:
    """How documents are computed and blended: pass size, check layers, loader threads and their bound, how
    blend selects the tokens it recomputes and corrects the ones it reuses (see `BlendPrefill`), and each
    mechanism's own settings (its config fields), so every mechanism is built the same way."""

    prefill_chunk: int
    check_layers: tuple[int, ...]
    load_streams: int
    load_timeout_s: float | None
    selection: str
    correction: str
    blend_ratio: float
    tune_scoring: str
    tune_ratio: str
    tune_min_ratio: float


@dataclass(frozen=True)
class DocumentPlan:
    """A prompt with documents: its exact prefix's plan, each document's entry key and whether it is
    stored, and the ratio the documents are blended at.
    Tune plans also name the key of each document's stored row order."""

    prompt: PromptLayout
    prefix: PrefixPlan | None
    keys: list[str]
    stored: list[bool]
    ratio: float
    order_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class DocumentRows:
    """The one row order of a prompt's documents: every document's tokens, documents in prompt order.
    A layer read from the store (`LayerSource`) concatenates the documents in this order, and `BlendPrefill`
    takes these rows: per row its token index after the exact prefix, its document, and whether its KV
    comes from the store (else it was computed for this request)."""

    tokens: torch.Tensor
    document_of: torch.Tensor
    from_store: torch.Tensor

    @classmethod
    def of(cls, plan: DocumentPlan) -> DocumentRows:
        prompt = plan.prompt
        spans = [(start - prompt.prefix_length, end - prompt.prefix_length) for start, end in prompt.document_spans]
        if not spans:
            return cls(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.bool))
        return cls(
            torch.cat([torch.arange(start, end) for start, end in spans]),
            torch.cat([torch.full((end - start,), index) for index, (start, end) in enumerate(spans)]),
            torch.cat([torch.full((end - start,), present) for (start, end), present in zip(spans, plan.stored)]),
        )


class DocumentReuse:
    """What blend and tune share: the exact prefix, isolated document compute, the blended run."""

    layout = "plain"
    """The stored layout this strategy reads and writes (part of every document key)."""

    def __init__(self, prefix: PrefixReuse, pool: CachePool, settings: DocumentSettings):
        """`prefix` takes the exact prefix; its model, store, write-back queue and key rules serve the documents too."""
        self.prefix = prefix
        self.model, self.store, self.writeback, self.keys = prefix.model, prefix.store, prefix.writeback, prefix.keys
        self.pool = pool
        self.settings = settings
        self.in_flight = InFlight()
        """Document keys some warm call is computing now (identical calls at once compute once)."""

    def prefetch(self, prompt: PromptLayout, choice: ReuseChoice) -> PrefixPrefetch | None:
        """The exact prefix's stored chunks (taken with Cake); the documents load when the request runs."""
        if not prompt.prefix_length:
            return None
        return self.prefix.prefetch(_exact_prefix(prompt), ReuseChoice(choice.tenant, Strategy("cake")))

    def document_key(self, tenant: str, preamble: Sequence[int], token_ids: Sequence[int], layout: str | None = None) -> str:
        return self.keys.document(tenant, preamble, token_ids, layout or self.layout)

    def _claim(self, keys: list[str]) -> Generator[Waiting, None, list[bool]]:
        """Which of `keys` are stored, once no other call is computing any of them. A key another warm call
        is computing is waited for (pausing, so that call runs) and is then found stored: identical calls
        compute each document once. The missing keys stay this call's to compute until it releases them."""
        while not self.in_flight.claim_all(keys):
            yield WAITING
        present = [self.store.contains(key) for key in keys]
        self.in_flight.release(key for key, stored in zip(keys, present) if stored)
        return present

    def _plan_prefix(self, prompt: PromptLayout, choice: ReuseChoice) -> PrefixPlan | None:
        """The exact prefix before the documents, taken with Cake."""
        if not prompt.prefix_length:
            return None
        return self.prefix.plan(_exact_prefix(prompt), ReuseChoice(choice.tenant, Strategy("cake")))

    def compute(self, documents: list[list[int]], preamble: tuple[int, ...]) -> Generator[None, None, list[ChunkKV]]:
        """Documents' KV, each computed on its own after the preamble (K before RoPE); pauses after every pass.

        Each document starts `document_gap` positions after the preamble (less where the
        context would not hold it): in a real prompt other documents usually lie between
        the instructions and this one. K is stored before RoPE, so only this distance,
        not the absolute position, shapes the stored KV. The preamble is computed once;
        documents shorter than a pass are packed into passes of about `prefill_chunk`
        tokens, each attending only to the preamble and itself. A driver that stops at a
        pause (the client left) stops the work there.
        """
        pass_tokens = self.settings.prefill_chunk
        longest = max((len(d) for d in documents), default=0)
        cache = self.model.new_cache(len(preamble) + max(longest, pass_tokens), self.pool)
        results: list[ChunkKV] = []
        try:
            if preamble and documents:
                self.model.forward(torch.tensor(preamble), torch.arange(len(preamble)), cache)
            for batch in packs([len(d) for d in documents], pass_tokens):
                firsts = [self._document_start(len(preamble), len(documents[i])) for i in batch]
                if len(batch) == 1 and len(documents[batch[0]]) > pass_tokens:
                    outputs = [(yield from self._long_document(documents[batch[0]], firsts[0], cache))]
                else:
                    outputs = self.model.forward_isolated([documents[i] for i in batch], firsts, cache)
                    yield
                results.extend(output.to_cpu() for output in outputs)
        finally:
            cache.release()
        return results

    def _document_start(self, preamble_length: int, document_length: int) -> int:
        room = self.model.config.max_position_embeddings - preamble_length - document_length
        return preamble_length + max(0, min(self.keys.document_gap, room))

    def _long_document(self, document_ids: list[int], first_position: int, cache: KVCache) -> Generator[None, None, ChunkKV]:
        """A document longer than a pass, pass by pass after the preamble in `cache` (left as it was), pausing
        after every pass like any prefill, so a long document does not stall the requests beside it."""
        preamble_length = cache.length
        layers = self.model.config.num_layers
        keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        try:
            for _, out in self.model.forward_chunks(document_ids, cache, self.settings.prefill_chunk, first_position, keep_kv=True):
                for layer in range(layers):
                    keys[layer].append(out.kv.keys[layer])
                    values[layer].append(out.kv.values[layer])
                yield
        finally:
            cache.truncate(preamble_length)
        return ChunkKV([torch.cat(k, dim=1) for k in keys], [torch.cat(v, dim=1) for v in values])

    def _blend(
        self,
        plan: DocumentPlan,
        cache: KVCache,
        prefetched: PrefixPrefetch | None,
        blender: BlendPrefill,
        source: LayerSource,
        loaded_layers: range,
        stored_tokens: torch.Tensor,
        from_store: torch.Tensor,
        document_of: torch.Tensor | None = None,
    ) -> Generator[None, None, tuple[Filled, DocumentReport]]:
        """Start loading, fill the exact prefix, then blend; a failed layer read computes the rest instead.
        Pauses after every chunk of the prefix and every blended layer.

        `stored_tokens` are the indices (after the prefix) of the tokens `source` yields, in
        its row order; `from_store[i]` says whether row i comes from the store (else it was
        computed in this request), for the accounting; `document_of[i]` its document."""
        prompt = plan.prompt
        rest = torch.tensor(prompt.token_ids[prompt.prefix_length :], dtype=torch.long)
        positions = torch.arange(prompt.prefix_length, len(prompt.token_ids))
        settings = self.settings
        prefetcher = LayerPrefetcher(source, loaded_layers, streams=settings.load_streams, device=self.model.device, timeout_s=settings.load_timeout_s)
        try:
            prefix = PrefixReport() if plan.prefix is None else (yield from self.prefix.fill(plan.prefix, cache, prefetched)).prefix
            try:
                logits, blend = yield from blender.run(cache, rest, positions, stored_tokens, prefetcher, from_store, document_of)
            except BlendFallback as failure:
                logits = self.model.prefill(rest.tolist(), cache, settings.prefill_chunk, prompt.prefix_length)
                document_tokens = sum(end - start for start, end in prompt.document_spans)
                blend = DocumentReport(ratio=blender.ratio, document_tokens=document_tokens, tokens_recomputed=document_tokens, fallback=str(failure))
        finally:
            prefetcher.close()
        return Filled(logits, prefix, blend), blend


def _exact_prefix(prompt: PromptLayout) -> PromptLayout:
    return PromptLayout.plain(prompt.token_ids[: prompt.prefix_length])


def packs(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Consecutive indices grouped so each group's lengths sum to at most `budget` (a longer item alone)."""
    group: list[int] = []
    total = 0
    for index, length in enumerate(lengths):
        if group and total + length > budget:
            yield group
            group, total = [], 0
        group.append(index)
        total += length
    if group:
        yield group
