"""`kvcake serve`: an OpenAI-compatible HTTP API over the engine, with KV reuse.

Routes: `/v1/completions`, `/v1/chat/completions` (both with server-sent-event
streaming), `/v1/models`, `POST /v1/kv/documents` (warm documents), `/health`,
`/metrics` (Prometheus). Errors use OpenAI's body, `{"error": {"message", "type",
"param", "code"}}`, with a 4xx status naming the cause. With `api_keys` set, `/v1/*`
needs `Authorization: Bearer KEY`, and the key's tenant salts every cache key of the
request, so tenants never hit (or time) each other's entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcake.config import KvcakeConfig
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, RequestError, RequestMetrics, WarmRequest
from kvcake.model import SamplingParams
from kvcake.model.segments import PromptLayout
from kvcake.reuse import document_mode
from kvcake.server.guard import CLIENT_GONE, ApiError, Guard
from kvcake.server.metrics import ServerMetrics
from kvcake.server.schemas import ChatBody, CompletionBody, JsonObjectFormat, JsonSchemaFormat, SamplingFields, WarmBody
from kvcake.server.worker import Cancelled, ComputeWorker, Done, Event, Failed, Job, PromptLogprobs, QueueFull, TokenEvent, TokenLogprob

DISCONNECT_POLL_S = 0.25
MAX_PROMPTS = 16
"""Most prompts one completion request may carry (each is its own job in the compute queue)."""
"""How often a non-streamed request checks whether its client is still there."""


def create_app(engine: Engine) -> FastAPI:
    """The API over `engine`. Endpoints find the engine, worker and metrics in `app.state`, never in
    their closures: FastAPI keeps endpoint callables in a process-wide cache, which would keep a
    stopped server's engine (weights, store, cache pool) alive."""
    config = engine.config
    metrics = ServerMetrics()
    worker = ComputeWorker(engine, config.max_queue, config.io_threads, metrics.record, config.max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="kvcake", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics

    app.add_middleware(Guard, config=config, metrics=metrics, routes=lambda: app.router.routes)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        # of a union's alternatives, the one that got past the type check says most
        first = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body" and "[" not in str(part))
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        elif first.get("type") == "extra_forbidden":
            message = f"{where}: kvcake does not support this field"
        else:
            message = f"{where or 'body'}: {first.get('msg')}"
        return ApiError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None).response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": config.model}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        state = request.app.state
        data = state.metrics.render(state.engine.stats(), state.worker.depth, state.worker.starting)
        return Response(data, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(config)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(model_id, config)
        return _model_card(config)

    @app.post("/v1/kv/documents", response_model=None)
    async def warm(body: WarmBody, request: Request) -> dict[str, Any] | Response:
        _check_model(body.model or config.model, config)
        if len(body.documents) > config.max_documents:
            raise ApiError(400, f"{len(body.documents)} documents; the limit is max_documents = {config.max_documents}", param="documents")
        job, events = _submit(request.app.state.worker, WarmRequest(body.documents, request.state.tenant, body.chat, body.system, body.reuse), None)
        async with _cancelled_on_disconnect(request, [job]):
            event = await events.get()
        if isinstance(event, Failed):
            raise _as_api_error(event.error)
        if not isinstance(event, Done):
            return Response(status_code=CLIENT_GONE)
        return {"object": "list", "data": [{"key": key, "tokens": tokens, "already_stored": present} for key, tokens, present in event.result]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        generates = _completion_requests(body, config, request.state.tenant)
        return await _respond(generates, body, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        generate = _chat_request(body, config, request.state.tenant)
        return await _respond([generate], body, "chat.completion", request)

    return app


def _model_card(config: KvcakeConfig) -> dict[str, Any]:
    return {"id": config.model, "object": "model", "created": 0, "owned_by": "kvcake"}


def _check_model(model: str, config: KvcakeConfig) -> None:
    if model != config.model:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {config.model!r}", code="model_not_found", param="model")


def _sampling(body: SamplingFields, max_tokens: int | None, config: KvcakeConfig) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens or config.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=_logit_bias(body.logit_bias), ignore_eos=bool(body.ignore_eos),
        )
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    if not all(token.isdigit() for token in bias):
        raise ApiError(400, "logit_bias: keys must be token ids (decimal strings)", param="logit_bias")
    return tuple((int(token), value) for token, value in bias.items())


def _completion_requests(body: CompletionBody, config: KvcakeConfig, tenant: str) -> list[GenerateRequest]:
    """One request per prompt (a list of texts is several prompts; a list of ints is one prompt's token ids)."""
    _check_model(body.model, config)
    prompts = body.prompt if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str) else [body.prompt]
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"{len(prompts)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    if len(prompts) > config.max_queue:  # all are queued at once, so more than the queue holds could never be served
        raise ApiError(400, f"{len(prompts)} prompts; the server's queue holds at most max_queue = {config.max_queue}", param="prompt")
    return [_completion_request(body, prompt, config, tenant) for prompt in prompts]


def _completion_request(body: CompletionBody, prompt: str | list[int], config: KvcakeConfig, tenant: str) -> GenerateRequest:
    common = {"sampling": _sampling(body, body.max_tokens, config), "tenant": tenant, "ratio": body.ratio, "chat": False, "n": body.n}
    if body.kv_documents is not None:
        if not isinstance(prompt, str):
            raise ApiError(400, "with kv_documents the prompt must be text (the query)", param="prompt")
        return GenerateRequest(query=prompt, documents=body.kv_documents, system=body.kv_system, reuse=body.reuse or document_mode(None, config.reuse), **common)
    if isinstance(prompt, list):
        return GenerateRequest(token_ids=prompt, reuse=body.reuse, **common)
    return GenerateRequest(prompt=prompt, reuse=body.reuse, **common)


def _json_output(body: ChatBody) -> dict[str, Any]:
    """`response_format` as the engine's constraint: any JSON object, or JSON fitting a schema."""
    form = body.response_format
    if isinstance(form, JsonObjectFormat):
        return {"json_output": True}
    if isinstance(form, JsonSchemaFormat):
        return {"json_output": True, "json_schema": form.json_schema.schema_}
    return {}


def _chat_request(body: ChatBody, config: KvcakeConfig, tenant: str) -> GenerateRequest:
    _check_model(body.model, config)
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, config)
    common = {"sampling": sampling, "tenant": tenant, "ratio": body.ratio, "n": body.n, **_json_output(body)}
    messages = [message.model_dump() for message in body.messages]
    if body.kv_documents is None:
        return GenerateRequest(messages=messages, reuse=body.reuse, **common)
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user" or len(system) > 1:
        raise ApiError(400, "with kv_documents the messages must be at most one system message and one user message", param="messages")
    return GenerateRequest(query=turns[0]["content"], documents=body.kv_documents, system=system[0] if system else None, reuse=body.reuse or document_mode(None, config.reuse), **common)


def _logprobs_wanted(body: SamplingFields) -> int | None:
    """None when no log probabilities were asked for, else how many alternatives per token."""
    if isinstance(body, ChatBody):
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs if isinstance(body, CompletionBody) else None


def _echo(body: SamplingFields) -> bool:
    return isinstance(body, CompletionBody) and bool(body.echo)


def _prompt_text(engine: Engine, generate: GenerateRequest) -> str:
    """The prompt as the client sent it: its text, or its token ids decoded."""
    if generate.token_ids is not None:
        return engine.tokenizer.decode(generate.token_ids)
    return generate.prompt if generate.prompt is not None else generate.query or ""


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)


