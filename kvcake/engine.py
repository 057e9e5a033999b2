"""One request from text to tokens: plan the prompt, pick a reuse strategy, fill the cache, decode, account.

The mechanisms live below, each behind the `Reuse` contract (kvcake.reuse.contract):
`PrefixReuse` (compute, load, Cake, split:M) and the document mechanisms that
`kvcake.modes` lists (blend, tune). The engine builds one of each, routes each request to one, and decodes.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Generator, Sequence
from typing import Any

import torch

from kvcake.config import ConfigError, KvcakeConfig
from kvcake.model import CachePool, KVCache, Sampler, Transformer, load_model, resolve_device, resolve_dtype, weights_identity
from kvcake.model.segments import PromptLayout
from kvcake.requests import (
    DecodeStep,
    GenerateRequest,
    GenerateResult,
    RequestMetrics,
    RequestPlanner,
    Step,
    WarmRequest,
    Work,
    parse_reuse,
)
from kvcake.runtime import keep_freed_memory
from kvcake.reuse import (
    ALONE, PACE, PREFIX, WAIT_S, WAITING, ByteBudget, CostProfile, DocumentSettings, PrefixPrefetch, PrefixReuse, Reuse,
    ReuseChoice, Waiting, WriteBack, document_mode, document_strategies, drain, parse_check_layers, route,
)
from kvcake.store import KeyRules, KVStore, StoreStats, model_fingerprint, open_store


@dataclasses.dataclass(frozen=True)
class EngineStats:
    store: StoreStats
    writeback_pending: int
    """Computed chunks queued or being written to the store."""
    writeback_dropped: int
    """Computed chunks never written because the write-back queue was full."""


class Engine:
    def __init__(self, config: KvcakeConfig, store: KVStore | None = None):
        self.config = config
        self.default_reuse = parse_reuse(config.reuse)
        keep_freed_memory()
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        self.model, self.tokenizer, self.model_folder = load_model(config.model, config.cache_path(), device, dtype)
        model_config = self.model.config
        self.context_length = model_config.max_position_embeddings
        self.fingerprint = model_fingerprint(model_config.as_dict(), weights_identity(self.model_folder), str(dtype))
        self.planner = RequestPlanner(
            self.tokenizer, model_config.vocab_size, self.context_length, config.separator, config.max_documents, config.blend_ratio
        )
        self.store = store if store is not None else open_store(config.effective_store_url())
        # room for a warm call of max_documents scored documents (two entries each) besides prefixes' chains
        self.writeback = WriteBack(self.store, max_pending=256 + 2 * config.max_documents)
        self.cache_pool = CachePool(int(config.kv_pool_gb * 1e9))
        keys = KeyRules(self.fingerprint, config.chunk_size, config.document_gap, config.shared_documents)
        budget = ByteBudget(int(config.prefetch_gb * 1e9))
        profile = CostProfile()
        profile.calibrate(self.model, config.prefill_chunk)
        self.prefix = PrefixReuse(self.model, self.store, self.writeback, keys, config.prefill_chunk, profile, budget)
        try:
            check_layers = parse_check_layers(config.blend_check_layers, model_config.num_layers)
            settings = DocumentSettings(
                prefill_chunk=config.prefill_chunk, check_layers=check_layers, load_streams=config.load_streams,
                load_timeout_s=config.load_timeout_s, selection=config.blend_selection, correction=config.blend_correction,
                blend_ratio=config.blend_ratio, tune_scoring=config.tune_scoring, tune_ratio=config.tune_ratio,
                tune_min_ratio=config.tune_min_ratio,
            )
            documents = {mode: mechanism(self.prefix, self.cache_pool, settings) for mode, mechanism in document_strategies().items()}
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.strategies: dict[str, Reuse[Any]] = {PREFIX: self.prefix, **documents}
        """The routing table: `route` names the row a request goes to."""
        self._closer = weakref.finalize(self, _shut_down, self.writeback, self.store, self.cache_pool, self.model, config.shutdown_grace_s)

    def close(self) -> None:
        """Write back what is pending (within `shutdown_grace_s`), close the store and drop the pooled cache
        memory; once only. An engine left open is closed the same way at interpreter exit. (FastAPI keeps
        endpoints, and so a server's engine, in a process-wide cache: a closed engine must not hold its KV.)"""
        self._closer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Wait until every computed chunk queued for the store has been written."""
        self.writeback.flush()

    def stats(self) -> EngineStats:
        """The store's counters and the write-back queue's state, for an operator's view."""
        return EngineStats(self.store.stats(), self.writeback.pending, self.writeback.dropped)

    def map_read_buffers(self) -> int:
        """Map the store's read buffers for a whole context of prefix chunks now (within the buffer pool's
        bound); the bytes mapped. For a server starting up: fresh memory costs a page fault per 4 KiB, and the
        first 6k-token load of a restarted fp32 server spent ~0.6 s of its ~0.95 s faulting in the buffers it
        read into (0.35 s with them mapped first; a later load takes ~0.2)."""
        model_config = self.model.config
        chunk_shape = (model_config.num_layers, model_config.num_kv_heads, self.config.chunk_size, model_config.head_dim)
        return self.store.map_read_buffers(chunk_shape, self.model.dtype, self.context_length // self.config.chunk_size)

    def idle(self) -> None:
        """Nothing runs: let go of what only the next decode step would use (the kept decode batch)."""
        self.model.forget_decode_rows()

    def decode(self, steps: Sequence[DecodeStep]) -> torch.Tensor:
        """The next token's logits for each of several requests' pending decode steps, in one forward: (B, vocab)."""
        token_ids = torch.tensor([step.token_id for step in steps])
        positions = torch.tensor([step.position for step in steps])
        return self.model.decode_batch(token_ids, positions, [step.cache for step in steps])

    def plan_prompt(self, request: GenerateRequest) -> PromptLayout:
        return self.planner.plan(request)

    def check(self, request: GenerateRequest) -> PromptLayout:
        """Raise `RequestError` now for what `run` would refuse; else the planned prompt."""
        return self.planner.check(request)

    def strategy(self, request: GenerateRequest, planned: PromptLayout) -> tuple[Reuse[Any], ReuseChoice]:
        """The strategy a request's prompt goes to, and what it asked of it. Blend and tune take
        the exact prefix with Cake; without documents their prompt is all exact prefix."""
        mode = parse_reuse(request.reuse) if request.reuse else self.default_reuse
        tenant = self.config.tenant if request.tenant is None else request.tenant
        row, choice = route(mode, tenant, request.ratio, bool(planned.document_spans))
        return self.strategies[row], choice

    def prefetch_prefix(self, request: GenerateRequest, planned: PromptLayout | None = None) -> PrefixPrefetch | None:
        """For a request that waits its turn: a loader of its stored prefix chunks (run it on an I/O thread)."""
        planned = self.plan_prompt(request) if planned is None else planned
        strategy, choice = self.strategy(request, planned)
        return strategy.prefetch(planned, choice)

    def generate(self, request: GenerateRequest) -> GenerateResult:
        token_ids: list[int] = []
        first_logits = None
        finish_reason = "length"
        metrics = RequestMetrics()
        for step in self.stream(dataclasses.replace(request, n=1), metrics):
            token_ids.append(step.token_id)
            first_logits = step.logits if first_logits is None else first_logits
            finish_reason = step.finish_reason or finish_reason
        assert first_logits is not None
        return GenerateResult(self.tokenizer.decode(token_ids), token_ids, finish_reason, first_logits, metrics)

    def stream(
        self, request: GenerateRequest, metrics: RequestMetrics, prefetched: PrefixPrefetch | None = None, planned: PromptLayout | None = None
    ) -> Generator[Step, bool | None, None]:
        """`run` driven alone (every decode step a batch of this request's row only, every pause answered `ALONE`):
        its tokens, choice after choice. Sending True after a step ends that step's choice (a stop sequence)."""
        work = self.run(request, metrics, prefetched, planned)
        reply: Any = None
        try:
            while True:
                with torch.inference_mode():
                    item = work.send(reply)
                    if isinstance(item, DecodeStep):
                        reply = self.model.decode_batch(torch.tensor([item.token_id]), torch.tensor([item.position]), [item.cache])[0]
                        continue
                if item is WAITING:
                    time.sleep(WAIT_S)
                reply = ALONE if item is None or item is PACE else None if item is WAITING else (yield item)
        except StopIteration:
            return
        finally:
            work.close()

    def run(
        self, request: GenerateRequest, metrics: RequestMetrics, prefetched: PrefixPrefetch | None = None, planned: PromptLayout | None = None
    ) -> Generator[Work, Any, None]:
        """The request as a coroutine a scheduler drives (see `Work`): prefill, then every choice's tokens.

        `planned` is the prompt as `check` planned it (checked again if None). Its driver runs
        it under ``torch.inference_mode()`` on one thread. The prompt is prefilled once for
        all `request.n` choices; choice i samples with seed + i.
        """
        started = time.perf_counter()
        planned = self.check(request) if planned is None else planned
        params = request.sampling
        prompt_length = len(planned.token_ids)
        budget = min(params.max_tokens, self.context_length - prompt_length)
        strategy, choice = self.strategy(request, planned)
        plan = strategy.plan(planned, choice)
        cache = self.model.new_cache(prompt_length + budget, self.cache_pool)
        try:
            filled = yield from strategy.fill(plan, cache, prefetched)
            metrics.prompt_tokens = prompt_length
            metrics.tokens_loaded = filled.tokens_loaded
            metrics.tokens_computed = prompt_length - metrics.tokens_loaded
            metrics.prefix, metrics.documents = filled.prefix, filled.documents
            metrics.prefill_s = time.perf_counter() - started
            for index in range(request.n):
                own = cache if index == request.n - 1 else cache.fork()
                seed = None if params.seed is None else (params.seed + index) % (2**64)
                try:
                    sampler = Sampler(dataclasses.replace(params, seed=seed), self.model.device, self.planner.constraint(request))
                    yield from self._decode(own, filled.logits, prompt_length, sampler, budget, metrics, started, index)
                finally:
                    own.release()
        finally:
            cache.release()

    def prompt_logprobs(self, token_ids: list[int]) -> Generator[None, None, list[torch.Tensor]]:
        """Per prompt token after the first, the log-softmax that predicted it, pausing after every pass:
        a full forward, never a reuse path (stored KV has no logits); it serves `echo` with log probabilities."""
        return self.model.prompt_logprobs(token_ids, self.config.prefill_chunk)

    def warm(
        self, documents: list[str], tenant: str | None = None, chat: bool = True, reuse: str | None = None, system: str | None = None
    ) -> list[tuple[str, int, bool]]:
        """Compute and store documents in isolation; (key, tokens, was already stored) for each.

        They serve requests with the same `system` text (the preamble they are computed
        after). Stored in the layout of the document mode `reuse` (tune: CacheTune's, by
        `tune_scoring`, with its order); by default the engine's `reuse` setting if it is a
        document mode, else blend's. The call returns once the entries are stored.
        """
        with torch.inference_mode():
            return drain(self.warm_steps(WarmRequest(documents, tenant, chat, system, reuse)))

    def warm_steps(self, request: WarmRequest) -> Generator[Waiting | None, None, list[tuple[str, int, bool]]]:
        """`warm`, pausing after every pass of documents (a scheduler's unit of work)."""
        preamble, ids = self.planner.plan_documents(request.documents, request.chat, request.system)
        strategy = self.strategies[document_mode(request.reuse, self.config.reuse)]
        stored = yield from strategy.store_documents(ids, preamble, self.config.tenant if request.tenant is None else request.tenant)
        return [(key, len(doc), present) for (key, present), doc in zip(stored, ids)]

    def _decode(
        self,
        cache: KVCache,
        logits: torch.Tensor,
        position: int,
        sampler: Sampler,
        budget: int,
        metrics: RequestMetrics,
        started: float,
        choice: int,
    ) -> Generator[Step | DecodeStep, Any, None]:
        """Decode one choice from the prompt's last `logits`. A consumer that `send`s True after a step
        ends this choice there (a stop sequence); each `DecodeStep` is answered with that token's logits."""
        decode_started = time.perf_counter()
        for index in range(budget):
            token = sampler(logits)
            if metrics.generated_tokens == 0:
                metrics.ttft_s = time.perf_counter() - started
                decode_started = time.perf_counter()
            metrics.generated_tokens += 1
            stopped = (token in self.tokenizer.stop_ids and not sampler.params.ignore_eos) or sampler.finished
            last = stopped or index == budget - 1
            if (yield Step(token, logits, ("stop" if stopped else "length") if last else None, choice)) or last:
                break
            logits = yield DecodeStep(token, position, cache)
            position += 1
        metrics.decode_s = time.perf_counter() - decode_started


def _shut_down(writeback: WriteBack, store: KVStore, pool: CachePool, model: Transformer, grace_s: float) -> None:
    """What closing an engine does; a module function, so the finalizer that runs it at exit does not keep the engine alive."""
    writeback.close(grace_s)
    store.close()
    pool.clear()
    model.forget_decode_rows()
