"""A live kvcake server on 127.0.0.1 for the HTTP tests, reached with the official `openai` client."""

from __future__ import annotations

import openai

from kvcake.server.background import BackgroundServer


class LiveServer(BackgroundServer):
    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
