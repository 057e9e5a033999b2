"""When each chunk of a stored prefix is computed or loaded: compute, load, Cake, split:m.

Cake runs one compute side (this thread) that takes chunks from the front, each over the
KV of the chunks before it, and one loader thread that fetches stored chunks from the
back. Each side claims its next chunk under one lock, so they never take the same chunk
and stop where they meet; the meeting point falls out of the run itself. Every strategy
is the same mechanism with different limits:

| strategy | compute may take | loader may take |
|---|---|---|
| compute | every chunk | nothing |
| load | nothing (until a load fails) | every chunk |
| cake | chunks below the loader's lowest claim | chunks above the compute side |
| split:m | chunks < m | chunks >= m |

A load that fails (miss, corrupt entry, backend down) hands its chunk back: the loader
stops and the compute side computes up to and including it, so the result stays exact.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

import torch

from kvcake.chunk import ChunkKV
from kvcake.modes import PREFIX_MODES
from kvcake.model import KVCache, Transformer

T = TypeVar("T")
RECHECK_S = 0.005
"""How often a waiting side re-checks its decision when nothing has notified it."""
LOADER_CPU_SHARE = 0.5
"""A loader whose reads take more CPU time than this share of their wall time competes with the compute side for
the cores (see `_Meeting`)."""
log = logging.getLogger(__name__)


class ChunkLoader(Protocol):
    """Fetches the stored KV of prefix chunk `index` (K after RoPE, at the chunk's positions), or None on any failure."""

    def __call__(self, index: int) -> ChunkKV | None: ...


@dataclass(frozen=True)
class Strategy:
    name: str
    split: int | None = None

    @classmethod
    def parse(cls, text: str) -> Strategy:
        if text in PREFIX_MODES:
            return cls(text)
        if text.startswith("split:") and text[6:].isdigit():
            return cls("split", int(text[6:]))
        raise ValueError(f"unknown reuse strategy {text!r}: use compute, load, cake or split:M")

    def __str__(self) -> str:
        return f"split:{self.split}" if self.name == "split" else self.name

    def limits(self, num_chunks: int) -> tuple[int, int]:
        """(chunks the compute side may take from the front, lowest chunk the loader may take)."""
        if self.name == "compute":
            return num_chunks, num_chunks
        if self.name == "load":
            return 0, 0
        if self.name == "split":
            boundary = min(self.split or 0, num_chunks)
            return boundary, boundary
        return num_chunks, 0


@dataclass
class PrefixReport:
    """What a prefix prefill did: the accounting every response carries.

    `stored_chunks` were found by the lookup; `hit_chunks` of them were usable: all of
    them, unless a load failed, when only the chunks actually loaded count. `tail_tokens_loaded`
    of the tokens after the last full chunk came from stored tail blocks (they are part of
    `tokens_loaded` and `bytes_loaded`).
    """

    strategy: str = "compute"
    stored_chunks: int = 0
    hit_chunks: int = 0
    chunks_computed: int = 0
    chunks_loaded: int = 0
    tokens_computed: int = 0
    tokens_loaded: int = 0
    tail_tokens_loaded: int = 0
    bytes_loaded: int = 0
    meet_chunk: int | None = None
    chunks_prefetched: int = 0
    load_failures: int = 0
    compute_s: float = 0.0
    io_wait_s: float = 0.0
    load_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class CostProfile:
    """Observed costs from earlier requests: compute seconds per chunk index, load seconds per chunk.

    Only a starting guess: within a request the live timings take over as soon as
    there are any. It lets the compute side stand aside from the first chunk when the
    store is known to deliver the whole prefix sooner than one chunk computes.
    """

    def __init__(self, smoothing: float = 0.5):
        self.smoothing = smoothing
        self.compute_s: list[float] = []
        self.load_s: float | None = None
        self.load_cpu_share: float | None = None
        """The loader thread's CPU time over its wall time, over earlier requests' reads."""
        self._lock = threading.Lock()

    def compute_estimate(self, index: int) -> float | None:
        with self._lock:
            if not self.compute_s:
                return None
            return self.compute_s[min(index, len(self.compute_s) - 1)]

    def record_compute(self, index: int, seconds: float) -> None:
        with self._lock:
            if index < len(self.compute_s):
                self.compute_s[index] += self.smoothing * (seconds - self.compute_s[index])
            elif index == len(self.compute_s):
                self.compute_s.append(seconds)

    def calibrate(self, model: Transformer, chunk_size: int) -> None:
        """Seed chunk 0's compute time with a timed forward of one chunk (the second of two: the first
        sets up the kernels), so a fresh engine's first Cake request has a cost to weigh its first
        read against instead of computing a chunk the store would have delivered sooner."""
        ids, positions = torch.zeros(chunk_size, dtype=torch.long), torch.arange(chunk_size)
        seconds = 0.0
        with torch.inference_mode():
            for _ in range(2):
                started = time.perf_counter()
                model.forward(ids, positions, model.new_cache(chunk_size)).logits.sum().item()
                seconds = time.perf_counter() - started
        self.record_compute(0, seconds)

    def record_load(self, seconds: float, cpu_seconds: float) -> None:
        with self._lock:
            self.load_s = seconds if self.load_s is None else self.load_s + self.smoothing * (seconds - self.load_s)
            share = cpu_seconds / seconds if seconds > 0 else 0.0
            self.load_cpu_share = share if self.load_cpu_share is None else self.load_cpu_share + self.smoothing * (share - self.load_cpu_share)


@dataclass
class _Meeting:
    """Shared claim state of the two sides; every field is read and written under `lock`.

    Greedy claiming meets up to one chunk off when chunks are coarse, so each side asks
    one question before it takes the next chunk, with costs measured in this run (the
    engine's profile of earlier requests seeds the first decision):

    - the compute side waits if the loader, at its observed rate, would load every chunk
      still unclaimed before one more chunk could be computed;
    - the loader waits if the compute side would compute every chunk still unclaimed
      before one more chunk could be loaded;
    - before any read has been timed (a fresh engine's first hit), the compute side gives
      the first read as long as one chunk takes to compute (`CostProfile.calibrate`);
    - when the two sides share the CPU's cores (`shares_cores`: the model runs on the CPU)
      and the reads keep the loader busy on them (its thread's CPU time over half its wall
      time: page-cache files, memory), they do not overlap but take turns, so the compute
      side takes a chunk only if it computes one faster than the loader reads one (the
      loader never waits then). On 2 cores a first Cake hit after a restart computed
      chunk 0 in 0.80 s beside the loader (0.34 s alone) and slowed the loads from 13 to
      20-48 ms each: 1.0 s, where loading everything takes 0.73-0.78 s. Reads that wait on
      a network or a throttled link leave the cores to compute, and the sides overlap as
      before.

    A waiting side re-checks as time passes, so a stall on the other side ends the wait.
    Both cannot wait at once: that needs load < compute and compute <= load per chunk.
    """

    num_chunks: int
    compute_limit: int
    loader_floor: int
    profile: CostProfile
    shares_cores: bool = False
    lock: threading.Condition = field(default_factory=threading.Condition)
    started_at: float = field(default_factory=time.perf_counter)
    front: int = 0
    lowest_claimed: int = 0
    loader_done: bool = False
    load_started_at: float | None = None
    load_times: list[float] = field(default_factory=list)
    load_cpu_times: list[float] = field(default_factory=list)
    compute_started_at: float | None = None
    last_computed: tuple[int, float] | None = None
    abandoned: bool = False

    def __post_init__(self) -> None:
        self.lowest_claimed = self.num_chunks

    # ---- compute side -------------------------------------------------------------

    def claim_compute(self) -> int | None:
        """The next chunk to compute, or None when every chunk is taken and the loader is done."""
        with self.lock:
            while True:
                if self.front < min(self.compute_limit, self.lowest_claimed):
                    delay = self._loader_finishes_first_by()
                    if delay is None:
                        self.front += 1
                        self.compute_started_at = time.perf_counter()
                        return self.front - 1
                    self.lock.wait(timeout=max(delay, RECHECK_S))
                    continue
                if self.loader_done:
                    return None
                self.lock.wait()

    def computed(self, index: int, seconds: float) -> None:
        with self.lock:
            self.last_computed = (index, seconds)
            self.compute_started_at = None
            self.lock.notify_all()

    def _loader_finishes_first_by(self) -> float | None:
        """Seconds until the loader would have loaded every unclaimed chunk, if before one more computes."""
        if self.loader_done or self.front < self.loader_floor:
            return None
        load_s = self._load_estimate()
        compute_s = self._compute_estimate(self.front)
        if compute_s is None:
            return None
        now = time.perf_counter()
        if load_s is None:
            # No read timed yet, in this run or before: the first one may take as long as a chunk computes.
            waited = now - self.started_at
            return compute_s - waited if waited < compute_s else None
        busy_until = now if self.load_started_at is None else max(now, self.load_started_at + load_s)
        loader_done_at = busy_until + (self.lowest_claimed - self.front) * load_s
        if self._sides_take_turns():
            return None if compute_s < load_s else max(loader_done_at - now, RECHECK_S)
        return loader_done_at - now if loader_done_at < now + compute_s else None

    # ---- loader -------------------------------------------------------------------

    def claim_load(self) -> int | None:
        """The next chunk to load from the back, or None when the loader should stop."""
        with self.lock:
            while True:
                candidate = self.lowest_claimed - 1
                if self.abandoned or candidate < max(self.front, self.loader_floor):
                    return None
                delay = self._compute_finishes_first_by(candidate)
                if delay is None:
                    self.lowest_claimed = candidate
                    self.load_started_at = time.perf_counter()
                    return candidate
                self.lock.wait(timeout=max(delay, RECHECK_S))

    def _compute_finishes_first_by(self, candidate: int) -> float | None:
        """Seconds until the compute side would have computed chunks front..candidate, if before one load."""
        if self.front >= self.compute_limit or self._sides_take_turns():
            return None  # taking turns, the compute side alone decides, so both never wait
        load_s = self._load_estimate()
        estimates = [self._compute_estimate(i) for i in range(self.front, candidate + 1)]
        if load_s is None or None in estimates:
            return None
        now = time.perf_counter()
        busy_until = now
        if self.compute_started_at is not None and self.last_computed is not None:
            busy_until = max(now, self.compute_started_at + (self._compute_estimate(self.front - 1) or 0.0))
        compute_done_at = busy_until + sum(e for e in estimates if e is not None)
        return compute_done_at - now if compute_done_at <= now + load_s else None

    def _sides_take_turns(self) -> bool:
        """The reads (this run's, else earlier requests') keep the loader on the cores the compute side needs (see
        the class docstring)."""
        if not self.shares_cores:
            return False
        if self.load_times:
            return sum(self.load_cpu_times) > LOADER_CPU_SHARE * sum(self.load_times)
        return self.profile.load_cpu_share is not None and self.profile.load_cpu_share > LOADER_CPU_SHARE

    def loaded(self, seconds: float, cpu_seconds: float) -> None:
        with self.lock:
            self.load_times.append(seconds)
            self.load_cpu_times.append(cpu_seconds)
            self.load_started_at = None
            self.lock.notify_all()

    def give_back(self, index: int) -> None:
        """A load failed: chunk `index` (and everything below it) is the compute side's."""
        with self.lock:
            self.lowest_claimed = index + 1
            self.compute_limit = max(self.compute_limit, index + 1)
            self.load_started_at = None

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            self.lock.notify_all()

    def finish_loading(self) -> None:
        with self.lock:
            self.loader_done = True
            self.load_started_at = None
            self.lock.notify_all()

    # ---- cost estimates -----------------------------------------------------------

    def _load_estimate(self) -> float | None:
        return statistics.fmean(self.load_times) if self.load_times else self.profile.load_s

    def _compute_estimate(self, index: int) -> float | None:
        """Chunk `index`'s compute time: the profile's shape scaled to this run's last chunk."""
        profiled = self.profile.compute_estimate(index)
        if self.last_computed is None:
            return profiled
        last_index, last_s = self.last_computed
        profiled_last = self.profile.compute_estimate(last_index)
        if profiled is None or not profiled_last:
            return last_s
        return profiled * last_s / profiled_last


class PrefixPrefill:
    """Fill `cache` with the KV of `num_chunks` stored prefix chunks by one strategy."""

    def __init__(self, model: Transformer, chunk_size: int, prompt_ids: list[int], loader: ChunkLoader, profile: CostProfile):
        self.model = model
        self.profile = profile
        self.chunk_size = chunk_size
        self.prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
        self.loader = loader
        self.computed_kv: dict[int, ChunkKV] = {}
        self._observed_compute: list[tuple[int, float]] = []

    def steps(
        self,
        cache: KVCache,
        num_chunks: int,
        strategy: Strategy,
        prefetched: dict[int, ChunkKV] | None = None,
    ) -> Generator[None, None, PrefixReport]:
        """Fill `cache` with the first `num_chunks` chunks by `strategy` (`prefetched` holds chunks
        num_chunks-1, num_chunks-2, ... already loaded; the strategy schedules the rest), pausing (a
        bare ``yield``) after each chunk the compute side computes, so a scheduler can run other
        requests' work in between; the loader keeps loading meanwhile."""
        prefetched = prefetched or {}
        scheduled = num_chunks - len(prefetched)
        compute_limit, loader_floor = strategy.limits(scheduled)
        meeting = _Meeting(scheduled, compute_limit, loader_floor, self.profile, shares_cores=self.model.device.type == "cpu")
        report = PrefixReport(strategy=str(strategy), stored_chunks=num_chunks, chunks_prefetched=len(prefetched))
        loaded: dict[int, ChunkKV] = dict(prefetched)
        loader = threading.Thread(target=self._load_from_back, args=(meeting, loaded, report), name="kvcake-loader", daemon=True)
        loader.start()
        try:
            yield from self._compute_from_front(cache, meeting, report)
        except BaseException:
            meeting.abandon()  # the request is gone or failed: the loader stops after its current chunk
            raise
        finally:
            loader.join()
        self._update_profile(meeting)
        report.meet_chunk = meeting.front
        for index in range(meeting.front, num_chunks):
            self.model.load_kv(cache, loaded[index], self._positions(index))
        report.chunks_loaded = num_chunks - meeting.front
        report.tokens_loaded = report.chunks_loaded * self.chunk_size
        report.chunks_computed = meeting.front
        report.tokens_computed = meeting.front * self.chunk_size
        report.hit_chunks = report.chunks_loaded if report.load_failures else num_chunks
        return report

    def _update_profile(self, meeting: _Meeting) -> None:
        """Teach the profile after the run, so within a run it stays the prior the live times scale."""
        for index, seconds in self._observed_compute:
            self.profile.record_compute(index, seconds)
        for seconds, cpu_seconds in zip(meeting.load_times, meeting.load_cpu_times):
            self.profile.record_load(seconds, cpu_seconds)

    def _positions(self, index: int) -> torch.Tensor:
        return torch.arange(index * self.chunk_size, (index + 1) * self.chunk_size)

    def _compute_from_front(self, cache: KVCache, meeting: _Meeting, report: PrefixReport) -> Generator[None, None, None]:
        while True:
            waited_from = time.perf_counter()
            index = meeting.claim_compute()
            report.io_wait_s += time.perf_counter() - waited_from
            if index is None:
                return
            started = time.perf_counter()
            positions = self._positions(index)
            out = self.model.forward(self.prompt_ids[positions], positions, cache, keep_kv=True, rotated_keys=True)
            self.computed_kv[index] = out.kv
            elapsed = time.perf_counter() - started
            self._observed_compute.append((index, elapsed))
            meeting.computed(index, elapsed)
            report.compute_s += elapsed
            yield

    def _load_from_back(self, meeting: _Meeting, loaded: dict[int, ChunkKV], report: PrefixReport) -> None:
        try:
            while (index := meeting.claim_load()) is not None:
                started, started_cpu = time.perf_counter(), time.thread_time()
                result = self._load(index)
                elapsed, cpu_s = time.perf_counter() - started, time.thread_time() - started_cpu
                report.load_s += elapsed
                if result is None:
                    report.load_failures += 1
                    meeting.give_back(index)
                    return
                loaded[index] = result
                report.bytes_loaded += result.nbytes
                meeting.loaded(elapsed, cpu_s)
        finally:
            meeting.finish_loading()

    def _load(self, index: int) -> ChunkKV | None:
        """The loader's result; an unexpected error is a failed load, never a failed request."""
        try:
            return self.loader(index)
        except Exception:
            log.exception("loading prefix chunk %d failed; computing it instead", index)
            return None


class Waiting:
    """What a pausing generator yields instead of a bare pause when it did no work: it waits for chunks
    another request is computing. A scheduler runs other work first; a lone driver sleeps `WAIT_S`."""


WAITING = Waiting()
WAIT_S = 0.002


def drain(steps: Generator[Waiting | None, None, T]) -> T:
    """Run a pausing generator to its end without pausing (but for a short sleep while it waits); its return value."""
    while True:
        try:
            if next(steps) is WAITING:
                time.sleep(WAIT_S)
        except StopIteration as done:
            return done.value
