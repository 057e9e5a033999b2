"""One compute thread in front of the engine that serves up to `max_batch` requests at once.

Requests, and warm calls that store documents, wait in one bounded queue; a full queue
is refused at once (the API answers 429). The compute thread keeps up to `max_batch`
jobs running (continuous batching): each iteration gives one unit of prefill work (a
chunk or pass of a plain or Cake prefill, a pass of documents computed in isolation, a
layer of blend or tune, a pass of a warm call or of an echoed prompt's log probabilities)
to the oldest job still prefilling, then runs one decode step for every decoding request
in one batched forward (`Transformer.decode_batch`), so a long prefill delays another
client's next token by about one unit, not by the whole prefill; while no request decodes,
a prefill is told it runs `ALONE` and takes longer passes. A job joins as soon as
a slot is free and leaves when it finishes.

While a request waits, an I/O thread loads its stored prefix chunks from the back
(`Engine.prefetch_prefix`), so its Cake prefill starts with them in hand. Each job
streams its events back through `emit`, which the HTTP layer makes thread-safe;
generated tokens are detokenized here, incrementally, never on the event loop. A job
whose client went away is skipped, or stopped before its next unit of work.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcake.engine import Engine
from kvcake.requests import DecodeStep, GenerateRequest, RequestMetrics, Step, WarmRequest, Work
from kvcake.reuse import ALONE, PACE, WAIT_S, WAITING, Alone, PrefixPrefetch
from kvcake.model.segments import PromptLayout
from kvcake.runtime import confine_torch_to_this_thread
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


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens' log probabilities (echo), sent before the first token."""

    entries: list[TokenLogprob]


@dataclass(frozen=True)
class Done:
    """A job's last event: a generation's metrics, or what a warm call stored ((key, tokens, already stored) per document)."""

    result: RequestMetrics | list[tuple[str, int, bool]]


@dataclass(frozen=True)
class Failed:
    """A job's last event when it failed: a `ValueError` is the request's fault, anything else the server's."""

    error: Exception


@dataclass(frozen=True)
class Cancelled:
    """A job's last event when its client left before it ran (or during a warm call)."""


Event = TokenEvent | PromptLogprobs | Done | Failed | Cancelled
"""What a job emits: tokens (after `PromptLogprobs` when asked for), then one of `Done`, `Failed`, `Cancelled`."""


@dataclass
class Job:
    """A request and where its events go (see `Event`). A warm job's only event is its `Done`,
    `Failed` or `Cancelled`."""

    request: GenerateRequest | WarmRequest
    planned: PromptLayout | None
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    """None: no log probabilities; k: the chosen token's and the k most likely ones'."""
    prompt_logprobs: bool = False
    """Also the prompt's tokens' log probabilities (echo), sent first as `PromptLogprobs`."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    prefetch: PrefixPrefetch | None = None
    started: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Running:
    """A started job (a generation or a warm call): its coroutine, what it asked for last, and each choice's text state."""

    job: Job
    work: Generator[Work, Any, None]
    decoders: list[Any]
    stops: list[StopMatcher]
    pending: Work = None
    """None: paused in its prefill; a DecodeStep: waiting for that token's logits."""


