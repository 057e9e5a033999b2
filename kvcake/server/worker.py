"""One compute thread in front of the engine, fed by a bounded queue, and an I/O pool beside it.

The engine runs one request at a time (one model, one KV cache per request). Requests,
and warm calls that store documents, wait in one bounded queue; a full queue is refused
at once (the API answers 429). While a request waits, an I/O thread loads its stored
prefix chunks from the back (`Engine.prefetch_prefix`), so its Cake prefill starts with
them in hand: storage reads overlap the compute of the request ahead. Each job streams
its events back through `emit`, which the HTTP layer makes thread-safe; generated
tokens are detokenized here, incrementally, never on the event loop. A job whose client
went away is skipped, or stopped at its next token (a warm call, before its next batch).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcake.engine import Engine, GenerateRequest, RequestMetrics, Step, WarmRequest
from kvcake.schedule import PrefixPrefetch
from kvcake.segments import PromptLayout
from kvcake.server.stops import StopMatcher

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """No room for another request; retry later."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log probability (a log-softmax of the model's logits), with the `top` alternatives."""

    token: str
    logprob: float | None
    """None for a prompt's first token (nothing predicts it)."""
    top: tuple[tuple[str, float], ...]


@dataclass
class TokenEvent:
    """A generated token, the text it releases, why generation ended (on the last one), and its log probability if asked."""

    step: Step
    text: str
    finish_reason: str | None
    logprob: TokenLogprob | None = None


@dataclass
class Job:
    """A request and where its events go: ("token", TokenEvent) ..., then ("done", RequestMetrics) or ("error", Exception).

    A warm job's only event is ("done", what `Engine.warm` returned) or ("error", ...). A job
    skipped because its client had already left gets ("cancelled", None).
    """

    request: GenerateRequest | WarmRequest
    planned: PromptLayout | None
    emit: Callable[[tuple[str, Any]], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """None: no log probabilities; k: the chosen token's and the k most likely ones'."""
    prompt_logprobs: bool = False
    """Also the prompt's tokens' log probabilities (echo), sent first as ("prompt_logprobs", [TokenLogprob])."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    prefetch: PrefixPrefetch | None = None
    started: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ComputeWorker:
    """Runs jobs one by one; `on_finished(metrics, cancelled)` sees every generation that started, abandoned ones too."""

    def __init__(self, engine: Engine, max_queue: int, io_threads: int, on_finished: Callable[[RequestMetrics, bool], None]):
        self.engine = engine
        self._on_finished = on_finished
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="kvcake-prefetch") if io_threads else None
        self._queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="kvcake-compute", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull("the server is at capacity; retry later") from None
        if self._io is not None and isinstance(job.request, GenerateRequest):
            self._io.submit(self._prefetch, job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._io is not None:
            self._io.shutdown(cancel_futures=True)

    def _prefetch(self, job: Job) -> None:
        """Load the waiting job's stored prefix; nothing happens once the job has started."""
        assert isinstance(job.request, GenerateRequest)
        try:
            with job.lock:
                if job.started or job.cancelled.is_set():
                    return
                job.prefetch = self.engine.prefetch_prefix(job.request, job.planned)
            if job.prefetch is not None:
                job.prefetch.run()
        except Exception:
            log.exception("prefetching a waiting request's prefix failed; it will load on its own")

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            with job.lock:
                job.started = True
            try:
                if job.cancelled.is_set():
                    job.emit(("cancelled", None))
                    continue
                if isinstance(job.request, WarmRequest):
                    self._warm(job, job.request)
                else:
                    self._generate(job, job.request)
            except Exception as error:
                if not isinstance(error, ValueError):
                    log.exception("request failed")
                job.emit(("error", error))
            finally:
                if job.prefetch is not None:
                    job.prefetch.release()

    def _generate(self, job: Job, request: GenerateRequest) -> None:
        """Stream tokens with their text, choice after choice; a stop sequence (matched on the text, across
        tokens) ends its choice, which the engine is told by `send`."""
        if job.prompt_logprobs and job.planned is not None:
            job.emit(("prompt_logprobs", self._prompt_logprobs(job.planned.token_ids, job.logprobs or 0)))
        steps = self.engine.stream(request, job.metrics, job.prefetch, job.planned)
        decoders = [self.engine.tokenizer.stream_decoder() for _ in range(request.n)]
        stops = [StopMatcher(job.stop) for _ in range(request.n)]
        step = next(steps, None)
        while step is not None and not job.cancelled.is_set():
            text, stopped = stops[step.choice].feed(decoders[step.choice].add(step.token_id))
            logprob = None if job.logprobs is None else self._logprob(step, job.logprobs)
            if not stopped and step.finish_reason is not None:
                text += stops[step.choice].flush()
            job.emit(("token", TokenEvent(step, text, "stop" if stopped else step.finish_reason, logprob)))
            try:
                step = steps.send(stopped)
            except StopIteration:
                step = None
        steps.close()
        self._on_finished(job.metrics, job.cancelled.is_set())
        job.emit(("done", job.metrics))

    def _logprob(self, step: Step, top: int) -> TokenLogprob:
        return self._entry(step.token_id, torch.log_softmax(step.logits.float(), dim=-1), top)

    def _prompt_logprobs(self, token_ids: list[int], top: int) -> list[TokenLogprob]:
        rows = self.engine.prompt_logprobs(token_ids)
        first = TokenLogprob(self.engine.tokenizer.decode([token_ids[0]]), None, ())
        return [first, *(self._entry(token, row, top) for token, row in zip(token_ids[1:], rows))]

    def _entry(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        best = logprobs.topk(top) if top else None
        decode = self.engine.tokenizer.decode
        alternatives = () if best is None else tuple((decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices))
        return TokenLogprob(decode([token]), float(logprobs[token]), alternatives)

    def _warm(self, job: Job, request: WarmRequest) -> None:
        warmed = self.engine.warm(request.documents, request.tenant, request.chat, system=request.system, stop=job.cancelled)
        job.emit(("done", warmed))
