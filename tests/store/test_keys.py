from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcake.store import document_key, model_fingerprint, prefix_chunk_keys
from kvcake.store import keys as keys_module

ARCH = {"family": "llama", "num_layers": 30, "n_kv_heads": 3, "head_dim": 64, "rope_theta": 10000.0}
TOKENS = list(range(1000, 1100))
REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
from kvcake.store import document_key, model_fingerprint, prefix_chunk_keys
arch, tokens = json.loads(sys.argv[1])
fp = model_fingerprint(arch, "weights-sha", "float32")
print(json.dumps([fp, prefix_chunk_keys(fp, "tenant", tokens, 16), document_key(fp, "tenant", tokens)]))
"""


def _keys_here() -> list:
    fp = model_fingerprint(ARCH, "weights-sha", "float32")
    return [fp, prefix_chunk_keys(fp, "tenant", TOKENS, 16), document_key(fp, "tenant", TOKENS)]


def test_keys_equal_across_processes_with_different_hash_seeds() -> None:
    results = []
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([ARCH, TOKENS])],
                             env=env, capture_output=True, text=True, check=True, cwd=REPO)
        results.append(json.loads(out.stdout))
    assert results[0] == results[1] == _keys_here()


def test_keys_are_short_hex() -> None:
    fp, prefix, doc = _keys_here()
    for key in (fp, *prefix, doc):
        assert len(key) == 32 and all(c in "0123456789abcdef" for c in key)


def test_tenant_salt_separates_keys() -> None:
    fp = model_fingerprint(ARCH, "w", "float32")
    a = prefix_chunk_keys(fp, "tenant-a", TOKENS, 16)
    b = prefix_chunk_keys(fp, "tenant-b", TOKENS, 16)
    assert not set(a) & set(b)
    assert document_key(fp, "tenant-a", TOKENS) != document_key(fp, "tenant-b", TOKENS)


def test_prefix_keys_chain_the_whole_prefix() -> None:
    fp = model_fingerprint(ARCH, "w", "float32")
    keys = prefix_chunk_keys(fp, "", TOKENS, 16)
    assert len(keys) == len(TOKENS) // 16  # the trailing partial chunk gets no key
    assert len(set(keys)) == len(keys)
    # a prompt that shares the first 32 tokens shares exactly the first two keys
    other = [*TOKENS[:32], 7, *TOKENS[33:]]
    other_keys = prefix_chunk_keys(fp, "", other, 16)
    assert other_keys[:2] == keys[:2] and all(x != y for x, y in zip(other_keys[2:], keys[2:], strict=True))
    # the same chunk tokens after a different prefix get a different key
    assert prefix_chunk_keys(fp, "", [1] * 16 + TOKENS[16:32], 16)[1] != keys[1]
    assert prefix_chunk_keys(fp, "", TOKENS[:15], 16) == []


def test_document_key_is_position_independent() -> None:
    fp = model_fingerprint(ARCH, "w", "float32")
    doc = TOKENS[40:72]
    assert document_key(fp, "", doc) == document_key(fp, "", list(doc))
    assert document_key(fp, "", doc) != document_key(fp, "", doc[:-1])
    assert document_key(fp, "", doc) not in prefix_chunk_keys(fp, "", doc, len(doc))


def test_token_ids_accept_tensors_and_big_ids() -> None:
    fp = model_fingerprint(ARCH, "w", "float32")
    assert document_key(fp, "", torch.tensor(TOKENS)) == document_key(fp, "", TOKENS)
    assert document_key(fp, "", [2**40]) != document_key(fp, "", [0])
    with pytest.raises(ValueError):
        prefix_chunk_keys(fp, "", TOKENS, 0)


def test_fingerprint_covers_arch_weights_dtype_and_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    base = model_fingerprint(ARCH, "w", "float32")
    assert model_fingerprint(dict(reversed(list(ARCH.items()))), "w", "float32") == base
    assert model_fingerprint({**ARCH, "num_layers": 31}, "w", "float32") != base
    assert model_fingerprint(ARCH, "w2", "float32") != base
    assert model_fingerprint(ARCH, "w", "bfloat16") != base
    assert model_fingerprint({**ARCH, "torch_dtype": torch.float16}, "w", "float32") != base
    monkeypatch.setattr(keys_module, "CODEC_VERSION", keys_module.CODEC_VERSION + 1)
    assert model_fingerprint(ARCH, "w", "float32") != base


def test_fingerprint_rejects_unstable_config_values() -> None:
    with pytest.raises(TypeError):
        model_fingerprint({"obj": object()}, "w", "float32")
