"""The HTTP layer: an OpenAI-compatible API over one engine."""
