"""KV chunk store: stable keys, a checksummed codec, and memory / disk / Redis tiers.

Open a store with ``open_store(url)``; see docs/store.md for the URL syntax.
"""

from kvcake.store.base import KVStore, StoreStats
from kvcake.store.codec import CODEC_VERSION, ChunkKV
from kvcake.store.factory import open_store, tiered_url
from kvcake.store.keys import TAIL_BLOCK, KeyRules, document_key, model_fingerprint, prefix_chunk_keys
from kvcake.store.tiered import TieredStore

__all__ = [
    "CODEC_VERSION",
    "ChunkKV",
    "KVStore",
    "KeyRules",
    "StoreStats",
    "TieredStore",
    "document_key",
    "model_fingerprint",
    "open_store",
    "prefix_chunk_keys",
    "TAIL_BLOCK",
    "tiered_url",
]
