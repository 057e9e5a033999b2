"""The prefix side of reuse: a prompt's exact prefix by compute, load, Cake or split:M.

The plan finds the longest stored run of the prompt's prefix chunks; the fill schedules
those chunks by the request's strategy (`PrefixPrefill`), computes the rest of the prompt
and queues its computed full chunks for write-back. Only chunks that end before the last
prompt token are reused, since the first token's logits need that token computed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import torch

from kvcake.chunk import ChunkKV
from kvcake.model import KVCache, Transformer
from kvcake.model.segments import PromptLayout
from kvcake.schedule.contract import Filled, ReuseChoice
from kvcake.schedule.inflight import InFlight
from kvcake.schedule.prefetch import ByteBudget, PrefixPrefetch
from kvcake.schedule.prefix import WAITING, ChunkLoader, CostProfile, PrefixPrefill, PrefixReport, Strategy, Waiting
from kvcake.schedule.writeback import WriteBack
from kvcake.store import KeyRules, KVStore

PREFETCHING = ("cake", "load")
"""Strategies that use chunks loaded while the request waited (the others fix their own split)."""


@dataclass(frozen=True)
class PrefixPlan:
    """A prompt's tokens, the keys of its full chunks (head first), and how many leading
    reusable chunks the store holds, to be taken by `strategy`."""

    token_ids: list[int]
    keys: list[str]
    num_stored: int
    strategy: Strategy


class PrefixReuse:
    """Exact reuse of a prompt's stored prefix (the `Reuse` contract over `PrefixPlan`)."""

    def __init__(
        self,
        model: Transformer,
        store: KVStore,
        writeback: WriteBack,
        keys: KeyRules,
        prefill_chunk: int,
        profile: CostProfile,
        prefetch_budget: ByteBudget,
    ):
        self.model = model
        self.store = store
        self.writeback = writeback
        self.keys = keys
        self.chunk_size = keys.chunk_size
        self.prefill_chunk = prefill_chunk
        self.profile = profile
        self.prefetch_budget = prefetch_budget
        self.in_flight = InFlight()
        """Chunk keys some request is computing or writing back now (identical prompts at once compute once)."""

    def plan(self, prompt: PromptLayout, choice: ReuseChoice) -> PrefixPlan:
        """The whole of `prompt.token_ids` as an exact prefix."""
        token_ids = prompt.token_ids
        keys = self.keys.prefix_chunks(choice.tenant, token_ids)
        reusable = keys[: (len(token_ids) - 1) // self.chunk_size]
        return PrefixPlan(token_ids, keys, self.store.stored_prefix(reusable), choice.prefix)

    def prefetch(self, prompt: PromptLayout, choice: ReuseChoice) -> PrefixPrefetch | None:
        """A loader of the prompt's stored chunks for a request that waits its turn (run it on an I/O thread)."""
        if choice.prefix.name not in PREFETCHING:
            return None
        plan = self.plan(prompt, choice)
        return PrefixPrefetch(self._loader(plan.keys), plan.num_stored, self.prefetch_budget) if plan.num_stored else None

    def fill(self, plan: PrefixPlan, cache: KVCache, prefetched: PrefixPrefetch | None = None) -> Generator[Waiting | None, None, Filled]:
        """The stored chunks by the plan's strategy, then the rest computed; pauses after every computed chunk or pass.

        Chunks `prefetched` while the request waited are used as loaded (Cake, load). Chunks another
        request is computing right now are waited for and then loaded (see `_after_identical_work`)."""
        plan = yield from self._after_identical_work(plan)
        claimed = self.in_flight.claim_free(plan.keys[plan.num_stored :])
        try:
            num_stored = plan.num_stored
            ready = prefetched.take_back(num_stored) if prefetched is not None and plan.strategy.name in PREFETCHING else {}
            prefix = PrefixPrefill(self.model, self.chunk_size, plan.token_ids, self._loader(plan.keys), self.profile)
            report = yield from prefix.steps(cache, num_stored, plan.strategy, ready)
            logits, computed = yield from self._compute_rest(plan, cache, report)
            computed.update({plan.keys[index]: kv for index, kv in prefix.computed_kv.items()})
            written, claimed = claimed, []
            self.writeback.submit_chain(plan.keys, computed, lambda: self.in_flight.release(written))
        finally:
            self.in_flight.release(claimed)
        return Filled(logits, report)

    def _after_identical_work(self, plan: PrefixPlan) -> Generator[Waiting, None, PrefixPlan]:
        """The plan once no other request is computing chunks it could load: identical cold prompts (eight
        clients asking the same long question at once) compute their shared prefix once. While another
        request computes or writes back such chunks this one pauses (so the other runs), then finds them
        stored. A strategy that loads nothing (compute) does not wait."""
        reusable = plan.keys[: (len(plan.token_ids) - 1) // self.chunk_size]
        if plan.strategy.name == "compute" or not self.in_flight.any_of(reusable[plan.num_stored :]):
            return plan
        while self.in_flight.any_of(reusable[plan.num_stored :]):
            yield WAITING
        return dataclasses.replace(plan, num_stored=self.store.stored_prefix(reusable))

    def _loader(self, keys: list[str]) -> ChunkLoader:
        """Reads chunk `index` of `keys`; an entry of another shape (layers, tokens) is a miss."""
        layers = self.model.config.num_layers

        def load(index: int) -> ChunkKV | None:
            chunk = self.store.get(keys[index])
            if chunk is None or chunk.num_layers != layers or chunk.num_tokens != self.chunk_size:
                return None
            return chunk

        return load

    def _compute_rest(
        self, plan: PrefixPlan, cache: KVCache, report: PrefixReport
    ) -> Generator[None, None, tuple[torch.Tensor, dict[str, ChunkKV]]]:
        """Compute the tokens after the cache: the last token's logits, and the full chunks' K/V by key (to store).

        Passes are `prefill_chunk` tokens (several store chunks at once, when it is larger),
        cut at multiples of it from position 0 whatever was reused, so a token is always
        computed in the same pass shape as in a full prefill; each pass's K/V is cut into
        store chunks. The trailing partial chunk is never stored, so its K/V is not kept.
        Pauses after each pass; its compute time goes to `report.compute_s`.
        """
        chunk_size = self.chunk_size
        full_end = len(plan.keys) * chunk_size
        logits = None
        computed: dict[str, ChunkKV] = {}
        first = plan.num_stored * chunk_size
        assert cache.length == first, "the stored chunks fill the cache up to the first computed token"
        for start, end in passes(first, len(plan.token_ids), self.prefill_chunk):
            started = time.perf_counter()
            ids, positions = torch.tensor(plan.token_ids[start:end]), torch.arange(start, end)
            stored_end = min(end, full_end)
            out = self.model.forward(ids, positions, cache, keep_kv=stored_end > start, rotated_keys=True)
            if stored_end > start:
                keys_by_chunk = zip(*(k[:, : stored_end - start].split(chunk_size, dim=1) for k in out.kv.keys))
                values_by_chunk = zip(*(v[:, : stored_end - start].split(chunk_size, dim=1) for v in out.kv.values))
                for offset, (chunk_keys, chunk_values) in enumerate(zip(keys_by_chunk, values_by_chunk)):
                    computed[plan.keys[start // chunk_size + offset]] = ChunkKV(list(chunk_keys), list(chunk_values))
            logits = out.logits
            report.compute_s += time.perf_counter() - started
            yield
        assert logits is not None
        return logits[-1], computed


def passes(first: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, end) of each prefill pass over tokens first..end, cut at multiples of `step` from position 0."""
    start = first
    while start < end:
        stop = min(end, (start // step + 1) * step)
        yield start, stop
        start = stop