class ComputeWorker:
    """Runs jobs, up to `max_batch` generations at once; `on_finished(metrics, cancelled)` sees every
    generation that started, abandoned ones too, and every warm call abandoned while it ran (with
    metrics None: a warm call generates nothing)."""

    def __init__(self, engine: Engine, max_queue: int, io_threads: int, on_finished: Callable[[RequestMetrics | None, bool], None],
                 max_batch: int = 1):
        self.engine = engine
        self._on_finished = on_finished
        self._max_batch = max_batch
        self._closing = False
        self.decode_steps = 0
        """Batched decode forwards run so far; with `decode_rows` (tokens they produced) the mean batch size."""
        self.decode_rows = 0
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="kvcake-prefetch", initializer=confine_torch_to_this_thread) if io_threads else None
        self._queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="kvcake-compute", daemon=True)
        self._thread.start()
        self._start_up: Future[None] | None = self._io.submit(self._map_read_buffers) if self._io is not None else None

    def _map_read_buffers(self) -> None:
        """At start-up, on an I/O thread: the store's read buffers, mapped before the first load needs them."""
        try:
            mapped = self.engine.map_read_buffers()
        except Exception:
            log.exception("mapping the store's read buffers failed; the first loads map their own")
            return
        log.info("mapped %d MB of read buffers for the store", mapped >> 20)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def starting(self) -> bool:
        """Whether start-up work (mapping the store's read buffers) still runs on an I/O thread; requests are
        served meanwhile, beside it."""
        return self._start_up is not None and not self._start_up.done()

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
        running: list[_Running] = []
        with torch.inference_mode():
            while self._admit(running):
                self._cancel_abandoned(running)
                self._prefill_unit(running)
                self._decode_step(running)

    # ---- scheduling -------------------------------------------------------------------

    def _admit(self, running: list[_Running]) -> bool:
        """Start queued jobs while a slot is free (waiting only when nothing runs); False once closed and drained."""
        while not self._closing and len(running) < self._max_batch:
            if not running:
                self.engine.idle()
            try:
                job = self._queue.get(block=not running)
            except queue.Empty:
                break
            if job is None:
                self._closing = True
                break
            started = self._start(job, self._pace(running))
            if started is not None:
                running.append(started)
        return bool(running) or not self._closing

    def _cancel_abandoned(self, running: list[_Running]) -> None:
        for entry in [r for r in running if r.job.cancelled.is_set()]:
            entry.work.close()
            self._finish(entry)
            running.remove(entry)

    @staticmethod
    def _pace(running: list[_Running]) -> Alone | None:
        """`ALONE` while no request decodes: nothing then waits between a prefill's units (later prefills wait
        for the oldest in any case), so it may take longer passes; else None, and passes stay short."""
        return None if any(isinstance(r.pending, DecodeStep) for r in running) else ALONE

    def _prefill_unit(self, running: list[_Running]) -> None:
        """One chunk of the oldest prefill, so prefills advance in arrival order between decode steps. A prefill
        waiting for another request's chunks (`WAITING`) lets the next one go first, so the request it waits
        for can finish them; with only waiting ones it looks again after a short sleep (unless tokens decode)."""
        pace = self._pace(running)
        entry = next((r for r in running if r.pending is None), None)
        if entry is None:
            entry = next((r for r in running if r.pending is WAITING), None)
            if entry is None:
                return
            if pace is ALONE:
                time.sleep(WAIT_S)
        if not self._advance(entry, pace, pace):
            running.remove(entry)

    def _decode_step(self, running: list[_Running]) -> None:
        """One token for every decoding request, in one forward."""
        decoding = [r for r in running if isinstance(r.pending, DecodeStep)]
        if not decoding:
            return
        steps: list[DecodeStep] = [r.pending for r in decoding]  # type: ignore[misc]
        try:
            logits = self.engine.decode(steps)
        except Exception as error:
            log.exception("a batched decode step failed")
            for entry in decoding:
                self._fail(entry, error)
                running.remove(entry)
            return
        self.decode_steps += 1
        self.decode_rows += len(decoding)
        for entry, row in zip(decoding, logits):
            if not self._advance(entry, row):
                running.remove(entry)

    # ---- one job ------------------------------------------------------------------------

    def _start(self, job: Job, pace: Alone | None) -> _Running | None:
        """Begin a job (its first unit of work sized by `pace`); skipped and failed jobs, and ones done at once, end
        here (None)."""
        with job.lock:
            job.started = True
        try:
            if job.cancelled.is_set():
                job.emit(Cancelled())
            elif isinstance(job.request, WarmRequest):
                entry = _Running(job, self.engine.warm_steps(job.request), [], [])
                return entry if self._advance(entry, None, pace) else None
            else:
                request = job.request
                tokenizer = self.engine.tokenizer
                entry = _Running(job, self._generation(job, request), [tokenizer.stream_decoder() for _ in range(request.n)],
                                 [StopMatcher(job.stop) for _ in range(request.n)])
                return entry if self._advance(entry, None, pace) else None
        except Exception as error:
            if not isinstance(error, ValueError):
                log.exception("request failed")
            job.emit(Failed(error))
        self._release_prefetch(job)
        return None

    def _advance(self, entry: _Running, reply: Any, pace: Alone | None = None) -> bool:
        """Resume a generation until it needs the model again; emits its tokens and answers its `PACE` questions
        with `pace`. False when it has ended."""
        try:
            item = entry.work.send(reply)
            while isinstance(item, Step) or item is PACE:
                item = entry.work.send(pace if item is PACE else self._emit_token(entry, item))
        except StopIteration as done:
            self._finish(entry, done.value)
            return False
        except Exception as error:
            if not isinstance(error, ValueError):
                log.exception("request failed")
            self._fail(entry, error)
            return False
        entry.pending = item
        return True

    def _emit_token(self, entry: _Running, step: Step) -> bool:
        """Send a token with the text it releases; True when a stop sequence ends its choice."""
        job = entry.job
        stops = entry.stops[step.choice]
        decoder = entry.decoders[step.choice]
        text, stopped = stops.feed(decoder.add(step.token_id) + (decoder.finish() if step.finish_reason is not None else ""))
        logprob = None if job.logprobs is None else self._logprob(step, job.logprobs)
        if not stopped and step.finish_reason is not None:
            text += stops.flush()
        job.emit(TokenEvent(step, text, "stop" if stopped else step.finish_reason, logprob))
        return stopped

    def _finish(self, entry: _Running, warmed: list | None = None) -> None:
        """A generation ends with its metrics (counted, abandoned ones too); a warm call with what it stored."""
        job = entry.job
        if isinstance(job.request, WarmRequest):
            if warmed is None:
                self._on_finished(None, True)
            job.emit(Cancelled() if warmed is None else Done(warmed))
            return
        self._on_finished(job.metrics, job.cancelled.is_set())
        job.emit(Done(job.metrics))
        self._release_prefetch(job)

    def _fail(self, entry: _Running, error: Exception) -> None:
        entry.work.close()
        entry.job.emit(Failed(error))
        self._release_prefetch(entry.job)

    @staticmethod
    def _release_prefetch(job: Job) -> None:
        if job.prefetch is not None:
            job.prefetch.release()

    def _logprob(self, step: Step, top: int) -> TokenLogprob:
        return self._entry(step.token_id, torch.log_softmax(step.logits.float(), dim=-1), top)

    def _generation(self, job: Job, request: GenerateRequest) -> Generator[Work, Any, None]:
        """The request's coroutine; with `prompt_logprobs` (echo) the prompt's log probabilities are
        computed first, pass by pass, and sent before its tokens."""
        if job.prompt_logprobs and job.planned is not None:
            token_ids = job.planned.token_ids
            rows = yield from self.engine.prompt_logprobs(token_ids)
            first = TokenLogprob(self.engine.tokenizer.decode([token_ids[0]]), None, ())
            job.emit(PromptLogprobs([first, *(self._entry(token, row, job.logprobs or 0) for token, row in zip(token_ids[1:], rows))]))
        yield from self.engine.run(request, job.metrics, job.prefetch, job.planned)

    def _entry(self, token: int, logprobs: torch.Tensor, top: int) -> TokenLogprob:
        best = logprobs.topk(top) if top else None
        decode = self.engine.tokenizer.decode
        alternatives = () if best is None else tuple((decode([int(i)]), float(v)) for v, i in zip(best.values, best.indices))
        return TokenLogprob(decode([token]), float(logprobs[token]), alternatives)
