"""``open_store(url)``: pick and configure a store from one URL (syntax in docs/store.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, unquote, urlencode, urlsplit

import torch

from kvcake.store import codec
from kvcake.store.backend import Backend
from kvcake.store.base import KVStore
from kvcake.store.bytestore import ByteStore
from kvcake.store.disk import FileBackend
from kvcake.store.memory import MemoryBackend
from kvcake.store.tensors import TensorStore
from kvcake.store.redis_backend import RedisOptions, redis_backend, redis_cluster_backend
from kvcake.store.throttle import ThrottledBackend
from kvcake.store.tiered import TieredStore

_GB = 1e9


class _Params:
    """Query parameters of a store URL; unknown or unused names are an error (typos fail loudly)."""

    def __init__(self, url: str, query: str) -> None:
        self._url = url
        self._values = parse_qs(query, keep_blank_values=True, strict_parsing=False)
        self._used: set[str] = set()

    def all(self, name: str) -> list[str]:
        self._used.add(name)
        return self._values.get(name, [])

    def text(self, name: str, default: str | None = None) -> str | None:
        values = self.all(name)
        if len(values) > 1:
            raise ValueError(f"{self._url}: {name} given more than once")
        return values[0] if values else default

    def number(self, name: str) -> float | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{self._url}: {name}={value!r} is not a number") from None

    def number_or(self, name: str, default: float) -> float:
        value = self.number(name)
        return default if value is None else value

    def done(self) -> None:
        unknown = set(self._values) - self._used
        if unknown:
            raise ValueError(f"{self._url}: unknown parameter(s) {', '.join(sorted(unknown))}")


def open_store(url: str) -> KVStore:
    """A store for a URL; raises ValueError on a malformed URL, never on an unreachable backend.

    `memory://` is the tensor tier (`TensorStore`); with `throttle_gbps` it is a byte store
    behind the emulated link instead, since a link moves bytes.
    """
    parts = urlsplit(url)
    params = _Params(url, parts.query)
    dtype = params.text("dtype")
    if dtype is not None and dtype != "keep":
        codec.dtype_code(dtype, torch.float32)  # validate the name now, not at the first put
    page_tokens = int(params.number_or("page_tokens", codec.DEFAULT_PAGE_TOKENS))
    if parts.scheme == "tiered":
        mode = params.text("write", "through")
        if mode not in ("through", "back"):
            raise ValueError(f"{url}: write must be 'through' or 'back'")
        tiers = [open_store(u) for u in params.all("tier")]
        store: KVStore = TieredStore(
            tiers, write_back=mode == "back", queue_size=int(params.number_or("queue", 64)),
            dtype=dtype, page_tokens=page_tokens,
        )
    else:
        gbps = params.number("throttle_gbps")
        latency_ms = params.number("latency_ms")
        if latency_ms is not None and gbps is None:
            raise ValueError(f"{url}: latency_ms needs throttle_gbps")
        if parts.scheme == "memory" and gbps is None:
            store = TensorStore(_budget(params, default_gb=1.0) or int(_GB), dtype=dtype, page_tokens=page_tokens)
        else:
            backend = _backend(parts, params, url)
            if gbps is not None:
                backend = ThrottledBackend(backend, gbps, (latency_ms or 0.0) / 1e3)
            store = ByteStore(backend, dtype=dtype, page_tokens=page_tokens)
    params.done()
    return store


def tiered_url(urls: Sequence[str], write: str = "through", queue: int = 64) -> str:
    """Build a ``tiered://`` URL from tier URLs, fastest first."""
    return "tiered://?" + urlencode([("tier", u) for u in urls] + [("write", write), ("queue", queue)])


def _backend(parts: SplitResult, params: _Params, url: str) -> Backend:
    scheme = parts.scheme
    if scheme == "memory":
        return MemoryBackend(_budget(params, default_gb=1.0) or int(_GB))
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"{url}: use file:///absolute/dir")
        return FileBackend(Path(unquote(parts.path)), _budget(params, default_gb=None))
    if scheme in ("redis", "redis+cluster"):
        return _redis(parts, params, url)
    raise ValueError(f"{url}: unknown store scheme {scheme!r}")


def _budget(params: _Params, default_gb: float | None) -> int | None:
    gb = params.number("max_gb")
    gb = default_gb if gb is None else gb
    if gb is not None and gb <= 0:
        raise ValueError("max_gb must be positive")
    return None if gb is None else int(gb * _GB)


def _redis(parts: SplitResult, params: _Params, url: str) -> Backend:
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = [_host_port(h, url) for h in hosts.split(",") if h]
    if not nodes:
        raise ValueError(f"{url}: no host")
    defaults = RedisOptions()
    options = RedisOptions(
        username=unquote(username) or None, password=unquote(password) or None,
        timeout_s=params.number_or("timeout_s", defaults.timeout_s),
        connect_timeout_s=params.number_or("connect_timeout_s", defaults.connect_timeout_s),
        prefix=params.text("prefix") or defaults.prefix, ttl_s=params.number("ttl_s"),
        retry_s=params.number_or("retry_s", defaults.retry_s),
    )
    if parts.scheme == "redis+cluster":
        return redis_cluster_backend(nodes, options)
    if len(nodes) != 1:
        raise ValueError(f"{url}: redis:// takes one host (use redis+cluster:// for several)")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"{url}: database must be a number")
    return redis_backend(nodes[0][0], nodes[0][1], int(db), options)


def _host_port(text: str, url: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 6379
    if not port.isdigit():
        raise ValueError(f"{url}: bad port in {text!r}")
    return host.strip("[]"), int(port)
