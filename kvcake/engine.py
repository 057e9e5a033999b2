"""One request from text to tokens: tokenize, plan (exact prefix / documents / new), prefill, decode, account."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Generator, Iterator

import torch

from kvcake.blend import (
    RULES,
    BlendFallback,
    BlendPrefill,
    BlendReport,
    LayerKV,
    LayerPrefetcher,
    LayerSource,
    TuneProfile,
    order_entry,
    order_from_entry,
    token_scores,
)
from kvcake.config import ConfigError, KvcakeConfig
from kvcake.runtime import keep_freed_memory
from kvcake.model import CachePool, KVCache, SamplingParams, Sampler, load_model, resolve_device, resolve_dtype, weights_identity
from kvcake.model.grammar import GrammarError, JsonConstraint
from kvcake.schedule import ByteBudget, CostProfile, PrefixPrefetch, PrefixPrefill, PrefixReport, Strategy, WriteBack
from kvcake.segments import PromptLayout, Segments, document_preamble, document_token_ids, layout, split_prompt
from kvcake.store import ChunkKV, KVStore, document_key, model_fingerprint, open_store, prefix_chunk_keys

BLEND = "blend"
TUNE = "tune"
DOCUMENT_MODES = (BLEND, TUNE)
PREFETCHING = ("cake", "load")
"""Prefix strategies that use chunks loaded while the request waited (the others fix their own split)."""
MAX_CHOICES = 16
"""Most choices (`n`) one request may ask for: each holds its own copy of the prompt's KV."""
SHARED_DOCUMENTS_SALT = "kvcake-shared-documents"
"""Salt of document keys when `shared_documents` is on: one corpus for every tenant."""


class RequestError(ValueError):
    """The request itself is invalid (empty, too long for the context, bad parameters)."""


@dataclass
class GenerateRequest:
    """A prompt as plain text, chat messages, token ids, or a query over documents (exactly one of them).

    With `query`, `documents` are reusable segments placed in the given order after
    the `system` text; a plain `prompt` is also cut into documents + query by the
    configured separator. `reuse` is a prefix strategy or `blend` (documents' stored
    KV blended at `ratio`).
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    query: str | None = None
    documents: list[str] = field(default_factory=list)
    system: str | None = None
    chat: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reuse: str | None = None
    ratio: float | None = None
    guard: float | None = None
    tenant: str | None = None
    n: int = 1
    """Choices sampled from one prefill: each decodes from its own copy of the prompt's KV."""
    json_schema: dict | None = None
    """With `json_output`: the JSON Schema the answer must fit (None: any JSON object)."""
    json_output: bool = False


@dataclass
class WarmRequest:
    """Documents to compute and store for later requests with this `system` text (see `Engine.warm`)."""

    documents: list[str]
    tenant: str | None = None
    chat: bool = True
    system: str | None = None


@dataclass
class RequestMetrics:
    """A request's accounting: `prefix` says how the stored prefix was reused."""

    prompt_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_computed: int = 0
    tokens_loaded: int = 0
    generated_tokens: int = 0
    prefix: PrefixReport = field(default_factory=PrefixReport)
    blend: BlendReport | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    first_token_logits: torch.Tensor
    metrics: RequestMetrics


@dataclass
class Step:
    """One generated token of choice `choice`, the logits it was drawn from, and why that choice ended (on its last)."""

    token_id: int
    logits: torch.Tensor
    finish_reason: str | None
    choice: int = 0


@dataclass(frozen=True)
class ScoredDocument:
    """A document in CacheTune's layout: `order[i]` is the original index of stored row i (highest score first).

    One computed in this request carries its sorted KV (`computed`) and its order entry, both still to be stored."""

    key: str
    order: torch.Tensor
    length: int
    computed: ChunkKV | None
    order_key: str = ""
    stored_order: ChunkKV | None = None


@dataclass(frozen=True)
class DecodeStep:
    """A choice's newest token, to run through the model at `position` over `cache`.

    `Engine.run` yields it and expects that token's logits back (``send``); a driver may
    answer several requests' decode steps with one batched forward."""

    token_id: int
    position: int
    cache: KVCache


Work = Step | DecodeStep | None
"""What `Engine.run` yields: a generated token (send True to end its choice), a decode step
(send its logits), or None: a pause after a unit of prefill work (send None)."""


