"""The prefix side of reuse: a prompt's exact prefix by compute, load, Cake or split:M.

The plan finds the longest stored run of the prompt's prefix chunks; the fill schedules
those chunks by the request's strategy (`PrefixPrefill`), computes the rest of the prompt
and queues its computed full chunks for write-back. Only chunks that end before the last
prompt token are reused, since the first token's logits need that token computed.

The tokens after the last full chunk (the tail: the end of a document and the question)
are stored too, in `TAIL_BLOCK`-token blocks chained to that chunk like chunks to each
other. A later prompt that shares the chunks and part of the tail (the same document,
another question; the next turn of a short chat) loads the blocks they share and
computes only what differs, as a prefix cache with small blocks does, while chunks stay
the unit that is scheduled by Cake and stored in bulk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator
from dataclasses import dataclass

import torch

from kvcake.chunk import ChunkKV
from kvcake.model import KVCache, Transformer
from kvcake.model.segments import PromptLayout
from kvcake.reuse.contract import ALONE, ALONE_PASS_TOKENS, PACE, Alone, Filled, Pace, ReuseChoice
from kvcake.reuse.inflight import InFlight
from kvcake.reuse.prefetch import ByteBudget, PrefixPrefetch
from kvcake.reuse.cake import WAITING, ChunkLoader, CostProfile, PrefixPrefill, PrefixReport, Strategy, Waiting
from kvcake.reuse.writeback import WriteBack
from kvcake.store import TAIL_BLOCK, KeyRules, KVStore

PREFETCHING = ("cake", "load")
"""Strategies that use chunks loaded while the request waited (the others fix their own split)."""


@dataclass(frozen=True)
class PrefixPlan:
    """A prompt's tokens, the keys of its full chunks (head first), and how many leading
    reusable chunks the store holds, to be taken by `strategy`; then the keys of its tail's
    blocks (after the last full chunk, head first)."""

    token_ids: list[int]
    keys: list[str]
    num_stored: int
    strategy: Strategy
    tail_keys: list[str] = dataclasses.field(default_factory=list)

    def entries(self, chunk_size: int) -> list[tuple[str, int, int]]:
        """(key, first token, end token) of every entry the prompt's K/V is stored as: full chunks, then tail blocks."""
        tail_start = len(self.keys) * chunk_size
        chunks = [(key, index * chunk_size, (index + 1) * chunk_size) for index, key in enumerate(self.keys)]
        blocks = [(key, tail_start + index * TAIL_BLOCK, tail_start + (index + 1) * TAIL_BLOCK) for index, key in enumerate(self.tail_keys)]
        return chunks + blocks


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
        tail_keys = self.keys.prefix_tail(choice.tenant, token_ids, keys)
        return PrefixPlan(token_ids, keys, self.store.stored_prefix(reusable), choice.prefix, tail_keys)

    def prefetch(self, prompt: PromptLayout, choice: ReuseChoice) -> PrefixPrefetch | None:
        """A loader of the prompt's stored chunks for a request that waits its turn (run it on an I/O thread)."""
        if choice.prefix.name not in PREFETCHING:
            return None
        plan = self.plan(prompt, choice)
        return PrefixPrefetch(self._loader(plan.keys), plan.num_stored, self.prefetch_budget) if plan.num_stored else None

    def fill(self, plan: PrefixPlan, cache: KVCache, prefetched: PrefixPrefetch | None = None) -> Generator[Waiting | Pace | None, Alone | None, Filled]:
        """The stored chunks by the plan's strategy, then the rest computed; pauses after every computed chunk or pass.

        Chunks `prefetched` while the request waited are used as loaded (Cake, load). Chunks another
        request is computing right now are waited for and then loaded (see `_after_identical_work`)."""
        plan = yield from self._after_identical_work(plan)
        chain = plan.keys + plan.tail_keys
        claimed = self.in_flight.claim_free(chain[plan.num_stored :])
        try:
            num_stored = plan.num_stored
            ready = prefetched.take_back(num_stored) if prefetched is not None and plan.strategy.name in PREFETCHING else {}
            prefix = PrefixPrefill(self.model, self.chunk_size, plan.token_ids, self._loader(plan.keys), self.profile)
            report = yield from prefix.steps(cache, num_stored, plan.strategy, ready)
            self._load_tail(plan, cache, report)
            logits, computed = yield from self._compute_rest(plan, cache, report)
            computed.update({plan.keys[index]: kv for index, kv in prefix.computed_kv.items()})
            written, claimed = claimed, []
            self.writeback.submit_chain(chain, computed, lambda: self.in_flight.release(written))
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

    def _load_tail(self, plan: PrefixPlan, cache: KVCache, report: PrefixReport) -> None:
        """Place the stored blocks of the prompt's tail that end before its last token: only after every
        full chunk was reused (the blocks follow the last one) and by a strategy that loads. A block that
        fails to load ends the run; the tokens from it on are computed."""
        layers = self.model.config.num_layers
        tail_start = len(plan.keys) * self.chunk_size
        if plan.strategy.name == "compute" or plan.num_stored < len(plan.keys) or cache.length != tail_start:
            return
        reusable = plan.tail_keys[: (len(plan.token_ids) - 1 - tail_start) // TAIL_BLOCK]
        started = time.perf_counter()
        for key in reusable[: self.store.stored_prefix(reusable)]:
            block = self.store.get(key)
            if block is None or block.num_layers != layers or block.num_tokens != TAIL_BLOCK:
                break
            self.model.load_kv(cache, block, torch.arange(cache.length, cache.length + TAIL_BLOCK))
            report.bytes_loaded += block.nbytes
            report.tail_tokens_loaded += TAIL_BLOCK
        report.load_s += time.perf_counter() - started
        report.tokens_loaded += report.tail_tokens_loaded

    def _compute_rest(
        self, plan: PrefixPlan, cache: KVCache, report: PrefixReport
    ) -> Generator[Pace | None, Alone | None, tuple[torch.Tensor, dict[str, ChunkKV]]]:
        """Compute the tokens after the cache: the last token's logits, and the K/V of the stored entries
        (full chunks, tail blocks) the computed tokens make up, by key.

        Passes are `prefill_chunk` tokens (several store chunks at once, when it is larger), or
        `ALONE_PASS_TOKENS` after the scheduler answered the last pause with `ALONE`; they are cut
        at multiples of that size from position 0, so every pass holds whole chunks, and each pass's
        K/V is cut into entries. Tokens that take more than one configured pass ask (`PACE`) how
        long the first may be. A token's K/V does not depend on the pass it is in (the runner's
        products and attention are row-invariant for passes of two or more rows, and a one-token
        pass is padded to two), so exact modes stay exact whatever the scheduler sends. A trailing
        partial block is never stored, so its K/V is not kept. Pauses after each pass; its compute
        time goes to `report.compute_s`.
        """
        entries = plan.entries(self.chunk_size)
        alone_pass = max(self.prefill_chunk, ALONE_PASS_TOKENS // self.prefill_chunk * self.prefill_chunk)
        logits = None
        computed: dict[str, ChunkKV] = {}
        start, end, pass_tokens = cache.length, len(plan.token_ids), self.prefill_chunk
        if end - start > self.prefill_chunk:
            pass_tokens = alone_pass if (yield PACE) is ALONE else self.prefill_chunk
        while start < end:
            stop = min(end, (start // pass_tokens + 1) * pass_tokens)
            started = time.perf_counter()
            ids, positions = torch.tensor(plan.token_ids[start:stop]), torch.arange(start, stop)
            inside = [(key, first, last) for key, first, last in entries if start <= first and last <= stop]
            out = self.model.forward(ids, positions, cache, keep_kv=bool(inside), rotated_keys=True)
            for key, first, last in inside:
                computed[key] = ChunkKV([k[:, first - start : last - start] for k in out.kv.keys], [v[:, first - start : last - start] for v in out.kv.values])
            logits = out.logits
            report.compute_s += time.perf_counter() - started
            start = stop
            pass_tokens = alone_pass if (yield) is ALONE else self.prefill_chunk
        assert logits is not None
        return logits[-1], computed
