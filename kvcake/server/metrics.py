"""Prometheus metrics of one server: request outcomes, TTFT, token accounting, store and queue state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvcake.requests import RequestMetrics
from kvcake.engine import EngineStats

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvcake_requests", "Requests by route template (`unknown` for any other path) and HTTP status.", ["endpoint", "status"], registry=self.registry
        )
        self.ttft = Histogram("kvcake_ttft_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=self.registry)
        self.tokens = Counter("kvcake_tokens", "Prompt tokens by how they were obtained, and generated tokens.", ["kind"], registry=self.registry)
        self.prefix_lookups = Counter("kvcake_prefix_lookups", "Requests by whether a stored prefix was found.", ["outcome"], registry=self.registry)
        self.prefetched_chunks = Counter("kvcake_prefetched_chunks", "Stored prefix chunks loaded while their request waited.", registry=self.registry)
        self.documents = Counter("kvcake_documents", "Documents of blend requests: found stored or computed.", ["outcome"], registry=self.registry)
        self.store = Gauge("kvcake_store", "Store counters (bytes read/written, hits, misses, errors).", ["counter"], registry=self.registry)
        self.store_errors = Gauge(
            "kvcake_store_errors", "Store errors by kind (checksum, foreign_key, other_version, unavailable, timeout, ...).", ["kind"], registry=self.registry
        )
        self.cancelled = Counter("kvcake_requests_cancelled", "Requests and warm calls stopped because their client went away.", registry=self.registry)
        self.disconnects = Counter(
            "kvcake_client_disconnects", "Clients seen leaving before their answer was complete (their work is then cancelled).", registry=self.registry
        )
        self.queue_depth = Gauge("kvcake_queue_depth", "Requests waiting for the compute thread.", registry=self.registry)
        self.writeback_dropped = Gauge("kvcake_writeback_dropped", "Computed chunks not written back (queue full).", registry=self.registry)
        self.writeback_pending = Gauge("kvcake_writeback_pending", "Computed chunks queued or being written to the store.", registry=self.registry)
        self.starting = Gauge("kvcake_starting", "1 while start-up work (mapping the store's read buffers) still runs beside requests.", registry=self.registry)

    def record(self, metrics: RequestMetrics | None, cancelled: bool) -> None:
        """Called by the compute thread for every request that ran, including ones whose client left, and for
        every warm call whose client left (metrics None)."""
        if cancelled:
            self.cancelled.inc()
        if metrics is None:
            return
        shown = metrics.accounting()
        if shown["generated_tokens"]:
            self.ttft.observe(shown["ttft_s"])
        for kind, count in (("computed", "tokens_computed"), ("loaded", "tokens_loaded"), ("recomputed", "tokens_recomputed"),
                            ("generated", "generated_tokens")):
            self.tokens.labels(kind).inc(shown[count])
        self.prefix_lookups.labels("hit" if shown["prefix_hit_chunks"] else "miss").inc()
        self.prefetched_chunks.inc(shown["prefix_chunks_prefetched"])
        self.documents.labels("stored").inc(shown["documents_stored"])
        self.documents.labels("computed").inc(shown["documents_computed"])

    def render(self, engine: EngineStats, queue_depth: int, starting: bool) -> bytes:
        store = engine.store
        errors = sum(store.errors.values())
        by_kind: dict[str, int] = dict(store.errors)
        for tier in store.tiers.values():
            for kind, count in tier.errors.items():
                by_kind[kind] = by_kind.get(kind, 0) + count
        for kind, count in by_kind.items():
            self.store_errors.labels(kind).set(count)
        for name, value in (("bytes_read", store.bytes_read), ("bytes_written", store.bytes_written), ("hits", store.hits),
                            ("misses", store.misses), ("errors", errors), ("puts_failed", store.puts_failed)):
            self.store.labels(name).set(value)
        self.queue_depth.set(queue_depth)
        self.writeback_dropped.set(engine.writeback_dropped)
        self.writeback_pending.set(engine.writeback_pending)
        self.starting.set(int(starting))
        return generate_latest(self.registry)