def _submit(
    worker: ComputeWorker,
    request: GenerateRequest | WarmRequest,
    planned: PromptLayout | None,
    stop: tuple[str, ...] = (),
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
) -> tuple[Job, asyncio.Queue[Event]]:
    """Queue a job whose events arrive on the returned asyncio queue; 429 when the compute queue is full."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(request, planned, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), stop=stop, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    try:
        worker.submit(job)
    except QueueFull as error:
        raise ApiError(429, str(error), kind="rate_limit_error", code="queue_full") from None
    return job, events


@contextlib.asynccontextmanager
async def _cancelled_on_disconnect(request: Request, jobs: list[Job]) -> AsyncIterator[None]:
    """While the block runs, a watcher cancels `jobs` as soon as the client disconnects."""

    def cancel() -> None:
        for job in jobs:
            job.cancelled.set()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        request.app.state.metrics.disconnects.inc()
        cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        cancel()


async def _respond(generates: list[GenerateRequest], body: SamplingFields, kind: str, request: Request):
    """Plan every prompt, queue one job per prompt (all or none: 429 when they do not fit), and answer their
    choices in order: prompt p's choice i has index p * n + i."""
    engine, worker = request.app.state.engine, request.app.state.worker
    try:
        planned = [await asyncio.to_thread(engine.check, generate) for generate in generates]
    except RequestError as error:
        raise ApiError(400, str(error)) from None
    logprobs = _logprobs_wanted(body)
    submitted: list[tuple[Job, asyncio.Queue]] = []
    try:
        for generate, plan in zip(generates, planned):
            submitted.append(_submit(worker, generate, plan, _stops(body.stop), logprobs, _echo(body) and logprobs is not None))
    except ApiError:
        for job, _ in submitted:
            job.cancelled.set()
        raise
    echoed = [_prompt_text(engine, generate) for generate in generates for _ in range(body.n)] if _echo(body) else None
    reply = _Reply(kind, body.model, body.n * len(generates), logprobs is not None, echoed)
    if body.stream:
        return StreamingResponse(_stream(submitted, reply, body.n), media_type="text/event-stream")
    metrics: list[RequestMetrics] = []
    async with _cancelled_on_disconnect(request, [job for job, _ in submitted]):
        try:
            async for item in _dispatch(submitted, reply, body.n):
                if isinstance(item, RequestMetrics):
                    metrics.append(item)
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
    return reply.complete(metrics)


