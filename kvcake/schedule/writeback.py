"""Asynchronous write-back of computed chunks, off the time-to-first-token path."""

from __future__ import annotations

import logging
import queue
import threading

import torch

from kvcake.store import ChunkKV, KVStore

log = logging.getLogger(__name__)


class WriteBack:
    """One background thread putting chunks into the store; a full queue drops (and counts) writes."""

    def __init__(self, store: KVStore, max_pending: int = 256):
        self.store = store
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, list[torch.Tensor], list[torch.Tensor]] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="kvcake-writeback", daemon=True)
        self._thread.start()

    def submit(self, key: str, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        try:
            self._queue.put_nowait((key, keys, values))
        except queue.Full:
            self.dropped += 1

    def flush(self) -> None:
        """Wait until every submitted chunk has been written (or skipped)."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            key, keys, values = item
            try:
                if not self.store.contains(key):
                    self.store.put(key, ChunkKV([k.cpu() for k in keys], [v.cpu() for v in values]))
            except Exception:
                log.exception("write-back of chunk %s failed", key)
            finally:
                self._queue.task_done()
        self._queue.task_done()
