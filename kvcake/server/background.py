"""A server on 127.0.0.1 in a background thread: for the demo, benchmarks and tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kvcake.engine import Engine
from kvcake.server.app import create_app

START_TIMEOUT_S = 60


class BackgroundServer:
    """`with BackgroundServer(engine) as server:` serves `engine` at `server.url` until the block ends."""

    def __init__(self, engine: Engine, port: int | None = None):
        self.engine = engine
        self.port = port or free_port()
        config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="kvcake-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=START_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
