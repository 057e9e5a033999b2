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
    """Loads `layers` in order on one thread, at most `ahead` layers (default: all) before the consumer."""

    def __init__(self, source: LayerSource, layers: range, ahead: int | None = None):
        self._source = source
        self._layers = layers
        self._loaded: dict[int, LayerKV | None] = {}
        self._room = threading.Semaphore(max(1, len(layers)) if ahead is None else ahead)
        self._ready = threading.Condition()
        self._stopped = False
        self.load_s = 0.0
        self.wait_s = 0.0
        self.bytes_loaded = 0
        self._thread = threading.Thread(target=self._run, name="kvcake-layer-loader", daemon=True)
        self._thread.start()

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
        """Stop loading (the thread finishes the layer it is reading) and wait for it."""
        self._stopped = True
        self._room.release()
        self._thread.join()

    def _run(self) -> None:
        for layer in self._layers:
            self._room.acquire()
            if self._stopped:
                return
            started = time.perf_counter()
            try:
                loaded = self._source(layer)
            except Exception:
                log.exception("loading layer %d of the stored documents failed", layer)
                loaded = None
            self.load_s += time.perf_counter() - started
            if loaded is not None:
                self.bytes_loaded += loaded.nbytes
            with self._ready:
                if loaded is None:
                    self._loaded.update({rest: None for rest in self._layers if rest >= layer})
                else:
                    self._loaded[layer] = loaded
                self._ready.notify_all()
            if loaded is None:
                return