class _ClientGone(Exception):
    """A job was cancelled because its client left."""


async def _dispatch(submitted: list[tuple[Job, asyncio.Queue[Event]]], reply: _Reply, n: int) -> AsyncIterator[dict[str, Any] | RequestMetrics]:
    """The one reader of jobs' events: each prompt's events, in prompt order, applied to `reply`. Yields every
    stream chunk the reply makes and each prompt's metrics when it is done; a failed job raises its error as
    an `ApiError`, a cancelled one `_ClientGone`."""
    for prompt_index, (_, events) in enumerate(submitted):
        while True:
            event = await events.get()
            if isinstance(event, TokenEvent):
                if (chunk := reply.add(event, prompt_index * n)) is not None:
                    yield chunk
            elif isinstance(event, PromptLogprobs):
                reply.add_prompt(event.entries, prompt_index * n, n)
            elif isinstance(event, Failed):
                raise _as_api_error(event.error)
            elif isinstance(event, Cancelled):
                raise _ClientGone
            else:
                assert isinstance(event.result, RequestMetrics)
                yield event.result
                break


async def _stream(submitted: list[tuple[Job, asyncio.Queue[Event]]], reply: _Reply, n: int) -> AsyncIterator[str]:
    """SSE chunks; an error before the first token is sent as an error event. A disconnect cancels the jobs."""
    metrics: list[RequestMetrics] = []
    try:
        if (echoed := reply.echo_chunk()) is not None:
            yield _sse(echoed)
        async for item in _dispatch(submitted, reply, n):
            if isinstance(item, RequestMetrics):
                metrics.append(item)
            else:
                yield _sse(item)
        yield _sse(reply.final_chunk(metrics))
        yield "data: [DONE]\n\n"
    except ApiError as error:
        yield _sse(error.body())
        yield "data: [DONE]\n\n"
    except _ClientGone:
        return
    finally:
        for job, _ in submitted:
            job.cancelled.set()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _as_api_error(error: Exception) -> ApiError:
    if isinstance(error, (RequestError, ValueError)):
        return ApiError(400, str(error))
    return ApiError(500, f"internal error: {type(error).__name__}", kind="server_error")


@dataclass
class _Choice:
    """One choice's answer so far: released text, why it ended, its tokens' log probabilities (`sent` of them streamed)."""

    parts: list[str] = field(default_factory=list)
    finish_reason: str = "length"
    entries: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0


