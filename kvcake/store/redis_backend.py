"""Redis tier (single server or Redis Cluster) through redis-py.

Range reads are GETRANGE commands sent in one pipeline (one round trip); a whole entry is
one GET. Clients are created lazily, so a store opened while Redis is down works (it
misses) and starts hitting once the server is reachable. Socket timeouts bound every
call; one transparent retry on a broken connection makes the first command after a
server restart succeed. Eviction is Redis's own (``maxmemory`` + ``allkeys-lru`` on the
server); ``ttl_s`` optionally expires entries.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    ClusterError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kvcake.store.backend import Backend, Buffer, Range, Reader

Client = redis.Redis | RedisCluster


class _RedisReader(Reader):
    entry_known = False

    def __init__(self, client: Client, key: str) -> None:
        self._client = client
        self._key = key

    def read(self, ranges: Sequence[Range]) -> list[Buffer]:
        if len(ranges) == 1:
            start, end = ranges[0]
            return [cast(bytes, self._client.getrange(self._key, start, end - 1))]
        pipe = self._client.pipeline(transaction=False)
        for start, end in ranges:
            pipe.getrange(self._key, start, end - 1)
        return pipe.execute()


@dataclass(frozen=True)
class RedisOptions:
    """Connection and storage settings shared by single-server and cluster backends."""

    username: str | None = None
    password: str | None = None
    timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    prefix: str = "kvcake:"
    ttl_s: float | None = None
    retry_s: float = 1.0


class RedisBackend(Backend):
    """Entries under ``<prefix><key>``; on a cluster, outages are tracked per node."""

    def __init__(self, connect: Callable[[], Client], *, name: str, cluster: bool, options: RedisOptions) -> None:
        self.name = name
        self.retry_s = options.retry_s
        self._connect = connect
        self._cluster = cluster
        self._prefix = options.prefix
        self._ttl_ms = None if options.ttl_s is None else int(options.ttl_s * 1000)
        self._client_obj: Client | None = None
        self._lock = threading.Lock()

    def _client(self) -> Client:
        with self._lock:
            if self._client_obj is None:
                self._client_obj = self._connect()
            return self._client_obj

    def _k(self, key: str) -> str:
        return self._prefix + key

    def read_all(self, key: str) -> bytes | None:
        return cast(bytes | None, self._client().get(self._k(key)))

    @contextmanager
    def open_reader(self, key: str) -> Iterator[Reader | None]:
        yield _RedisReader(self._client(), self._k(key))

    def write(self, key: str, data: bytes) -> None:
        self._client().set(self._k(key), data, px=self._ttl_ms)

    def exists(self, key: str) -> bool:
        return bool(self._client().exists(self._k(key)))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """One pipeline of EXISTS (per node on a cluster, sent together)."""
        pipe = self._client().pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        return [bool(found) for found in pipe.execute()]

    def remove(self, key: str) -> None:
        self._client().delete(self._k(key))

    def fits(self, keys: Sequence[str], nbytes: int) -> bool:
        """False when Redis could only make room for `nbytes` more by evicting `keys` (a chain's head): it holds
        no other keys, and ``used_memory`` plus the new entry (allocator rounding included) and as much again for
        the reply buffer that reads it back exceeds ``maxmemory``. Redis evicts by an approximate LRU whose clock
        ticks once a second, so which of a chain's entries it would drop is a coin toss; refusing the write keeps
        the same head on every repeat. A cluster, a server without ``maxmemory``, or one that refuses ``CONFIG``
        cannot tell: True."""
        if self._cluster:
            return True
        pipe = self._client().pipeline(transaction=False)
        pipe.config_get("maxmemory")
        pipe.info("memory")
        pipe.dbsize()
        try:
            config, memory, stored = pipe.execute()
        except ResponseError:
            return True
        maxmemory = int(config.get("maxmemory", 0))
        room_needed = 2 * _allocated(nbytes)  # the entry, and a reply buffer to read it back
        return not maxmemory or int(memory["used_memory"]) + room_needed <= maxmemory or int(stored) > len(keys)

    def touch(self, keys: Sequence[str]) -> None:
        """TOUCH in order (Redis's own LRU clock is coarse, so order within a second is approximate)."""
        pipe = self._client().pipeline(transaction=False)
        for key in keys:
            pipe.touch(self._k(key))
        pipe.execute()

    def route(self, key: str) -> str:
        if not self._cluster:
            return self.name
        client = self._client()
        assert isinstance(client, RedisCluster)
        return client.get_node_from_key(self._k(key)).name

    def classify(self, exc: Exception) -> tuple[str, bool] | None:
        if isinstance(exc, (RedisTimeoutError, socket.timeout)):
            return "timeout", True
        if isinstance(exc, (RedisConnectionError, ClusterError, RedisClusterException, OSError)):
            return "unavailable", True
        if isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and str(exc).startswith("OOM")):
            return "oom", False
        if isinstance(exc, RedisError):
            return "redis_error", False
        return super().classify(exc)

    def close(self) -> None:
        with self._lock:
            if self._client_obj is not None:
                self._client_obj.close()
                self._client_obj = None


def redis_backend(host: str, port: int, db: int, options: RedisOptions) -> RedisBackend:
    """Backend on a single Redis server."""

    def connect() -> Client:
        return redis.Redis(
            host=host, port=port, db=db, username=options.username, password=options.password,
            socket_timeout=options.timeout_s, socket_connect_timeout=options.connect_timeout_s,
            # one immediate retry on a dropped connection (the server restarted), none on timeouts
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )

    return RedisBackend(connect, name=f"redis({host}:{port}/{db})", cluster=False, options=options)


def redis_cluster_backend(nodes: list[tuple[str, int]], options: RedisOptions) -> RedisBackend:
    """Backend on a Redis Cluster reached through any of ``nodes``."""

    def connect() -> Client:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=options.username,
            password=options.password, socket_timeout=options.timeout_s,
            socket_connect_timeout=options.connect_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError, ClusterError)),
            require_full_coverage=False,
        )

    names = ",".join(f"{h}:{p}" for h, p in nodes)
    return RedisBackend(connect, name=f"redis-cluster({names})", cluster=True, options=options)


def _allocated(nbytes: int) -> int:
    """What jemalloc (Redis's allocator) takes for a large value: sizes between two powers of two come in
    four classes (8, 10, 12, 14, 16 MiB), so an entry of 8.5 MiB takes 10."""
    if nbytes <= 16384:
        return nbytes
    step = 1 << (nbytes - 1).bit_length() - 3
    return -(-nbytes // step) * step
