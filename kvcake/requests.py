"""Requests as the engine takes them, what it gives back, and the checks that refuse bad ones.

`RequestPlanner` turns a request into its planned prompt (token ids with the exact prefix
and the documents marked) and refuses what cannot run, naming the cause, before any
work starts: a server calls `check` when a request arrives, so a bad one costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvcake.model import KVCache, SamplingParams, Tokenizer
from kvcake.model.grammar import GrammarError, JsonConstraint
from kvcake.model.segments import PromptLayout, Segments, document_preamble, document_token_ids, layout, split_prompt
from kvcake.reuse import DocumentReport, Pace, PrefixReport, Strategy, Waiting, parse_mode
MAX_CHOICES = 16
"""Most choices (`n`) one request may ask for: each holds its own copy of the prompt's KV."""


class RequestError(ValueError):
    """The request itself is invalid (empty, too long for the context, bad parameters)."""


@dataclass
class GenerateRequest:
    """A prompt as plain text, chat messages, token ids, or a query over documents (exactly one of them).

    With `query`, `documents` are reusable segments placed in the given order after
    the `system` text; a plain `prompt` is also cut into documents + query by the
    configured separator. `reuse` is a prefix strategy, `blend` (documents' stored
    KV blended at `ratio`) or `tune`.
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
    reuse: str | None = None
    """The document mode whose stored layout to write (blend or tune); None: the engine's `reuse` decides."""


@dataclass
class RequestMetrics:
    """A request's accounting: `prefix` says how the stored prefix was reused, `documents` how the documents were."""

    prompt_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_computed: int = 0
    tokens_loaded: int = 0
    generated_tokens: int = 0
    prefix: PrefixReport = field(default_factory=PrefixReport)
    documents: DocumentReport | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def accounting(self) -> dict[str, Any]:
        """How the prompt's KV was obtained, in the one form every renderer shows: the HTTP response's `kvcake`
        field (and so the demo), the CLI's summary lines, the Prometheus counters. `reuse` names the mode that
        served the request, `prefix_strategy` the one that served its exact prefix; the `documents_` fields stay
        0 (and `ratio` None) without documents."""
        documents, prefix = self.documents, self.prefix
        return {
            "ttft_s": self.ttft_s,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "decode_s": self.decode_s,
            "tokens_computed": self.tokens_computed,
            "tokens_loaded": self.tokens_loaded,
            "tokens_recomputed": documents.tokens_recomputed if documents else 0,
            "reuse": documents.mode if documents else prefix.strategy,
            "prefix_strategy": prefix.strategy,
            "prefix_stored_chunks": prefix.stored_chunks,
            "prefix_hit_chunks": prefix.hit_chunks,
            "prefix_tail_tokens_loaded": prefix.tail_tokens_loaded,
            "prefix_load_failures": prefix.load_failures,
            "prefix_chunks_prefetched": prefix.chunks_prefetched,
            "prefix_bytes_loaded": prefix.bytes_loaded,
            "prefix_compute_s": prefix.compute_s,
            "prefix_io_wait_s": prefix.io_wait_s,
            "meet_chunk": prefix.meet_chunk,
            "ratio": documents.ratio if documents else None,
            "documents": documents.documents if documents else 0,
            "documents_stored": documents.documents_stored if documents else 0,
            "documents_computed": documents.documents_computed if documents else 0,
            "documents_tokens_reused": documents.tokens_reused if documents else 0,
            "documents_bytes_loaded": documents.bytes_loaded if documents else 0,
            "documents_load_wait_s": documents.load_wait_s if documents else 0.0,
            "fallback": documents.fallback if documents else "",
        }


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
class DecodeStep:
    """A choice's newest token, to run through the model at `position` over `cache`.

    `Engine.run` yields it and expects that token's logits back (``send``); a driver may
    answer several requests' decode steps with one batched forward."""

    token_id: int
    position: int
    cache: KVCache


Work = Step | DecodeStep | Waiting | Pace | None
"""What `Engine.run` yields: a generated token (send True to end its choice), a decode step
(send its logits), None: a pause after a unit of prefill work (send None, or `ALONE` when no other request
waits for the compute: the next pass may be longer), `PACE`: the same question before the first of several
passes (answer it at once, it is no unit of work), or `WAITING`: a pause
in which it did nothing, waiting for another request's chunks (send None, after running others)."""


def parse_reuse(text: str) -> Strategy | str:
    """A prefix strategy, `blend` or `tune`; a bad value is the request's fault."""
    try:
        return parse_mode(text)
    except ValueError as error:
        raise RequestError(str(error)) from None


SAMPLE_CHARS_PER_TOKEN = 8
"""A prompt longer than context x this many characters has a sample that long tokenized first (text
averages about 4 characters per token), so a body just under the loose character bound is refused
after tokenizing that sample, not all of it."""


