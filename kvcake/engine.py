"""One request from text to tokens: tokenize, prefill in chunks, decode, account."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from kvcake.config import KvcakeConfig
from kvcake.model import KVCache, SamplingParams, Sampler, load_model, resolve_device, resolve_dtype


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


@dataclass
class RequestMetrics:
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_computed: int = 0
    generated_tokens: int = 0

    def as_dict(self) -> dict[str, float | int]:
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
    def __init__(self, config: KvcakeConfig):
        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        self.model, self.tokenizer, self.model_folder = load_model(
            config.model, config.cache_path(), device, resolve_dtype(config.dtype, device)
        )
        self.context_length = self.model.config.max_position_embeddings

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

    def prefill(self, prompt_ids: list[int], capacity: int) -> Prefill:
        """Compute the prompt's KV chunk by chunk, each chunk attending to the ones before it."""
        cache = self.model.new_cache(capacity)
        last_logits = self.model.prefill(prompt_ids, cache, self.config.chunk_size)
        return Prefill(cache, last_logits, len(prompt_ids))

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
        with torch.inference_mode():
            state = self.prefill(prompt_ids, len(prompt_ids) + budget)
            metrics.prompt_tokens = len(prompt_ids)
            metrics.tokens_computed = len(prompt_ids)
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
