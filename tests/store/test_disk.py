from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcake.store import codec, open_store

REPO = Path(__file__).resolve().parents[2]


def _entry_path(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.kv"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_round_trip_partial_reads_and_persistence(tmp_path, make_chunk, same, tokens_of) -> None:
    store = open_store(f"file://{tmp_path}")
    chunk = make_chunk(layers=4, tokens=50)
    assert store.put("abc123", chunk)
    assert _entry_path(tmp_path, "abc123").is_file()
    reopened = open_store(f"file://{tmp_path}")
    assert same(reopened.get("abc123"), chunk)
    k, v = reopened.get_layer("abc123", 3)
    assert k.equal(chunk.keys[3]) and v.equal(chunk.values[3])
    assert same(reopened.get_tokens("abc123", 17, 50), tokens_of(chunk, 17, 50))
    assert reopened.contains("abc123")
    reopened.delete("abc123")
    assert not store.contains("abc123") and store.get("abc123") is None
    assert store.get_layer("abc123", 0) is None


def test_lru_eviction_by_byte_budget_is_shared_through_the_directory(tmp_path, make_chunk) -> None:
    entry = len(codec.encode(make_chunk()))
    url = f"file://{tmp_path}?max_gb={3.5 * entry / 1e9}"
    store = open_store(url)
    for i in range(3):
        store.put(f"k{i}", make_chunk(seed=i))
    other = open_store(url)  # another store (as another process would) marks k0 as used
    assert other.get_layer("k0", 0) is not None
    store.put("k3", make_chunk(seed=3))
    assert [store.contains(f"k{i}") for i in range(4)] == [True, False, True, True]
    assert store.stats().evictions == 1
    assert sum(1 for _ in tmp_path.rglob("*.kv")) == 3


@pytest.mark.parametrize("read", ["get", "get_layer", "get_tokens", "get_encoded"])
def test_corrupted_entry_is_a_miss_and_is_removed(tmp_path, make_chunk, read) -> None:
    store = open_store(f"file://{tmp_path}")
    chunk = make_chunk(layers=2, tokens=32)
    store.put("k", chunk)
    h = codec.parse_header(codec.encode(chunk))
    _flip(_entry_path(tmp_path, "k"), h.pages_range(2, 1, 2)[0] + 3)  # layer 1, K, tokens 16..31
    calls = {
        "get": lambda: store.get("k"),
        "get_layer": lambda: store.get_layer("k", 1),
        "get_tokens": lambda: store.get_tokens("k", 20, 21),
        "get_encoded": lambda: store.get_encoded("k"),
    }
    assert calls[read]() is None
    assert not _entry_path(tmp_path, "k").exists()
    stats = store.stats()
    assert stats.errors == {"checksum": 1} and stats.misses == 1 and stats.hits == 0


def test_corrupted_header_and_truncated_file(tmp_path, make_chunk) -> None:
    store = open_store(f"file://{tmp_path}")
    for key in ("a", "b", "c"):
        store.put(key, make_chunk())
    _flip(_entry_path(tmp_path, "a"), 20)
    path = _entry_path(tmp_path, "b")
    path.write_bytes(path.read_bytes()[:-100])
    _entry_path(tmp_path, "c").write_bytes(b"")
    assert store.get_layer("a", 0) is None and store.get("b") is None and store.get_tokens("c", 0, 1) is None
    assert not any(_entry_path(tmp_path, k).exists() for k in "abc")
    assert store.stats().errors == {"checksum": 1, "truncated": 2}


def test_entry_rewritten_by_another_writer_under_a_cached_header(tmp_path, make_chunk, same) -> None:
    reader = open_store(f"file://{tmp_path}")
    reader.put("k", make_chunk(seed=1))
    assert reader.get_layer("k", 0) is not None  # header now cached by this store
    writer = open_store(f"file://{tmp_path}?dtype=fp16&page_tokens=5")
    new = make_chunk(seed=2)
    writer.put("k", new)
    k, _ = reader.get_layer("k", 2)
    assert k.equal(new.keys[2].half())
    assert reader.stats().errors == {}


_DISK_FULL = """
import json, resource, signal, sys, torch
from kvcake.store import ChunkKV, open_store
store = open_store("file://" + sys.argv[1])
small = ChunkKV([torch.ones(1, 4, 4)], [torch.ones(1, 4, 4)])
assert store.put("small", small)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # writes past 4 KiB fail like a full disk
big = ChunkKV([torch.ones(2, 64, 16)], [torch.ones(2, 64, 16)])
ok = store.put("big", big)
print(json.dumps({"ok": ok, "errors": store.stats().errors, "small": store.get("small") is not None,
                  "big": store.get("big") is not None}))
"""


def test_disk_full_skips_the_write(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-c", _DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(out.stdout)
    assert result == {"ok": False, "errors": {"disk_full": 1}, "small": True, "big": False}
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"] == ["small.kv"]


def test_two_processes_share_a_directory_without_torn_reads(tmp_path) -> None:
    root, go = tmp_path / "store", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = Path(__file__).with_name("disk_worker.py")
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(root), str(w), "400", str(go)],
                         stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        for w in (1, 2)
    ]
    go.touch()
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    for r in results:
        assert r["torn"] == 0
        assert r["errors"] == {}  # not even a torn read caught by a checksum
        assert r["hits"] > 0
    assert sum(r["evictions"] for r in results) > 0  # eviction ran while the other process read


def test_entry_whose_header_exceeds_the_first_read(tmp_path, make_chunk, same, tokens_of) -> None:
    store = open_store(f"file://{tmp_path}?page_tokens=1")
    chunk = make_chunk(layers=2, heads=1, tokens=1500, dim=2)  # 6000 page checksums: a 24 KB header
    store.put("k", chunk)
    assert codec.parse_header(codec.encode(chunk, page_tokens=1)).header_len > codec.HEADER_PROBE_BYTES
    assert store.get_layer("k", 1)[1].equal(chunk.values[1])
    assert same(store.get_tokens("k", 700, 1500), tokens_of(chunk, 700, 1500))
    assert store.stats().errors == {}
