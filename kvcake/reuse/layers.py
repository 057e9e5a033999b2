"""Layer-wise loading of stored document KV on a thread that runs ahead of the compute.

Blending needs layer l's stored K/V only when it reaches layer l, so a loader thread
fetches layer l+1 (and later ones) while layer l computes: a slow store hides behind
the recompute instead of adding to it. By default the loader never waits for the
compute: the first layers (computed in full, up to the check layer) cost far more than
the later ones, and a loader held back to a fixed lead would sit idle through them.
The loaded layers are the documents' share of the KV cache, so running ahead costs at
most that much memory again. On a GPU each loader thread also copies its layers to the
device, through pinned memory on its own CUDA stream, so the copies overlap the compute
instead of running on the compute thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import torch

from kvcake.chunk import ChunkKV
from kvcake.runtime import confine_torch_to_this_thread

log = logging.getLogger(__name__)


class LayerSource(Protocol):
    """Reads one layer of the documents' stored KV: a one-layer `ChunkKV` of every reused document
    token in prompt order (K before RoPE) and the bytes read from the store for it; None on any
    failure (miss, corrupt, backend down)."""

    def __call__(self, layer: int) -> tuple[ChunkKV, int] | None: ...


class LayerPrefetcher:
    """Loads `layers` in order on `streams` threads, at most `ahead` layers (default: all) before the consumer.

    Each thread claims the next unclaimed layer, so with several streams the reads of
    consecutive layers overlap (useful when one read cannot fill the link). With a CUDA
    `device` the layers are handed over on that device. `load_s` is the wall time from
    the start until the last layer arrived.
    """

    def __init__(
        self,
        source: LayerSource,
        layers: range,
        ahead: int | None = None,
        streams: int = 1,
        device: torch.device | None = None,
        timeout_s: float | None = None,
    ):
        self._source = source
        self._timeout_s = timeout_s
        self._device = device if device is not None and device.type == "cuda" else None
        self._layers = layers
        self._next = iter(layers)
        self._loaded: dict[int, ChunkKV | None] = {}
        self._room = threading.Semaphore(max(1, len(layers)) if ahead is None else ahead)
        self._ready = threading.Condition()
        self._stopped = False
        self._failed = False
        self.timed_out = False
        self._started = time.perf_counter()
        self.load_s = 0.0
        self.wait_s = 0.0
        self.bytes_loaded = 0
        self._threads = [threading.Thread(target=self._run, name=f"kvcake-layer-loader-{i}", daemon=True) for i in range(streams)]
        for thread in self._threads:
            thread.start()

    def get(self, layer: int) -> ChunkKV | None:
        """The layer's KV, one layer (blocking until loaded), or None if loading it failed or took over `timeout_s`."""
        started = time.perf_counter()
        with self._ready:
            if not self._ready.wait_for(lambda: layer in self._loaded, timeout=self._timeout_s):
                self.timed_out = True
                self._failed = True
                log.warning("layer %d of the stored documents did not arrive within %s s; computing instead", layer, self._timeout_s)
                return None
            loaded = self._loaded.pop(layer)
        self._room.release()
        if loaded is not None and self._device is not None:
            consumer = torch.cuda.current_stream(self._device)
            loaded.keys[0].record_stream(consumer)
            loaded.values[0].record_stream(consumer)
        self.wait_s += time.perf_counter() - started
        return loaded

    def close(self) -> None:
        """Stop loading (each thread finishes the layer it is reading) and wait for the threads, at most
        `timeout_s` each: a read that hangs is left to its daemon thread, whose result is dropped."""
        self._stopped = True
        for _ in self._threads:
            self._room.release()
        if self.timed_out:
            return  # a read already overran its bound: do not wait for it again
        for thread in self._threads:
            thread.join(self._timeout_s)

    def _claim(self) -> int | None:
        with self._ready:
            if self._failed:
                return None
            return next(self._next, None)

    def _run(self) -> None:
        confine_torch_to_this_thread()
        copy_stream = torch.cuda.Stream(self._device) if self._device is not None else None
        while True:
            self._room.acquire()
            layer = None if self._stopped else self._claim()
            if layer is None:
                return
            try:
                read = self._source(layer)
                loaded, nbytes = (None, 0) if read is None else read
                if loaded is not None and copy_stream is not None:
                    loaded = self._to_device(loaded, copy_stream)
            except Exception:
                log.exception("loading layer %d of the stored documents failed", layer)
                loaded = None
            with self._ready:
                if loaded is None:
                    self._failed = True
                    self._loaded.update({rest: None for rest in self._layers if rest >= layer})
                else:
                    self.bytes_loaded += nbytes
                    self._loaded.setdefault(layer, loaded)
                self.load_s = time.perf_counter() - self._started
                self._ready.notify_all()

    def _to_device(self, loaded: ChunkKV, copy_stream: torch.cuda.Stream) -> ChunkKV:
        """The layer on the GPU, copied on this thread's stream; returns once the copy is done.

        `get` marks the tensors as used by the consumer's stream, so the allocator does not
        hand their memory to a later copy while the compute still reads them.
        """
        with torch.cuda.stream(copy_stream):
            keys = [k.pin_memory().to(self._device, non_blocking=True) for k in loaded.keys]
            values = [v.pin_memory().to(self._device, non_blocking=True) for v in loaded.values]
        copy_stream.synchronize()
        return ChunkKV(keys, values)
