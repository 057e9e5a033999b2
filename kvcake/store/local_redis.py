"""Throwaway ``redis-server`` processes on 127.0.0.1 (for benchmarks and tests).

Servers persist nothing (``--save "" --appendonly no``) and live in a caller-given
directory. A cluster is created with ``redis-cli --cluster create``; its nodes do not
require full slot coverage, so with one node stopped the others keep serving their slots.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

_START_TIMEOUT_S = 10.0
_CLUSTER_BUS_OFFSET = 10000


def redis_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(with_bus: bool = False) -> int:
    """A free 127.0.0.1 port (and its cluster bus port +10000 when ``with_bus``)."""
    for _ in range(200):
        port = random.randint(20000, 29999) if with_bus else random.randint(30000, 60000)
        if _port_free(port) and (not with_bus or _port_free(port + _CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class LocalRedis:
    """One redis-server; ``start``/``stop``/``kill`` may be repeated (same port)."""

    def __init__(self, workdir: Path, port: int | None = None, cluster: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.port = port or free_port(with_bus=cluster)
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> LocalRedis:
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no",
            ]
        self._proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        client = self.client()
        try:
            _wait_until(client.ping, f"redis-server on port {self.port}")
        except BaseException:
            self.kill()
            raise
        finally:
            client.close()
        return self

    def stop(self) -> None:
        """Terminate (SIGTERM) and wait."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL, like a crash."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


class LocalRedisCluster:
    """``n`` master nodes, no replicas, slots spread evenly."""

    def __init__(self, workdir: Path, n: int = 3) -> None:
        self.nodes = [LocalRedis(workdir / f"node{i}", cluster=True) for i in range(n)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> LocalRedisCluster:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
            )
            for node in self.nodes:
                self._wait_ok(node)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _wait_ok(node: LocalRedis) -> None:
        client = node.client()
        try:
            _wait_until(lambda: client.cluster("INFO").get("cluster_state") == "ok",
                        f"cluster state ok on port {node.port}")
        finally:
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

