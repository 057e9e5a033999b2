"""kvcake: lower time to first token for long-context LLM requests by reusing KV caches."""

__version__ = "0.1.0"
