"""Stable chunk keys: BLAKE2b over length-prefixed fields, equal in every process.

Every field is prefixed by its length, so no two different field lists hash the same
bytes. Token ids are hashed as little-endian int64. Keys are 32 lowercase hex digits
(128 bits): valid Redis keys and file names.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from kvcake.store.codec import CODEC_VERSION

_DIGEST_SIZE = 16
_PERSON = b"kvcake.keys.v1"
TAIL_BLOCK = 16
"""Tokens per block of a prefix's tail (the tokens after its last full chunk), the unit it is reused in."""
SHARED_DOCUMENTS_SALT = "kvcake-shared-documents"
"""Salt of document keys when documents are shared: one corpus for every tenant."""


def _digest(*fields: bytes) -> str:
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=_PERSON)
    for field in fields:
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.hexdigest()


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError("token ids must be a flat sequence of integers")
    return ids.astype("<i8").tobytes()


def _json_value(obj: Any) -> Any:
    """Canonical JSON form of config values json does not know (dtypes, enums, paths, sets)."""
    if isinstance(obj, enum.Enum):
        return _json_value(obj.value)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, PurePath) or type(obj).__name__ == "dtype":
        return str(obj)
    raise TypeError(f"cannot fingerprint a config value of type {type(obj).__name__}")


def model_fingerprint(arch: Mapping[str, Any], weights_id: str, dtype: str) -> str:
    """Identity of a model as the cache sees it.

    Covers the architecture config (canonical JSON, key order irrelevant), the weights'
    identity (e.g. a file digest), the dtype KV is computed and stored in, and the codec
    version, so a cache written by another model, precision or format is never read.
    """
    arch_json = json.dumps(dict(arch), sort_keys=True, separators=(",", ":"), default=_json_value)
    return _digest(
        b"fingerprint", arch_json.encode(), weights_id.encode(), dtype.encode(),
        str(CODEC_VERSION).encode(),
    )


def prefix_chunk_keys(
    fingerprint: str, tenant_salt: str, token_ids: Sequence[int], chunk_size: int, *, after: str = "", tag: bytes = b"prefix"
) -> list[str]:
    """One key per full chunk; key i hashes key i-1, so it names the whole prefix.

    A trailing partial chunk gets no key. `after` is the key of what precedes `token_ids`
    (a tail's blocks follow the prefix's last full chunk); `tag` keeps kinds of entry apart.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    tokens = _token_bytes(token_ids)
    step = 8 * chunk_size
    keys: list[str] = []
    parent = after.encode()
    for start in range(0, len(tokens) - step + 1, step):
        key = _digest(tag, fingerprint.encode(), tenant_salt.encode(), parent, tokens[start : start + step])
        keys.append(key)
        parent = key.encode()
    return keys


def document_key(fingerprint: str, tenant_salt: str, token_ids: Sequence[int], layout: str = "plain") -> str:
    """Position-independent key of a document (segment): the same tokens anywhere in a prompt.

    `layout` names how the entry is laid out: `plain` (tokens in order) or another name
    (e.g. CacheTune's tokens in the order of one scoring rule, and that order itself).
    """
    if not layout:
        raise ValueError("a document layout needs a name")
    tag = b"doc" if layout == "plain" else b"doc-" + layout.encode()
    return _digest(tag, fingerprint.encode(), tenant_salt.encode(), _token_bytes(token_ids))


@dataclass(frozen=True)
class KeyRules:
    """Every key an engine makes, from its model fingerprint and settings.

    Prefix chunks chain under the tenant's salt. A document's key covers the preamble it
    was computed after and the gap between them (its stored KV depends on both), names
    its layout, and is salted by the tenant unless documents are shared.
    """

    fingerprint: str
    chunk_size: int
    document_gap: int = 0
    shared_documents: bool = False

    def prefix_chunks(self, tenant: str, token_ids: Sequence[int]) -> list[str]:
        return prefix_chunk_keys(self.fingerprint, tenant, token_ids, self.chunk_size)

    def prefix_tail(self, tenant: str, token_ids: Sequence[int], chunk_keys: Sequence[str]) -> list[str]:
        """Keys of the `TAIL_BLOCK`-token blocks after the prompt's full chunks (`chunk_keys`), chained to the last of them."""
        after = chunk_keys[-1] if chunk_keys else ""
        return prefix_chunk_keys(self.fingerprint, tenant, token_ids[len(chunk_keys) * self.chunk_size :], TAIL_BLOCK, after=after, tag=b"tail")

    def document(self, tenant: str, preamble: Sequence[int], token_ids: Sequence[int], layout: str = "plain") -> str:
        salt = SHARED_DOCUMENTS_SALT if self.shared_documents else tenant
        return document_key(self.fingerprint, salt, [*preamble, *token_ids], f"{layout}@{self.document_gap}")