@dataclass
class Prefill:
    """The state after the prompt: its KV cache and the logits of the last prompt token."""

    cache: KVCache
    last_logits: torch.Tensor
    next_position: int


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
        self.context_length = self.model.config.max_position_embeddings
        self.fingerprint = model_fingerprint(self.model.config.as_dict(), weights_identity(self.model_folder), str(dtype))
        self.store = store if store is not None else open_store(config.effective_store_url())
        self.writeback = WriteBack(self.store)
        self.prefetch_budget = ByteBudget(int(config.prefetch_gb * 1e9))
        self.cost_profile = CostProfile()
        self.check_layers = parse_check_layers(config.blend_check_layers, self.model.config.num_layers)
        if config.tune_scoring not in RULES:
            raise ConfigError(f"tune_scoring must be one of {', '.join(RULES)}, got {config.tune_scoring!r}")
        self.tune_profile = TuneProfile()
        self.cache_pool = CachePool(int(config.kv_pool_gb * 1e9))

    def close(self) -> None:
        self.writeback.close()
        self.store.close()

    def plan_prompt(self, request: GenerateRequest) -> PromptLayout:
        """Token ids of the request's prompt, with the exact prefix and the documents marked."""
        given = [x is not None for x in (request.prompt, request.messages, request.token_ids, request.query)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages, token_ids or query")
        if request.documents and request.query is None:
            raise RequestError("documents need a query (the text asked about them)")
        segments = Segments(request.query, tuple(request.documents), request.system) if request.query is not None else None
        if request.prompt is not None and (split := split_prompt(request.prompt, self.config.separator)) is not None:
            segments = Segments(split.query, split.documents, request.system)
        self._check_length_bound([request.prompt, request.query, request.system, *request.documents, *(m.get("content", "") for m in request.messages or ())])
        if segments is not None:
            if len(segments.documents) > self.config.max_documents:
                raise RequestError(f"{len(segments.documents)} documents; the limit is max_documents = {self.config.max_documents}")
            if not segments.query.strip():
                raise RequestError("the query is empty")
            try:
                planned = layout(self.tokenizer, segments, request.chat)
            except ValueError as error:
                raise RequestError(str(error)) from None
        else:
            planned = PromptLayout.plain(self._plain_ids(request))
        if not planned.token_ids:
            raise RequestError("the prompt is empty")
        if len(planned.token_ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(planned.token_ids)} tokens; the model's context is {self.context_length}")
        return planned

    def _check_length_bound(self, texts: list[str | None]) -> None:
        """Refuse text that cannot fit the context before tokenizing it: no token covers more than
        `max_token_chars` characters, so more than context x that many characters is too long."""
        characters = sum(len(text) for text in texts if text)
        limit = self.context_length * self.tokenizer.max_token_chars
        if characters > limit:
            raise RequestError(
                f"the prompt has {characters} characters, more than the model's context of {self.context_length} tokens can hold "
                f"(at most {self.tokenizer.max_token_chars} characters per token)"
            )

    def check(self, request: GenerateRequest) -> PromptLayout:
        """Raise `RequestError` now for what `stream` would refuse (prompt, reuse, ratio); else the planned prompt."""
        planned = self.plan_prompt(request)
        self._check_sampling(request)
        if request.reuse:
            parse_reuse(request.reuse)
        self._ratio(request)
        return planned

    def _plain_ids(self, request: GenerateRequest) -> list[int]:
        if request.token_ids is not None:
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in request.token_ids):
                raise RequestError(f"token ids must lie in [0, {vocab})")
            return list(request.token_ids)
        if request.messages is not None:
            return self.tokenizer.encode(self.tokenizer.render_chat(request.messages))
        if request.chat and self.tokenizer.has_chat_template:
            return self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": request.prompt}]))
        return self.tokenizer.encode(request.prompt or "")

    def prefill_steps(
        self,
        prompt_ids: list[int],
        capacity: int,
        strategy: Strategy | None = None,
        tenant: str | None = None,
        prefetched: PrefixPrefetch | None = None,
    ) -> Generator[None, None, tuple[Prefill, PrefixReport]]:
        """KV of the prompt: the longest stored prefix by `strategy`, then the rest computed.

        Pauses (``yield``) after every computed chunk or pass; `drain` runs it without pausing.
        Only chunks that end before the last prompt token are reused, since the first
        token's logits need that token computed. Computed full chunks are written back.
        Chunks `prefetched` while the request waited are used as loaded (Cake, load).
        """
        chunk_size = self.config.chunk_size
        strategy = strategy or self._prefix_strategy(self.default_reuse)
        keys = prefix_chunk_keys(self.fingerprint, self.config.tenant if tenant is None else tenant, prompt_ids, chunk_size)
        reusable = keys[: (len(prompt_ids) - 1) // chunk_size]
        num_hit = self.store.stored_prefix(reusable)
        cache = self.model.new_cache(capacity, self.cache_pool)
        ready = prefetched.take_back(num_hit) if prefetched is not None and strategy.name in PREFETCHING else {}
        prefix = PrefixPrefill(self.model, chunk_size, prompt_ids, self._chunk_loader(reusable), self.cost_profile)
        try:
            report = yield from prefix.steps(cache, num_hit, strategy, ready)
            last_logits, computed = yield from self._compute_rest(prompt_ids, cache, num_hit, keys, report)
        except GeneratorExit:
            cache.release()
            raise
        computed.update({keys[index]: kv for index, kv in prefix.computed_kv.items()})
        self.writeback.submit_chain(keys, computed)
        return Prefill(cache, last_logits, len(prompt_ids)), report

    def prefetch_prefix(self, request: GenerateRequest, planned: PromptLayout | None = None) -> PrefixPrefetch | None:
        """For a request that waits its turn: a loader of its stored prefix chunks (run it on an I/O thread).

        `planned` is the request's prompt as `check` planned it (planned again if None).
        """
        planned = self.plan_prompt(request) if planned is None else planned
        reuse = parse_reuse(request.reuse) if request.reuse else self.default_reuse
        if self._prefix_strategy(reuse).name not in PREFETCHING:
            return None
        exact = planned.token_ids[: planned.prefix_length] if reuse in DOCUMENT_MODES and planned.document_spans else planned.token_ids
        chunk_size = self.config.chunk_size
        tenant = self.config.tenant if request.tenant is None else request.tenant
        reusable = prefix_chunk_keys(self.fingerprint, tenant, exact, chunk_size)[: (len(exact) - 1) // chunk_size]
        num_hit = self.store.stored_prefix(reusable)
        return PrefixPrefetch(self._chunk_loader(reusable), num_hit, self.prefetch_budget) if num_hit else None

    def _chunk_loader(self, keys: list[str]):
        layers = self.model.config.num_layers
        chunk_size = self.config.chunk_size

        def load(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
            chunk = self.store.get(keys[index])
            if chunk is None or chunk.num_layers != layers or chunk.num_tokens != chunk_size:
                return None
            return chunk.keys, chunk.values, chunk.nbytes

        return load

    def _compute_rest(
        self, prompt_ids: list[int], cache: KVCache, first_chunk: int, keys: list[str], report: PrefixReport
    ) -> Generator[None, None, tuple[torch.Tensor, dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]]]:
        """Compute chunks from `first_chunk` on: the last token's logits, and the full chunks' K/V by key (to store).

        Passes are `prefill_chunk` tokens (several store chunks at once, when it is larger),
        cut at multiples of it from position 0 whatever was reused, so a token is always
        computed in the same pass shape as in a full prefill; each pass's K/V is cut into
        store chunks. The trailing partial chunk is never stored, so its K/V copies are not kept.
        Pauses after each pass; its compute time goes to `report.compute_s`.
        """
        chunk_size, step = self.config.chunk_size, self.config.prefill_chunk
        first = first_chunk * chunk_size
        full_end = len(keys) * chunk_size
        logits = None
        computed = {}
        for start, end in _passes(first, len(prompt_ids), step):
            started = time.perf_counter()
            ids, positions = torch.tensor(prompt_ids[start:end]), torch.arange(start, end)
            stored_end = min(end, full_end)
            out = self.model.forward(ids, positions, cache, keep_kv=stored_end > start, rotated_keys=True)
            if stored_end > start:
                keys_by_chunk = zip(*(k[:, : stored_end - start].split(chunk_size, dim=1) for k in out.keys))
                values_by_chunk = zip(*(v[:, : stored_end - start].split(chunk_size, dim=1) for v in out.values))
                for offset, (chunk_keys, chunk_values) in enumerate(zip(keys_by_chunk, values_by_chunk)):
                    computed[keys[start // chunk_size + offset]] = (list(chunk_keys), list(chunk_values))
            logits = out.logits
            report.compute_s += time.perf_counter() - started
            yield
        assert logits is not None
        return logits[-1], computed

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
        self,
        request: GenerateRequest,
        metrics: RequestMetrics,
        prefetched: PrefixPrefetch | None = None,
        planned: PromptLayout | None = None,
    ) -> Generator[Step, bool | None, None]:
        """Yield generated tokens one by one, choice after choice; `metrics` is filled in as the request runs.

        `planned` is the request's prompt as `check` planned it (planned again if None).
        The prompt is prefilled once for all `request.n` choices; choice i samples with
        seed + i. Sending True after a step ends that step's choice (a stop sequence).
        This drives `run` alone: every decode step is a forward of this request only.
        """
        work = self.run(request, metrics, prefetched, planned)
        reply: Any = None
        try:
            while True:
                with torch.inference_mode():
                    item = work.send(reply)
                    if isinstance(item, DecodeStep):
                        reply = self.model.forward(torch.tensor([item.token_id]), torch.tensor([item.position]), item.cache).logits[-1]
                        continue
                if item is None:
                    reply = None
                    continue
                reply = yield item
        except StopIteration:
            return
        finally:
            work.close()

    def run(
        self,
        request: GenerateRequest,
        metrics: RequestMetrics,
        prefetched: PrefixPrefetch | None = None,
        planned: PromptLayout | None = None,
    ) -> Generator[Work, Any, None]:
        """The request as a coroutine a scheduler drives (see `Work`): prefill, then every choice's tokens.

        Its driver runs it under ``torch.inference_mode()`` and on one thread. Prefills pause
        after every computed chunk (plain, Cake, a blend's exact prefix) and every blended
        layer (blend, tune); documents missing from the store are computed whole.
        """
        started = time.perf_counter()
        planned = self.plan_prompt(request) if planned is None else planned
        reuse = parse_reuse(request.reuse) if request.reuse else self.default_reuse
        ratio = self._ratio(request)
        self._check_sampling(request)
        params = request.sampling
        prompt_length = len(planned.token_ids)
        budget = min(params.max_tokens, self.context_length - prompt_length)
        if reuse == TUNE and planned.document_spans:
            state, report, blend = yield from self.tune_prefill(planned, prompt_length + budget, request.ratio, request.tenant, prefetched)
        elif reuse == BLEND and planned.document_spans:
            state, report, blend = yield from self.blend_prefill(planned, prompt_length + budget, ratio, request.tenant, prefetched, request.guard)
        else:
            strategy = self._prefix_strategy(reuse)
            state, report = yield from self.prefill_steps(planned.token_ids, prompt_length + budget, strategy, request.tenant, prefetched)
            blend = None
        metrics.prompt_tokens = prompt_length
        metrics.tokens_loaded = report.tokens_loaded + (blend.tokens_loaded if blend else 0)
        metrics.tokens_computed = prompt_length - metrics.tokens_loaded
        metrics.prefix = report
        metrics.blend = blend
        metrics.prefill_s = time.perf_counter() - started
        for choice in range(request.n):
            own = state if choice == request.n - 1 else Prefill(state.cache.fork(), state.last_logits, state.next_position)
            seed = None if params.seed is None else (params.seed + choice) % (2**64)
            sampler = Sampler(dataclasses.replace(params, seed=seed), self.model.device, self._constraint(request))
            try:
                yield from self._decode(own, sampler, budget, metrics, started, choice)
            finally:
                own.cache.release()

    def prompt_logprobs(self, token_ids: list[int]) -> list[torch.Tensor]:
        """Per prompt token after the first, the log-softmax that predicted it (from the tokens before it).

        A full forward of the prompt with every position's logits: stored KV has no logits,
        so this is never a reuse path (it serves `echo` with log probabilities).
        """
        cache = self.model.new_cache(len(token_ids))
        step = self.config.prefill_chunk
        rows: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(token_ids) - 1, step):
                end = min(start + step, len(token_ids) - 1)
                out = self.model.forward(torch.tensor(token_ids[start:end]), torch.arange(start, end), cache, all_logits=True)
                rows.extend(torch.log_softmax(out.logits.float(), dim=-1))
        return rows

    def _constraint(self, request: GenerateRequest) -> JsonConstraint | None:
        if not request.json_output:
            return None
        try:
            return JsonConstraint(self.tokenizer.grammar_tokenizer, request.json_schema)
        except (GrammarError, ValueError) as error:
            raise RequestError(str(error)) from None

    def _check_sampling(self, request: GenerateRequest) -> None:
        if not 1 <= request.n <= MAX_CHOICES:
            raise RequestError(f"n must lie in [1, {MAX_CHOICES}], got {request.n}")
        self._constraint(request)
        sampling = request.sampling
        vocab = self.model.config.vocab_size
        if any(token >= vocab for token, _ in sampling.logit_bias):
            raise RequestError(f"logit_bias: token ids must lie in [0, {vocab})")

    def _ratio(self, request: GenerateRequest) -> float:
        ratio = self.config.blend_ratio if request.ratio is None else request.ratio
        if not 0.0 <= ratio <= 1.0:
            raise RequestError(f"ratio must lie in [0, 1], got {ratio}")
        if request.guard is not None and not (0.0 < request.guard <= 1.0 and 0.0 < ratio < 1.0):
            raise RequestError(f"guard must lie in (0, 1] with a ratio (its floor) in (0, 1), got guard {request.guard}, ratio {ratio}")
        return ratio

    @staticmethod
    def _prefix_strategy(reuse: Strategy | str) -> Strategy:
        """Blend and tune requests take their exact prefix with Cake."""
        return Strategy("cake") if reuse in DOCUMENT_MODES else reuse

    # ---- documents (blend) ---------------------------------------------------------

    def blend_prefill(
        self,
        planned: PromptLayout,
        capacity: int,
        ratio: float,
        tenant: str | None = None,
        prefetched: PrefixPrefetch | None = None,
        guard: float | None = None,
    ) -> Generator[None, None, tuple[Prefill, PrefixReport, BlendReport]]:
        """Exact prefix (Cake), then the documents' stored KV blended at `ratio` (a floor with a `guard` share), the query computed.

        Documents missing from the store are computed in isolation first and stored.
        Loading the stored layers starts before the prefix is computed. If a stored layer
        cannot be read mid-way, the tokens after the prefix are computed in full instead
        and the report says why.
        """
        is_document = torch.zeros(len(planned.token_ids) - planned.prefix_length, dtype=torch.bool)
        for start, end in planned.document_spans:
            is_document[start - planned.prefix_length : end - planned.prefix_length] = True
        source, stored = self._document_source(planned, ratio, tenant)
        from_store = torch.cat([torch.full((end - start,), present) for (start, end), present in zip(planned.document_spans, stored)])
        blender = BlendPrefill(self.model, ratio, self.check_layers, guard)
        loaded_layers = blender.loaded_layers(int(is_document.sum()))
        state, report, blend = yield from self._run_blend(
            planned, capacity, tenant, prefetched, blender, source, loaded_layers, is_document.nonzero().squeeze(1), from_store
        )
        blend.documents = len(planned.document_spans)
        blend.documents_stored = sum(stored)
        blend.documents_computed = blend.documents - blend.documents_stored
        return state, report, blend

    def _run_blend(
        self,
        planned: PromptLayout,
        capacity: int,
        tenant: str | None,
        prefetched: PrefixPrefetch | None,
        blender: BlendPrefill,
        source: LayerSource,
        loaded_layers: range,
        stored_tokens: torch.Tensor,
        from_store: torch.Tensor,
    ) -> Generator[None, None, tuple[Prefill, PrefixReport, BlendReport]]:
        """Start loading, fill the exact prefix, then blend; a failed layer read computes the rest instead.
        Pauses after every chunk of the prefix and every blended layer.

        `from_store[i]` says whether row i of `stored_tokens` comes from the store (else it
        was computed in this request), for the accounting."""
        rest = torch.tensor(planned.token_ids[planned.prefix_length :], dtype=torch.long)
        positions = torch.arange(planned.prefix_length, len(planned.token_ids))
        prefetcher = LayerPrefetcher(
            source, loaded_layers, streams=self.config.load_streams, device=self.model.device, timeout_s=self.config.load_timeout_s
        )
        try:
            cache, report = yield from self._exact_prefix(planned.token_ids[: planned.prefix_length], capacity, tenant, prefetched)
            try:
                logits, blend = yield from blender.run(cache, rest, positions, stored_tokens, prefetcher, from_store)
            except BlendFallback as failure:
                logits = self.model.prefill(rest.tolist(), cache, self.config.prefill_chunk, planned.prefix_length)
                document_tokens = sum(end - start for start, end in planned.document_spans)
                blend = BlendReport(ratio=blender.ratio, document_tokens=document_tokens, tokens_recomputed=document_tokens, fallback=str(failure))
        finally:
            prefetcher.close()
        return Prefill(cache, logits, len(planned.token_ids)), report, blend

    def tune_prefill(
        self, planned: PromptLayout, capacity: int, ratio: float | None, tenant: str | None = None, prefetched: PrefixPrefetch | None = None
    ) -> Generator[None, None, tuple[Prefill, PrefixReport, BlendReport]]:
        """CacheTune: recompute each document's top-scored tokens in every layer; load only the others' KV.

        The ratio is the request's, else `tune_ratio`, where `auto` follows this engine's
        measured costs. No check pass: the stored order says which rows to recompute, so
        the loader reads one contiguous range per document and layer, on `load_streams`
        threads, and never the bytes of recomputed tokens.
        """
        ratio = self.tune_ratio() if ratio is None else ratio
        preamble = planned.preamble
        documents = self._scored_documents([planned.document_ids(i) for i in range(len(planned.document_spans))], preamble, tenant)
        for document in documents:
            if document.computed is not None and document.stored_order is not None:
                self.writeback.submit(document.key, document.computed.keys, document.computed.values)
                self.writeback.submit(document.order_key, document.stored_order.keys, document.stored_order.values)
        stored_rows, row_from_store = [], []
        reads: list[tuple[ScoredDocument, int]] = []
        for (start, _), document in zip(planned.document_spans, documents):
            recomputed = self._recomputed_rows(ratio, document.length)
            stored_rows.append(document.order[recomputed:] + start - planned.prefix_length)
            row_from_store.append(torch.full((document.length - recomputed,), document.computed is None))
            reads.append((document, recomputed))
        stored_tokens = torch.cat(stored_rows) if stored_rows else torch.empty(0, dtype=torch.long)
        from_store = torch.cat(row_from_store) if row_from_store else torch.empty(0, dtype=torch.bool)
        blender = BlendPrefill(self.model, 0.0, self.check_layers)
        state, report, blend = yield from self._run_blend(
            planned, capacity, tenant, prefetched, blender, self._scored_source(reads), range(self.model.config.num_layers), stored_tokens, from_store
        )
        document_tokens = sum(d.length for d in documents)
        if not blend.fallback:
            blend.tokens_recomputed = document_tokens - len(stored_tokens)
            blend.tokens_reused = len(stored_tokens)
            self.tune_profile.record(blend.compute_s, len(planned.token_ids) - planned.prefix_length - len(stored_tokens), blend.load_s, len(stored_tokens))
        blend.ratio, blend.mode, blend.document_tokens = ratio, TUNE, document_tokens
        blend.documents = len(documents)
        blend.documents_stored = sum(1 for d in documents if d.computed is None)
        blend.documents_computed = blend.documents - blend.documents_stored
        return state, report, blend

    def _recomputed_rows(self, ratio: float, length: int) -> int:
        """ceil(ratio * length), rounded up to the store's page: the reused rows then start on a page
        boundary, so the store reads exactly their bytes (at most a page of tokens more is recomputed)."""
        wanted = math.ceil(ratio * length)
        if wanted == 0:
            return 0
        page = self.store.page_tokens
        return min(length, -(-wanted // page) * page)

    def tune_ratio(self) -> float:
        """The ratio a tune request gets when it names none."""
        if self.config.tune_ratio != "auto":
            return float(self.config.tune_ratio)
        return self.tune_profile.ratio(self.config.tune_min_ratio)

    def _scored_documents(
        self, documents: list[list[int]], preamble: tuple[int, ...], tenant: str | None, stop: threading.Event | None = None
    ) -> list[ScoredDocument]:
        """Documents' scored entries: the stored row order, or (on a miss) computed together, scored and sorted
        (the caller stores `computed` under `key` and `stored_order` under `order_key`)."""
        layout = f"scored-{self.config.tune_scoring}"
        found: dict[int, ScoredDocument] = {}
        for index, ids in enumerate(documents):
            key = self.document_key(ids, preamble, tenant, layout)
            entry = self.store.get(self.document_key(ids, preamble, tenant, f"{layout}-order")) if self.store.contains(key) else None
            if entry is not None and entry.num_tokens == len(ids):
                found[index] = ScoredDocument(key, order_from_entry(entry), len(ids), None)
        missing = [i for i in range(len(documents)) if i not in found]
        for index, plain in zip(missing, self.compute_documents([documents[i] for i in missing], preamble, stop)):
            ids = documents[index]
            scores = token_scores(plain.keys, plain.values, self.config.tune_scoring)
            order = torch.argsort(scores, descending=True, stable=True)
            sorted_kv = ChunkKV([k[:, order] for k in plain.keys], [v[:, order] for v in plain.values])
            key = self.document_key(ids, preamble, tenant, layout)
            order_key = self.document_key(ids, preamble, tenant, f"{layout}-order")
            found[index] = ScoredDocument(key, order, len(ids), sorted_kv, order_key, order_entry(order, scores[order]))
        return [found[i] for i in sorted(found)]

    def _scored_source(self, reads: list[tuple[ScoredDocument, int]]) -> LayerSource:
        """Per layer, rows [recomputed, length) of every scored document: only the KV that is reused."""
        heads, head_dim = self.model.config.num_kv_heads, self.model.config.head_dim

        def read_layer(layer: int) -> LayerKV | None:
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
            return LayerKV(torch.cat([k.to(dtype) for k in keys], dim=1), torch.cat([v.to(dtype) for v in values], dim=1), nbytes)

        return read_layer

    def _exact_prefix(
        self, prefix_ids: list[int], capacity: int, tenant: str | None, prefetched: PrefixPrefetch | None
    ) -> Generator[None, None, tuple[KVCache, PrefixReport]]:
        if not prefix_ids:
            return self.model.new_cache(capacity, self.cache_pool), PrefixReport()
        state, report = yield from self.prefill_steps(prefix_ids, capacity, Strategy("cake"), tenant, prefetched)
        return state.cache, report

    def document_key(self, document_ids: list[int], preamble: tuple[int, ...], tenant: str | None = None, layout: str = "plain") -> str:
        """The key covers the preamble and the gap too: the stored KV depends on what it was computed after, and how far."""
        salt = SHARED_DOCUMENTS_SALT if self.config.shared_documents else self.config.tenant if tenant is None else tenant
        return document_key(self.fingerprint, salt, [*preamble, *document_ids], f"{layout}@{self.config.document_gap}")

    def warm(
        self,
        documents: list[str],
        tenant: str | None = None,
        chat: bool = True,
        scored: bool | None = None,
        system: str | None = None,
        stop: threading.Event | None = None,
    ) -> list[tuple[str, int, bool]]:
        """Compute and store documents in isolation; (key, tokens, was already stored) for each.

        They serve requests with the same `system` text (the preamble they are computed
        after). `scored` stores CacheTune's layout (by `tune_scoring`, with its order)
        instead of the plain one; by default it does when `reuse` is tune. Missing
        documents are computed together (the preamble once) and written here, synchronously,
        so the call returns once its own entries are stored (a write-back queue could drop
        them); `stop` set (the client left) ends it before the next batch.
        """
        if len(documents) > self.config.max_documents:
            raise RequestError(f"{len(documents)} documents; the limit is max_documents = {self.config.max_documents}")
        self._check_length_bound([system, *documents])
        preamble = document_preamble(self.tokenizer, chat, system)
        scored = self.config.reuse == TUNE if scored is None else scored
        layout = f"scored-{self.config.tune_scoring}" if scored else "plain"
        ids = [document_token_ids(self.tokenizer, text) for text in documents]
        room = self.context_length - len(preamble) - 1
        if any(len(doc) > room for doc in ids):
            raise RequestError(f"a document has {max(len(doc) for doc in ids)} tokens; after the preamble the context holds {room}")
        keys = [self.document_key(doc, preamble, tenant, layout) for doc in ids]
        present = [self.store.contains(key) for key in keys]
        with torch.inference_mode():
            if scored:
                for document in self._scored_documents(ids, preamble, tenant, stop):
                    if document.computed is not None and document.stored_order is not None:
                        self.store.put(document.key, document.computed)
                        self.store.put(document.order_key, document.stored_order)
            else:
                missing = [i for i, stored in enumerate(present) if not stored]
                for index, chunk in zip(missing, self.compute_documents([ids[i] for i in missing], preamble, stop)):
                    self.store.put(keys[index], chunk)
        return [(key, len(doc), stored) for key, doc, stored in zip(keys, ids, present)]

    def compute_documents(self, documents: list[list[int]], preamble: tuple[int, ...], stop: threading.Event | None = None) -> list[ChunkKV]:
        """Documents' KV, each computed on its own after the preamble (K before RoPE).

        Each document starts `document_gap` positions after the preamble (less where the
        context would not hold it): in a real prompt other documents usually lie between
        the instructions and this one. K is stored before RoPE, so only this distance,
        not the absolute position, shapes the stored KV. The preamble is computed once;
        documents shorter than a pass are packed into passes of about `prefill_chunk`
        tokens, each attending only to the preamble and itself. `stop` set ends early
        (fewer results).
        """
        chunk_size = self.config.prefill_chunk
        longest = max((len(d) for d in documents), default=0)
        cache = self.model.new_cache(len(preamble) + max(longest, chunk_size), self.cache_pool)
        if preamble and documents:
            self.model.forward(torch.tensor(preamble), torch.arange(len(preamble)), cache)
        results: list[ChunkKV] = []
        for batch in _packs([len(d) for d in documents], chunk_size):
            if stop is not None and stop.is_set():
                break
            firsts = [self._document_start(len(preamble), len(documents[i])) for i in batch]
            if len(batch) == 1 and len(documents[batch[0]]) > chunk_size:
                outputs = [self._long_document(documents[batch[0]], firsts[0], cache)]
            else:
                outputs = self.model.forward_isolated([documents[i] for i in batch], firsts, cache)
            results.extend(ChunkKV([k.cpu() for k in keys], [v.cpu() for v in values]) for keys, values in outputs)
        cache.release()
        return results

    def _document_start(self, preamble_length: int, document_length: int) -> int:
        return preamble_length + max(0, min(self.config.document_gap, self.context_length - preamble_length - document_length))

    def _long_document(self, document_ids: list[int], first_position: int, cache: KVCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A document longer than a chunk, chunk by chunk after the preamble in `cache` (left as it was)."""
        preamble_length = cache.length
        layers = self.model.config.num_layers
        keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        for _, out in self.model.forward_chunks(document_ids, cache, self.config.prefill_chunk, first_position, keep_kv=True):
            for layer in range(layers):
                keys[layer].append(out.keys[layer])
                values[layer].append(out.values[layer])
        cache.truncate(preamble_length)
        return [torch.cat(k, dim=1) for k in keys], [torch.cat(v, dim=1) for v in values]

    def _document_source(self, planned: PromptLayout, ratio: float, tenant: str | None) -> tuple[LayerSource, list[bool]]:
        """A layer reader over the prompt's documents, and for each document whether it was already stored.

        Missing documents are computed together, then queued for write-back."""
        if ratio >= 1.0:
            return (lambda layer: None), [False] * len(planned.document_spans)
        preamble = planned.preamble
        ids = [planned.document_ids(index) for index in range(len(planned.document_spans))]
        keys = [self.document_key(doc, preamble, tenant) for doc in ids]
        stored = [self.store.contains(key) for key in keys]
        missing = [i for i, present in enumerate(stored) if not present]
        computed: dict[int, ChunkKV] = dict(zip(missing, self.compute_documents([ids[i] for i in missing], preamble)))
        for index, chunk in computed.items():
            self.writeback.submit(keys[index], chunk.keys, chunk.values)
        entries = [(key, computed.get(index), len(doc)) for index, (key, doc) in enumerate(zip(keys, ids))]

        def read_layer(layer: int) -> LayerKV | None:
            layer_keys, layer_values, nbytes = [], [], 0
            for key, chunk, length in entries:
                if chunk is not None:
                    layer_keys.append(chunk.keys[layer])
                    layer_values.append(chunk.values[layer])
                    continue
                got = self.store.get_layer(key, layer)
                if got is None or got[0].shape[1] != length:
                    return None
                layer_keys.append(got[0])
                layer_values.append(got[1])
                nbytes += got[0].nbytes + got[1].nbytes
            return LayerKV(torch.cat(layer_keys, dim=1), torch.cat(layer_values, dim=1), nbytes)

        return read_layer, stored

    def _decode(
        self, state: Prefill, sampler: Sampler, budget: int, metrics: RequestMetrics, started: float, choice: int = 0
    ) -> Generator[Step | DecodeStep, Any, None]:
        """Decode one choice. A consumer that `send`s True after a step ends this choice there (a stop sequence);
        each `DecodeStep` is answered with that token's logits."""
        logits = state.last_logits
        position = state.next_position
        decode_started = time.perf_counter()
        for index in range(budget):
            token = sampler(logits)
            if metrics.generated_tokens == 0:
                metrics.ttft_s = time.perf_counter() - started
                decode_started = time.perf_counter()
            metrics.generated_tokens += 1
            stopped = token in self.tokenizer.stop_ids or sampler.finished
            last = stopped or index == budget - 1
            if (yield Step(token, logits, ("stop" if stopped else "length") if last else None, choice)) or last:
                break
            logits = yield DecodeStep(token, position, state.cache)
            position += 1
        metrics.decode_s = time.perf_counter() - decode_started


def _passes(first: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, end) of each prefill pass over tokens first..end, cut at multiples of `step` from position 0."""
    start = first
    while start < end:
        stop = min(end, (start // step + 1) * step)
        yield start, stop
        start = stop


def _packs(lengths: list[int], budget: int) -> Iterator[list[int]]:
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


def parse_reuse(text: str) -> Strategy | str:
    """A prefix strategy, `blend` or `tune`; a bad value is the request's fault."""
    if text in DOCUMENT_MODES:
        return text
    try:
        return Strategy.parse(text)
    except ValueError as error:
        raise RequestError(f"{error} (or {BLEND}, {TUNE})") from None


def parse_check_layers(text: str, num_layers: int) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"blend_check_layers must be comma-separated layer numbers, got {text!r}") from None
    if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ConfigError(f"blend_check_layers must be increasing layers in [0, {num_layers}), got {text!r}")
    return layers
