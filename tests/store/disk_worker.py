"""One of the processes of the concurrent disk test (run as a script, not collected).

Writes entries whose every element equals one value (writer id and iteration), over a
few shared keys, and reads them back whole, by layer and by token range. A torn read
would show two values in one result. Prints a JSON summary.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

from kvcake.store import ChunkKV, open_store

LAYERS, HEADS, TOKENS, DIM = 4, 2, 64, 16


def constant_chunk(value: float) -> ChunkKV:
    def t() -> torch.Tensor:
        return torch.full((HEADS, TOKENS, DIM), value)

    return ChunkKV([t() for _ in range(LAYERS)], [t() for _ in range(LAYERS)])


def check(tensors: list[torch.Tensor], tokens: int) -> bool:
    """Complete (right shapes) and not torn (a single value throughout)."""
    first = tensors[0].flatten()[0]
    return all(t.shape == (HEADS, tokens, DIM) and bool((t == first).all()) for t in tensors)


def main(root: str, writer: int, iterations: int, go_file: str) -> None:
    store = open_store(f"file://{root}?max_gb={6 * 70_000 / 1e9}")
    rng = random.Random(writer)
    deadline = time.monotonic() + 120
    while not Path(go_file).exists():
        if time.monotonic() > deadline:
            raise SystemExit("the start signal never came")
        time.sleep(0.001)
    hits = misses = torn = 0
    for i in range(iterations):
        store.put(f"k{rng.randrange(8)}", constant_chunk(float(writer * 100_000 + i)))
        key, kind = f"k{rng.randrange(8)}", i % 3
        if kind == 0:
            got = store.get(key)
            ok = got is None or check(got.keys + got.values, TOKENS)
        elif kind == 1:
            got = store.get_layer(key, rng.randrange(LAYERS))
            ok = got is None or check(list(got), TOKENS)
        else:
            start = rng.randrange(TOKENS - 1)
            end = rng.randrange(start + 1, TOKENS + 1)
            got = store.get_tokens(key, start, end)
            ok = got is None or check(got.keys + got.values, end - start)
        hits += got is not None
        misses += got is None
        torn += not ok
    stats = store.stats()
    print(json.dumps({"hits": hits, "misses": misses, "torn": torn, "errors": stats.errors,
                      "evictions": stats.evictions}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
