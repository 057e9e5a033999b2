"""`kvcake bench store`: read/write throughput of each store tier by chunk size, the codec's
cost and error per storage dtype, and how exactly the throttle delivers its set bandwidth.

Entries have the KV shape of a real model (default SmolLM2-135M: 30 layers, 3 KV heads,
head_dim 64) with random values. Throughputs count KV bytes handed to the caller; file
reads come from the OS page cache, Redis runs on 127.0.0.1 (its own server unless
--redis-url is given), so these are upper bounds of the tiers on this machine. Each row
also gives the rate of a single-threaded memcpy of the same bytes, measured in the same
run, and the op's rate as a multiple of it. The memory tier hands out its stored tensors
(no copy), so its rows measure the lookup; the reader's one copy is into its KV cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvcake.bench.report import machine_description, markdown_rows
from kvcake.store import ChunkKV, KVStore, codec, open_store, tiered_url
from kvcake.store.local_redis import LocalRedis, redis_available

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TOLERANCE = 0.05  # delivered/target must be within this of 1 at link level


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiers", default="memory,file,redis,tiered",
                        help="Tiers to measure, comma-separated (memory, file, redis, tiered).")
    parser.add_argument("--chunk-tokens", default="64,256,1024", help="Chunk sizes in tokens, comma-separated.")
    parser.add_argument("--layers", type=int, default=30, help="Layers of the KV shape (SmolLM2-135M: 30).")
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads of the KV shape.")
    parser.add_argument("--head-dim", type=int, default=64, help="Head dimension of the KV shape.")
    parser.add_argument("--kv-dtype", choices=sorted(_DTYPES), default="fp16", help="dtype of the KV tensors.")
    parser.add_argument("--seconds", type=float, default=0.25, help="Time spent per measured cell (median op time).")
    parser.add_argument("--gbps", default="0.1,0.3,1,3,10", help="Throttle settings to check, Gbit/s.")
    parser.add_argument("--transfer-mb", type=float, default=4.0, help="Entry size for the throttle checks, MB.")
    parser.add_argument("--readers", default="1,2,4", help="Concurrent readers sharing one 1 Gbps link.")
    parser.add_argument("--redis-url", default=None,
                        help="Use this Redis instead of starting a redis-server on a free 127.0.0.1 port.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Directory for the file tier (default: a temp dir).")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/store.md"), help="Markdown report path.")
    parser.add_argument("--json", type=Path, default=None,
                        help="Also write the rows as JSON here (default: beside --out).")


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    def chunk(self, tokens: int, seed: int = 0) -> ChunkKV:
        g = torch.Generator().manual_seed(seed)

        def tensor() -> torch.Tensor:
            return torch.randn(self.heads, tokens, self.head_dim, generator=g).to(self.dtype)

        return ChunkKV([tensor() for _ in range(self.layers)], [tensor() for _ in range(self.layers)])

    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_dim * self.dtype.itemsize


def run(args: argparse.Namespace) -> None:
    shape = Shape(args.layers, args.kv_heads, args.head_dim, _DTYPES[args.kv_dtype])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvcake-bench-store-") as tmp:
        work = args.work_dir or Path(tmp)
        redis_url, server = _redis(args.redis_url, Path(tmp) / "redis")
        try:
            tiers = _tier_rows(args, shape, work, redis_url)
            throttle = _throttle_rows(args, shape, work, redis_url)
        finally:
            if server is not None:
                server.stop()
    codec_rows = _codec_rows(shape)
    elapsed = time.perf_counter() - started
    _print_table("tiers (median of repeated ops)", tiers)
    _print_table("codec", codec_rows)
    _print_table("throttle", throttle)
    _write(args, shape, redis_url is not None, tiers, codec_rows, throttle, elapsed)


# -- tiers ---------------------------------------------------------------------------------
def _redis(url: str | None, workdir: Path) -> tuple[str | None, LocalRedis | None]:
    if url is not None:
        return url, None
    if not redis_available():
        print("redis-server not found: skipping the redis and tiered tiers (apt-get install redis-server)")
        return None, None
    server = LocalRedis(workdir, extra_args=("--maxmemory", "2gb", "--maxmemory-policy", "allkeys-lru")).start()
    return server.url, server


def _tier_urls(work: Path, redis_url: str | None) -> dict[str, str]:
    urls = {"memory": "memory://?max_gb=2", "file": f"file://{work}/file?max_gb=4"}
    if redis_url is not None:
        urls["redis"] = redis_url
        tiers = ["memory://?max_gb=2", f"file://{work}/tiered?max_gb=4", _with_param(redis_url, "prefix=tiered:")]
        urls["tiered"] = tiered_url(tiers)
    return urls


def _with_param(url: str, param: str) -> str:
    return url + ("&" if "?" in url else "?") + param


def _timed(op: Callable[[], Any], seconds: float, setup: Callable[[], None] | None = None,
           min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds of ``op`` (``setup`` runs untimed before each call)."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < max_reps):
        if setup is not None:
            setup()
        t = time.perf_counter()
        result = op()
        times.append(time.perf_counter() - t)
        if result is None or result is False:
            raise RuntimeError("a benchmark operation missed; the numbers would be meaningless")
    return statistics.median(times)


def _tier_rows(args: argparse.Namespace, shape: Shape, work: Path, redis_url: str | None) -> list[dict]:
    urls = _tier_urls(work, redis_url)
    wanted = [t.strip() for t in args.tiers.split(",") if t.strip()]
    rows = []
    for name in wanted:
        if name not in urls:
            print(f"skipping tier {name!r} (unknown, or Redis unavailable)")
            continue
        store = open_store(urls[name])
        plain_read = _plain_reader(name, work, redis_url)
        try:
            for tokens in (int(x) for x in args.chunk_tokens.split(",")):
                rows.extend(_measure_tier(name, store, shape, tokens, args.seconds, plain_read))
        finally:
            store.close()
    return rows


def _plain_reader(tier: str, work: Path, redis_url: str | None) -> Callable[[str], Any] | None:
    """The backend's own read of an entry's bytes, with nothing of kvcake on the path: the reference a tier's get is held to.

    file: ``readinto`` of the entry's file (page cache) into a preallocated buffer; redis: a redis-py ``GET``.
    """
    if tier == "file":
        buffers = threading.local()

        def read_file(key: str) -> int:
            path = work / "file" / key[:2] / f"{key}.kv"
            size = path.stat().st_size
            if getattr(buffers, "size", None) != size:
                buffers.size, buffers.data = size, bytearray(size)
            with open(path, "rb", buffering=0) as f:
                return f.readinto(buffers.data)

        return read_file
    if tier == "redis" and redis_url is not None:
        import redis

        client = redis.Redis.from_url(redis_url)
        return lambda key: client.get(f"kvcake:{key}")
    return None


def _measure_tier(name: str, store: KVStore, shape: Shape, tokens: int, seconds: float,
                  plain_read: Callable[[str], Any] | None) -> list[dict]:
    """Each op's median time, measured in turn with its references (memcpy, the backend's plain read),
    so a drift of the machine's speed during the run moves both sides of a ratio alike."""
    chunk = shape.chunk(tokens)
    counter = iter(range(10**9))
    written: list[str] = []

    def put() -> bool:
        written.append(f"bench-{tokens}-{next(counter)}")
        return store.put(written[-1], chunk)

    readable_count = 3  # the newest entries: a fast tier may have evicted the first ones

    def cycle() -> str:
        return written[-1 - next(counter) % readable_count]

    quarter = max(1, tokens // 4)
    ops: dict[str, tuple[Callable[[], Any], int]] = {
        "put": (put, chunk.nbytes),
        "get": (lambda: store.get(cycle()), chunk.nbytes),
        "get_layer x L": (lambda: _all_layers(store, cycle(), shape.layers), chunk.nbytes),
        "get_tokens 1/4": (lambda: store.get_tokens(cycle(), 0, quarter), chunk.nbytes * quarter // tokens),
    }
    rows = []
    for op, (run_op, nbytes) in ops.items():
        references = {"memcpy": memcpy_op(nbytes)}
        whole_entry = op in ("get", "get_layer x L")
        if plain_read is not None and whole_entry:
            references["plain"] = lambda: plain_read(cycle())
        t, reference_s = _timed_with(run_op, references, seconds)
        rows.append(_row(name, tokens, chunk, op, t, nbytes, reference_s))
    readable = written[-readable_count:]
    if name == "tiered":
        t_cold = _cold_get(store, readable[0], seconds)
        rows.append(_row(name, tokens, chunk, "get cold (from redis, promoted)", t_cold, chunk.nbytes,
                         {"memcpy": memcpy_seconds(chunk.nbytes, seconds)}))
    rows[1]["2 threads / 1"] = round(_parallel_speedup(lambda index: store.get(readable[index % len(readable)]) is not None), 2)
    if plain_read is not None:
        rows[1]["plain read, 2 threads / 1"] = round(_parallel_speedup(lambda index: plain_read(readable[index % len(readable)]) is not None), 2)
    for key in written:
        store.delete(key)
    return rows


def _row(tier: str, tokens: int, chunk: ChunkKV, op: str, t: float, nbytes: int, reference_s: dict[str, float]) -> dict:
    copy_s = reference_s["memcpy"]
    plain_s = reference_s.get("plain")
    return {
        "tier": tier, "chunk tokens": tokens, "entry MB": round(chunk.nbytes / 1e6, 2), "op": op,
        "ms/op": round(t * 1e3, 3), "GB/s": round(nbytes / t / 1e9, 3),
        "memcpy GB/s": round(nbytes / copy_s / 1e9, 3), "x memcpy": round(copy_s / t, 3),
        "x plain read": round(plain_s / t, 3) if plain_s is not None else "-",
        "2 threads / 1": "-", "plain read, 2 threads / 1": "-",
    }


def _timed_with(op: Callable[[], Any], references: dict[str, Callable[[], Any]], seconds: float,
                min_reps: int = 3, max_reps: int = 200) -> tuple[float, dict[str, float]]:
    """Median seconds of `op` and of each reference, called in turn (op, ref1, ref2, op, ...)."""
    times: dict[str, list[float]] = {name: [] for name in ("op", *references)}
    calls = {"op": op, **references}
    deadline = time.perf_counter() + seconds * (1 + len(references))
    while len(times["op"]) < min_reps or (time.perf_counter() < deadline and len(times["op"]) < max_reps):
        for name, call in calls.items():
            t = time.perf_counter()
            result = call()
            times[name].append(time.perf_counter() - t)
            if result is None or result is False:
                raise RuntimeError(f"a benchmark operation ({name}) missed; the numbers would be meaningless")
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians.pop("op"), medians


MEMCPY_WORKING_SET = 256 << 20
"""The memcpy reference cycles through this many bytes of sources, so it reads from memory, not from a warm cache."""


def memcpy_op(nbytes: int) -> Callable[[], bool]:
    """One single-threaded copy of `nbytes` into a preallocated buffer per call, from rotating sources."""
    sources = [np.ones(nbytes, dtype=np.uint8) for _ in range(max(2, MEMCPY_WORKING_SET // max(nbytes, 1)))]
    target = np.empty(nbytes, dtype=np.uint8)
    turn = iter(range(10**9))
    return lambda: np.copyto(target, sources[next(turn) % len(sources)]) or True


def memcpy_seconds(nbytes: int, seconds: float) -> float:
    """Median time of one single-threaded copy of `nbytes` into a preallocated buffer: the machine's own rate."""
    return _timed(memcpy_op(nbytes), seconds)


def _all_layers(store: KVStore, key: str, layers: int) -> bool:
    """A layer-by-layer load, as the engine does it."""
    return all(store.get_layer(key, layer) is not None for layer in range(layers))


def _cold_get(store: KVStore, key: str, seconds: float) -> float:
    """Entry only in the last tier: read it there and promote it into the faster tiers."""
    tiers = store.tiers  # type: ignore[attr-defined]
    data = tiers[-1].get_encoded(key)
    assert data is not None

    def evict_from_fast_tiers() -> None:
        for tier in tiers[:-1]:
            tier.delete(key)

    return _timed(lambda: store.get(key), seconds, setup=evict_from_fast_tiers)


# -- codec ---------------------------------------------------------------------------------
def _codec_rows(shape: Shape, tokens: int = 256) -> list[dict]:
    source = Shape(shape.layers, shape.heads, shape.head_dim, torch.float32).chunk(tokens, seed=1)
    ref = torch.cat([t.flatten() for t in source.keys + source.values])
    rows = []
    for name in ("keep", "fp16", "bf16", "int8"):
        data = codec.encode(source, name)
        t_enc = _timed(functools.partial(codec.encode, source, name), 0.2)
        t_dec = _timed(functools.partial(codec.decode, data), 0.2)
        t_verify = _timed(functools.partial(codec.verify, data), 0.2)
        out = codec.decode(data)
        got = torch.cat([t.float().flatten() for t in out.keys + out.values])
        err = (got - ref).abs()
        rows.append({
            "stored as": "fp32 (keep)" if name == "keep" else name,
            "bytes/token": len(data) // tokens,
            "encode GB/s": round(source.nbytes / t_enc / 1e9, 3),
            "decode GB/s": round(source.nbytes / t_dec / 1e9, 3),
            "verify GB/s": round(len(data) / t_verify / 1e9, 3),
            "decode, 2 threads / 1": round(_parallel_speedup(lambda _: codec.decode(data) is not None), 2),
            "max |err| / max |x|": f"{(err.max() / ref.abs().max()).item():.2e}",
            "rms err / rms x": f"{(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item():.2e}",
        })
    return rows


def _parallel_speedup(op: Callable[[int], bool], entries: int = 24) -> float:
    """`entries` calls of ``op(index)`` split over two threads against all on one: how well loader threads scale."""

    def run_all(first: int, count: int) -> bool:
        return all([op(index) for index in range(first, first + count)])

    def two_threads() -> bool:
        threads = [threading.Thread(target=run_all, args=(part, entries // 2)) for part in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return True

    return _timed(lambda: run_all(0, entries), 0.5) / _timed(two_threads, 0.5)


# -- throttle ------------------------------------------------------------------------------
def _throttle_rows(args: argparse.Namespace, shape: Shape, work: Path, redis_url: str | None) -> list[dict]:
    tokens = max(1, round(args.transfer_mb * 1e6 / shape.bytes_per_token()))
    chunk = shape.chunk(tokens)
    rows = [_link_row("memory", "memory://", float(g), 0.0, chunk) for g in args.gbps.split(",")]
    rows.append(_link_row("memory", "memory://", 1.0, 2.0, chunk))
    rows.append(_link_row("file", f"file://{work}/throttle", 1.0, 0.0, chunk))
    if redis_url is not None:
        rows.append(_link_row("redis", _with_param(redis_url, "prefix=throttle:"), 1.0, 0.0, chunk))
    rows.extend(_shared_rows(chunk, [int(r) for r in args.readers.split(",")]))
    return rows


def _link_row(inner: str, url: str, gbps: float, latency_ms: float, chunk: ChunkKV) -> dict:
    """Delivered bandwidth of whole-entry reads at the link (below decode), vs the setting."""
    store = open_store(_with_param(url, f"throttle_gbps={gbps}&latency_ms={latency_ms}"))
    try:
        store.put("throttle-probe", chunk)
        backend = store.backend  # type: ignore[attr-defined]
        nbytes = len(backend.read_all("throttle-probe"))
        reps = 3 if gbps < 1 else 10
        t = _timed(lambda: backend.read_all("throttle-probe"), 0.0, min_reps=reps)
        t_get = _timed(lambda: store.get("throttle-probe"), 0.0, min_reps=reps)
        store.delete("throttle-probe")
    finally:
        store.close()
    expected = latency_ms / 1e3 + nbytes * 8 / (gbps * 1e9)
    ratio = expected / t
    return {
        "inner": inner, "set Gbps": gbps, "latency ms": latency_ms, "readers": 1, "MB/transfer": round(nbytes / 1e6, 2),
        "delivered Gbps": round(nbytes * 8 / t / 1e9, 4), "delivered/target": round(ratio, 4),
        "within 5%": "yes" if abs(ratio - 1) <= _TOLERANCE else "NO",
        "get() Gbps incl. decode": round(nbytes * 8 / t_get / 1e9, 3),
    }


def _shared_rows(chunk: ChunkKV, readers: list[int], gbps: float = 1.0) -> list[dict]:
    """Several readers on one link: aggregate rate and each reader's share."""
    rows = []
    for n in readers:
        store = open_store(f"memory://?throttle_gbps={gbps}")
        keys = [f"reader{i}" for i in range(n)]
        for key in keys:
            store.put(key, chunk)
        backend = store.backend  # type: ignore[attr-defined]
        nbytes = len(backend.read_all(keys[0]))
        reps = 3
        elapsed = _concurrent_reads(backend.read_all, keys, reps)
        store.close()
        aggregate = n * reps * nbytes * 8 / max(elapsed) / 1e9
        rates = [reps * nbytes * 8 / t / 1e9 for t in elapsed]
        rows.append({
            "inner": "memory", "set Gbps": gbps, "latency ms": 0.0, "readers": n, "MB/transfer": round(nbytes / 1e6, 2),
            "delivered Gbps": round(aggregate, 4), "delivered/target": round(aggregate / gbps, 4),
            "within 5%": "yes" if abs(aggregate / gbps - 1) <= _TOLERANCE else "NO",
            "get() Gbps incl. decode": None,
            "per-reader Gbps min/max": f"{min(rates):.3f}/{max(rates):.3f}",
        })
    return rows


def _concurrent_reads(read: Callable[[str], Any], keys: list[str], reps: int) -> list[float]:
    """One thread per key runs ``read(key)`` ``reps`` times, all released together; seconds until each ends."""
    started: list[float] = []
    finished = [0.0] * len(keys)
    barrier = threading.Barrier(len(keys), action=lambda: started.append(time.perf_counter()))

    def reader(i: int) -> None:
        barrier.wait()
        for _ in range(reps):
            read(keys[i])
        finished[i] = time.perf_counter()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(keys))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [end - started[0] for end in finished]


# -- output --------------------------------------------------------------------------------
def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        print("(no rows)")
        return
    columns = list(dict.fromkeys(c for row in rows for c in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "") if row.get(c) is not None else "").ljust(widths[c]) for c in columns))


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((w for w in out.split() if w.startswith("v=")), "v=?")[2:]


def _write(args: argparse.Namespace, shape: Shape, with_redis: bool, tiers: list[dict], codec_rows: list[dict],
           throttle: list[dict], elapsed: float) -> None:
    header = [
        "# Store benchmark",
        "",
        f"Generated by `kvcake bench store` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s.",
        f"Machine: {machine_description()}; redis-server {_redis_version()} on 127.0.0.1"
        + ("" if with_redis else " (not available: redis rows skipped)") + ".",
        f"KV shape: {shape.layers} layers x {shape.heads} KV heads x head_dim {shape.head_dim}, "
        f"{args.kv_dtype} ({shape.bytes_per_token()} bytes/token), random values.",
        "",
        "Throughput counts KV bytes returned to (or given by) the caller. `get_layer x L` loads an entry",
        "layer by layer (one call per layer); `get_tokens 1/4` reads the first quarter of the tokens of",
        "every layer. File reads are served from the OS page cache; Redis is a local server, so network",
        "time is absent: use the throttle to emulate a link. `memcpy GB/s` is a single-threaded copy of",
        "the same bytes in this run (from a 256 MB working set), `x memcpy` the op's rate over it. The",
        "memory tier hands out its stored tensors without a copy, so its reads measure a lookup (the",
        "reader's one copy is into its KV cache; `kvcake bench load` measures the whole path).",
        "`x plain read` holds a whole-entry read to the backend's own read of the same bytes in this",
        "run: a `readinto` of the entry's file into a preallocated buffer, or a redis-py `GET`.",
        "`2 threads / 1`: `get`s of the same entries split over two threads, against one thread; beside it the",
        "same ratio of the plain reads, which is what this machine's memory and kernel allow two threads here.",
        "",
        "## Tiers",
        "",
        *markdown_rows(tiers),
        "",
        "## Codec (256-token chunk from fp32 KV, N(0,1) values)",
        "",
        "Decoding immutable bytes (as a Redis reply is) copies them once into a private buffer and",
        "verifies one XXH3 checksum per layer; the tensors are views of that copy. int8 is symmetric per channel (per head and head_dim",
        "index, over the chunk's tokens): the error of each value is at most max|channel| / 254.",
        "",
        *markdown_rows(codec_rows),
        "",
        "## Throttle",
        "",
        "Delivered bandwidth is measured at the link (the throttled backend's whole-entry read,",
        "below checksum and decode), median of repeated transfers; with latency the target is",
        "latency + bytes / rate. `get() Gbps incl. decode` is what a caller of `get` sees",
        "(decode is not overlapped with the transfer). Concurrent readers share one link:",
        "their aggregate should match the setting and each gets an equal share.",
        "",
        *markdown_rows(throttle),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header))
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps({"machine": machine_description(), "tiers": tiers, "codec": codec_rows,
                                     "throttle": throttle, "elapsed_s": round(elapsed, 1)}, indent=1))
    print(f"\nreport written to {args.out} (rows also in {json_path})")
