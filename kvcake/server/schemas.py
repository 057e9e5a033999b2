"""Request bodies of the OpenAI-compatible API, with kvcake's extension fields.

Unknown fields are ignored, as OpenAI-compatible servers do. The extensions (reachable
from the `openai` client with `extra_body`): `kv_documents` (reusable documents placed
before the prompt or the last user message), `kv_system` (system text of a completion
with documents), `reuse` (compute, load, cake, split:M, blend) and `ratio` (blend).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stop: str | list[str] | None = None
    kv_documents: list[str] | None = None
    reuse: str | None = None
    ratio: float | None = Field(default=None, ge=0.0, le=1.0)


class CompletionBody(SamplingFields):
    prompt: str | list[int] | list[str]
    kv_system: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class WarmBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    documents: list[str] = Field(min_length=1)
    model: str | None = None
    chat: bool = Field(default=True, description="Warm for chat requests (true) or for plain completions (false).")
    system: str | None = Field(default=None, description="The system text of the requests these documents will serve.")