@dataclass(frozen=True)
class RequestPlanner:
    """Plans requests' prompts for one model and refuses invalid requests with the cause named.
    `default_ratio` is the blend ratio a request without one gets."""

    tokenizer: Tokenizer
    vocab_size: int
    context_length: int
    separator: str
    max_documents: int
    default_ratio: float

    def check(self, request: GenerateRequest) -> PromptLayout:
        """Raise `RequestError` now for whatever the engine would refuse; else the planned prompt."""
        planned = self.plan(request)
        self.check_sampling(request)
        if request.reuse:
            parse_reuse(request.reuse)
        self.check_ratio(request)
        return planned

    def plan(self, request: GenerateRequest) -> PromptLayout:
        """Token ids of the request's prompt, with the exact prefix and the documents marked."""
        given = [x is not None for x in (request.prompt, request.messages, request.token_ids, request.query)]
        if sum(given) != 1:
            raise RequestError("give exactly one of prompt, messages, token_ids or query")
        if request.documents and request.query is None:
            raise RequestError("documents need a query (the text asked about them)")
        segments = Segments(request.query, tuple(request.documents), request.system) if request.query is not None else None
        if request.prompt is not None and (split := split_prompt(request.prompt, self.separator)) is not None:
            segments = Segments(split.query, split.documents, request.system)
        self._check_length_bound([request.prompt, request.query, request.system, *request.documents, *(m.get("content", "") for m in request.messages or ())])
        if segments is not None:
            self._check_document_count(len(segments.documents))
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

    def plan_documents(self, documents: list[str], chat: bool, system: str | None) -> tuple[tuple[int, ...], list[list[int]]]:
        """Documents to store on their own: the preamble they are computed after, and each one's token ids."""
        self._check_document_count(len(documents))
        self._check_length_bound([system, *documents])
        preamble = document_preamble(self.tokenizer, chat, system)
        ids = [document_token_ids(self.tokenizer, text) for text in documents]
        room = self.context_length - len(preamble) - 1
        if any(len(doc) > room for doc in ids):
            raise RequestError(f"a document has {max(len(doc) for doc in ids)} tokens; after the preamble the context holds {room}")
        return preamble, ids

    def check_sampling(self, request: GenerateRequest) -> None:
        if not 1 <= request.n <= MAX_CHOICES:
            raise RequestError(f"n must lie in [1, {MAX_CHOICES}], got {request.n}")
        self.constraint(request)
        if any(token >= self.vocab_size for token, _ in request.sampling.logit_bias):
            raise RequestError(f"logit_bias: token ids must lie in [0, {self.vocab_size})")

    def check_ratio(self, request: GenerateRequest) -> None:
        ratio = self.default_ratio if request.ratio is None else request.ratio
        if not 0.0 <= ratio <= 1.0:
            raise RequestError(f"ratio must lie in [0, 1], got {ratio}")

    def constraint(self, request: GenerateRequest) -> JsonConstraint | None:
        """The JSON grammar a request's answer must follow (None without `json_output`)."""
        if not request.json_output:
            return None
        try:
            return JsonConstraint(self.tokenizer.grammar_tokenizer, request.json_schema)
        except (GrammarError, ValueError) as error:
            raise RequestError(str(error)) from None

    def _check_document_count(self, count: int) -> None:
        if count > self.max_documents:
            raise RequestError(f"{count} documents; the limit is max_documents = {self.max_documents}")

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
        sample_chars = self.context_length * SAMPLE_CHARS_PER_TOKEN
        if characters > sample_chars:
            # The bound above is loose (a vocabulary's longest entry is a long run of spaces): tokenize only
            # a sample as long as a prompt that fills the context would be; if it already holds more tokens
            # than the context (beyond a token per text cut at its end), the whole cannot fit either.
            sample = "\n".join(text for text in texts if text)[:sample_chars]
            counted = len(self.tokenizer.encode(sample))
            if counted > self.context_length + len(texts):
                raise RequestError(
                    f"the prompt has {characters} characters; its first {sample_chars} alone are {counted} tokens, more than "
                    f"the model's context of {self.context_length} tokens"
                )

    def _plain_ids(self, request: GenerateRequest) -> list[int]:
        if request.token_ids is not None:
            if any(not 0 <= t < self.vocab_size for t in request.token_ids):
                raise RequestError(f"token ids must lie in [0, {self.vocab_size})")
            return list(request.token_ids)
        if request.messages is not None:
            return self.tokenizer.encode(self.tokenizer.render_chat(request.messages))
        if request.chat and self.tokenizer.has_chat_template:
            return self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": request.prompt}]))
        return self.tokenizer.encode(request.prompt or "")