class _Reply:
    """Builds the OpenAI response (or its stream chunks) from the worker's token events, for `n` choices.

    Log probabilities are per token while text is released when complete (a stop
    sequence or an unfinished character holds it back), so a chunk carries the entries
    of every token of its choice since that choice's previous chunk.
    """

    def __init__(self, kind: str, model: str, n: int = 1, logprobs: bool = False, echoed: list[str] | None = None):
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices = [_Choice([echoed[index]] if echoed else []) for index in range(n)]
        self.logprobs = logprobs

    def echo_chunk(self) -> dict[str, Any] | None:
        """With echo: the first stream chunk, each choice's prompt text."""
        if not any(choice.parts for choice in self.choices):
            return None
        return self._chunk([self._delta(index, "".join(choice.parts), None) for index, choice in enumerate(self.choices)])

    def add_prompt(self, entries: list[TokenLogprob], offset: int, n: int) -> None:
        """The prompt tokens' log probabilities (echo) go before choices offset .. offset + n - 1's own (streamed
        with each choice's next chunk)."""
        for choice in self.choices[offset : offset + n]:
            choice.entries[:0] = entries

    def add(self, event: TokenEvent, offset: int = 0) -> dict[str, Any] | None:
        """Record a token of choice `offset + event.step.choice`; the chunk with its new text, if it completes any."""
        index = offset + event.step.choice
        choice = self.choices[index]
        choice.finish_reason = event.finish_reason or choice.finish_reason
        if event.logprob is not None:
            choice.entries.append(event.logprob)
        if not event.text:
            return None
        choice.parts.append(event.text)
        return self._chunk([self._delta(index, event.text, None)])

    def complete(self, metrics: list[RequestMetrics]) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(self.choices):
            text = "".join(choice.parts)
            body: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason, "logprobs": self._logprobs(choice, 0, len(choice.entries))}
            if self.kind == "chat.completion":
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["text"] = text
            choices.append(body)
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": _usage(metrics), "kvcake": _accountings(metrics)}

    def final_chunk(self, metrics: list[RequestMetrics]) -> dict[str, Any]:
        chunk = self._chunk([self._delta(index, "", choice.finish_reason) for index, choice in enumerate(self.choices)])
        chunk["usage"] = _usage(metrics)
        chunk["kvcake"] = _accountings(metrics)
        return chunk

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _delta(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = self.choices[index]
        first, choice.sent = choice.sent, len(choice.entries)
        logprobs = self._logprobs(choice, first, choice.sent) if choice.sent > first else None
        if self.kind == "chat.completion":
            return {"index": index, "delta": {"role": "assistant", "content": text} if text else {}, "finish_reason": finish_reason, "logprobs": logprobs}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}

    def _logprobs(self, choice: _Choice, first: int, last: int) -> dict[str, Any] | None:
        """Entries [first, last) in OpenAI's shape: chat `{"content": [...]}`, completions `{"tokens",
        "token_logprobs", "top_logprobs", "text_offset"}` (offsets count the tokens' own texts from the answer's start)."""
        if not self.logprobs:
            return None
        entries = choice.entries[first:last]
        if self.kind == "chat.completion":
            return {"content": [
                {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                 "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in e.top]}
                for e in entries
            ]}
        offsets, position = [], sum(len(e.token) for e in choice.entries[:first])
        for e in entries:
            offsets.append(position)
            position += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                # a shared text keeps its best; a prompt's first token has no prediction
                "top_logprobs": [None if e.logprob is None else dict(reversed(e.top)) for e in entries], "text_offset": offsets}


def _usage(metrics: list[RequestMetrics]) -> dict[str, int]:
    prompt, completion = sum(m.prompt_tokens for m in metrics), sum(m.generated_tokens for m in metrics)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _accountings(metrics: list[RequestMetrics]) -> dict[str, Any] | list[dict[str, Any]]:
    """The `kvcake` field: one prompt's accounting, or a list of them (one per prompt) for several prompts."""
    return metrics[0].accounting() if len(metrics) == 1 else [m.accounting() for m in metrics]


