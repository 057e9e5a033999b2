"""One request from text to tokens: tokenize, prefill in chunks, decode, account."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from kvcake.config import KvcakeConfig
from kvcake.runtime import keep_freed_memory
from kvcake.model import KVCache, SamplingParams, Sampler, load_model, resolve_device, resolve_dtype, weights_identity
from kvcake.schedule import CostProfile, PrefixPrefill, PrefixReport, Strategy, WriteBack
from kvcake.store import KVStore, model_fingerprint, open_store, prefix_chunk_keys


class RequestError(ValueError):
    """The request itself is invalid (empty, too long for the context, bad parameters)."""


@dataclass
class GenerateRequest:
    """A prompt as plain text, chat messages, or token ids (exactly one of them)."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    chat: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reuse: str | None = None
    tenant: str | None = None


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
    """One generated token, the logits it was drawn from, and why generation ended (on the last)."""

    token_id: int
    logits: torch.Tensor
    finish_reason: str | None


@dataclass
class Prefill:
    """The state after the prompt: its KV cache and the logits of the last prompt token."""

    cache: KVCache
    last_logits: torch.Tensor
    next_position: int


class Engine:
    def __init__(self, config: KvcakeConfig, store: KVStore | None = None):
        self.config = config
        self.default_strategy = Strategy.parse(config.reuse)
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
        self.cost_profile = CostProfile()

    def close(self) -> None:
        self.writeback.close()
        self.store.close()

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        given = [x is not None for x in (request.prompt, request.messages, request.token_ids)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages or token_ids")
        if request.token_ids is not None:
            ids = list(request.token_ids)
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"token ids must lie in [0, {vocab})")
        elif request.messages is not None:
            ids = self.tokenizer.encode(self.tokenizer.render_chat(request.messages))
        elif request.chat and self.tokenizer.has_chat_template:
            ids = self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": request.prompt}]))
        else:
            ids = self.tokenizer.encode(request.prompt or "")
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {self.context_length}")
        return ids

    def prefill(self, prompt_ids: list[int], capacity: int, strategy: Strategy | None = None, tenant: str | None = None) -> tuple[Prefill, PrefixReport]:
        """KV of the prompt: the longest stored prefix by `strategy`, then the rest computed.

        Only chunks that end before the last prompt token are reused, since the first
        token's logits need that token computed. Computed full chunks are written back.
        """
        chunk_size = self.config.chunk_size
        keys = prefix_chunk_keys(self.fingerprint, self.config.tenant if tenant is None else tenant, prompt_ids, chunk_size)
        reusable = keys[: (len(prompt_ids) - 1) // chunk_size]
        num_hit = self._stored_prefix_length(reusable)
        cache = self.model.new_cache(capacity)
        prefix = PrefixPrefill(self.model, chunk_size, prompt_ids, self._chunk_loader(reusable), self.cost_profile)
        report = prefix.run(cache, num_hit, strategy or self.default_strategy)
        started = time.perf_counter()
        last_logits = self._compute_rest(prompt_ids, cache, num_hit, keys)
        report.compute_s += time.perf_counter() - started
        for index, (k, v) in prefix.computed_kv.items():
            self.writeback.submit(keys[index], k, v)
        return Prefill(cache, last_logits, len(prompt_ids)), report

    def _stored_prefix_length(self, keys: list[str]) -> int:
        for index, key in enumerate(keys):
            if not self.store.contains(key):
                return index
        return len(keys)

    def _chunk_loader(self, keys: list[str]):
        layers = self.model.config.num_layers
        chunk_size = self.config.chunk_size

        def load(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int] | None:
            chunk = self.store.get(keys[index])
            if chunk is None or chunk.num_layers != layers or chunk.num_tokens != chunk_size:
                return None
            return chunk.keys, chunk.values, chunk.nbytes

        return load

    def _compute_rest(self, prompt_ids: list[int], cache: KVCache, first_chunk: int, keys: list[str]) -> torch.Tensor:
        """Compute chunks from `first_chunk` on, queueing each full one for write-back."""
        chunk_size = self.config.chunk_size
        ids = torch.tensor(prompt_ids, dtype=torch.long)
        logits = None
        for index in range(first_chunk, -(-len(prompt_ids) // chunk_size)):
            start, end = index * chunk_size, min((index + 1) * chunk_size, len(prompt_ids))
            out = self.model.forward(ids[start:end], torch.arange(start, end), cache, keep_kv=index < len(keys))
            if index < len(keys):
                self.writeback.submit(keys[index], out.keys, out.values)
            logits = out.logits
        assert logits is not None
        return logits[-1]

    def generate(self, request: GenerateRequest) -> GenerateResult:
        token_ids: list[int] = []
        first_logits = None
        finish_reason = "length"
        metrics = RequestMetrics()
        for step in self.stream(request, metrics):
            token_ids.append(step.token_id)
            first_logits = step.logits if first_logits is None else first_logits
            finish_reason = step.finish_reason or finish_reason
        assert first_logits is not None
        return GenerateResult(self.tokenizer.decode(token_ids), token_ids, finish_reason, first_logits, metrics)

    def stream(self, request: GenerateRequest, metrics: RequestMetrics) -> Iterator[Step]:
        """Yield generated tokens one by one; `metrics` is filled in as the request runs."""
        started = time.perf_counter()
        prompt_ids = self.prompt_ids(request)
        params = request.sampling
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        strategy = Strategy.parse(request.reuse) if request.reuse else self.default_strategy
        with torch.inference_mode():
            state, report = self.prefill(prompt_ids, len(prompt_ids) + budget, strategy, request.tenant)
            metrics.prompt_tokens = len(prompt_ids)
            metrics.tokens_loaded = report.tokens_loaded
            metrics.tokens_computed = len(prompt_ids) - report.tokens_loaded
            metrics.prefix = report
            metrics.prefill_s = time.perf_counter() - started
            yield from self._decode(state, Sampler(params, self.model.device), budget, metrics, started)

    def _decode(self, state: Prefill, sampler: Sampler, budget: int, metrics: RequestMetrics, started: float) -> Iterator[Step]:
        logits = state.last_logits
        position = state.next_position
        decode_started = time.perf_counter()
        for index in range(budget):
            token = sampler(logits)
            if index == 0:
                metrics.ttft_s = time.perf_counter() - started
                decode_started = time.perf_counter()
            metrics.generated_tokens = index + 1
            stopped = token in self.tokenizer.stop_ids
            last = stopped or index == budget - 1
            yield Step(token, logits, ("stop" if stopped else "length") if last else None)
            if last:
                break
            out = self.model.forward(torch.tensor([token]), torch.tensor([position]), state.cache)
            logits = out.logits[-1]
            position += 1
        metrics.decode_s = time.perf_counter() - decode_started
