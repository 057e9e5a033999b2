"""`kvcake serve`: the server in the foreground until SIGTERM or SIGINT, then a stop that keeps the data.

uvicorn re-raises a stop signal once its own shutdown is done, and the default handler then
ends the process before the engine has written back what it promised the store (a request's
computed chunks are written after its answer). Here the signal only asks the server to stop:
it stops accepting, lets running requests finish (the app's shutdown closes the compute
worker), and `serve` returns; the caller then closes the engine, which writes back what is
pending within `shutdown_grace_s`, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from kvcake.engine import Engine
from kvcake.server.app import create_app

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StoppableServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """A stop signal asks for a graceful exit (a second SIGINT forces it), and is not raised again afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(engine: Engine, host: str, port: int) -> None:
    """Serve `engine` until a stop signal; returns once no request runs (the engine stays open)."""
    _StoppableServer(uvicorn.Config(create_app(engine), host=host, port=port, log_level="info")).run()
