"""Layer-wise loading of stored document KV on a thread that runs ahead of the compute.

Blending needs layer l's stored K/V only when it reaches layer l, so a loader thread
fetches layer l+1 (and later ones) while layer l computes: a slow store hides behind
the recompute instead of adding to it. By default the loader never waits for the
compute: the first layers (computed in full, up to the check layer) cost far more than
the later ones, and a loader held back to a fixed lead would sit idle through them.
The loaded layers are the documents' share of the KV cache, so running ahead costs at
most that much memory again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)


@dataclass
class LayerKV:
    """Stored K (before RoPE) and V of every document token of one layer, in prompt order: (Hkv, N, d)."""

    keys: torch.Tensor
    values: torch.Tensor
    nbytes: int


class LayerSource(Protocol):
    """Reads one layer of the documents' stored KV; None on any failure (miss, corrupt, backend down)."""

    def __call__(self, layer: int) -> LayerKV | None: ...


class LayerPrefetcher:
    """Loads `layers` in order on `streams` threads, at most `ahead` layers (default: all) before the consumer.

    Each thread claims the next unclaimed layer, so with several streams the reads of
    consecutive layers overlap (useful when one read cannot fill the link). `load_s` is
    the wall time from the start until the last layer arrived.
    """

    def __init__(self, source: LayerSource, layers: range, ahead: int | None = None, streams: int = 1):
        self._source = source
        self._layers = layers
        self._next = iter(layers)
        self._loaded: dict[int, LayerKV | None] = {}
        self._room = threading.Semaphore(max(1, len(layers)) if ahead is None else ahead)
        self._ready = threading.Condition()
        self._stopped = False
        self._failed = False
        self._started = time.perf_counter()
        self.load_s = 0.0
        self.wait_s = 0.0
        self.bytes_loaded = 0
        self._threads = [threading.Thread(target=self._run, name=f"kvcake-layer-loader-{i}", daemon=True) for i in range(streams)]
        for thread in self._threads:
            thread.start()

    def get(self, layer: int) -> LayerKV | None:
        """The layer's KV (blocking until loaded), or None if loading it failed."""
        started = time.perf_counter()
        with self._ready:
            self._ready.wait_for(lambda: layer in self._loaded)
            loaded = self._loaded.pop(layer)
        self._room.release()
        self.wait_s += time.perf_counter() - started
        return loaded

    def close(self) -> None:
        """Stop loading (each thread finishes the layer it is reading) and wait for the threads."""
        self._stopped = True
        for _ in self._threads:
            self._room.release()
        for thread in self._threads:
            thread.join()

    def _claim(self) -> int | None:
        with self._ready:
            if self._failed:
                return None
            return next(self._next, None)

    def _run(self) -> None:
        while True:
            self._room.acquire()
            layer = None if self._stopped else self._claim()
            if layer is None:
                return
            try:
                loaded = self._source(layer)
            except Exception:
                log.exception("loading layer %d of the stored documents failed", layer)
                loaded = None
            with self._ready:
                if loaded is None:
                    self._failed = True
                    self._loaded.update({rest: None for rest in self._layers if rest >= layer})
                else:
                    self.bytes_loaded += loaded.nbytes
                    self._loaded.setdefault(layer, loaded)
                self.load_s = time.perf_counter() - self._started
                self._ready.notify_all()
