"""Fixtures of the store tests: small random chunks and real redis-server processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvcake.store import ChunkKV
from kvcake.store.local_redis import LocalRedis, LocalRedisCluster, redis_available

MakeChunk = Callable[..., ChunkKV]


def _require_redis() -> None:
    if redis_available():
        return
    message = "redis-server/redis-cli not installed (apt-get install redis-server)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def make_chunk() -> MakeChunk:
    """``make_chunk(layers=3, heads=2, tokens=40, dim=8, dtype=torch.float32, seed=0)``."""

    def make(layers: int = 3, heads: int = 2, tokens: int = 40, dim: int = 8,
             dtype: torch.dtype = torch.float32, seed: int = 0) -> ChunkKV:
        g = torch.Generator().manual_seed(seed)

        def tensor() -> torch.Tensor:
            return torch.randn(heads, tokens, dim, generator=g).to(dtype)

        return ChunkKV(keys=[tensor() for _ in range(layers)], values=[tensor() for _ in range(layers)])

    return make


def chunks_equal(a: ChunkKV | None, b: ChunkKV | None) -> bool:
    """Bit-exact equality of two chunks (dtype, shape and every bit)."""
    if a is None or b is None or a.num_layers != b.num_layers:
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True)
    )


def token_slice(chunk: ChunkKV, start: int, end: int) -> ChunkKV:
    return ChunkKV(keys=[k[:, start:end].contiguous() for k in chunk.keys],
                   values=[v[:, start:end].contiguous() for v in chunk.values])


@pytest.fixture
def same() -> Callable[[ChunkKV | None, ChunkKV | None], bool]:
    return chunks_equal


@pytest.fixture
def tokens_of() -> Callable[[ChunkKV, int, int], ChunkKV]:
    return token_slice


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., LocalRedis]]:
    """Start redis-servers with extra arguments; all are stopped at teardown."""
    _require_redis()
    servers: list[LocalRedis] = []

    def start(*extra_args: str) -> LocalRedis:
        server = LocalRedis(tmp_path / f"redis{len(servers)}", extra_args=extra_args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(redis_factory: Callable[..., LocalRedis]) -> LocalRedis:
    return redis_factory()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    """Three master nodes created with ``redis-cli --cluster create``."""
    _require_redis()
    cluster = LocalRedisCluster(tmp_path / "cluster", n=3).start()
    yield cluster
    for node in cluster.nodes:
        node.kill()
