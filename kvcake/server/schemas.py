"""Request bodies of the OpenAI-compatible API, with kvcake's extension fields.

Unknown fields are ignored, as OpenAI-compatible servers do; known ones have strict
types (a number sent as a string is refused, not coerced), and text with an unpaired
surrogate is refused (no tokenizer could encode it). The extensions (reachable
from the `openai` client with `extra_body`): `kv_documents` (reusable documents placed
before the prompt or the last user message), `kv_system` (system text of a completion
with documents), `reuse` (compute, load, cake, split:M, blend) and `ratio` (blend).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_RANGE = (-(2**63), 2**64 - 1)
"""What torch's generators accept as a seed."""


def _no_lone_surrogates(text: str) -> str:
    """JSON can carry an unpaired UTF-16 surrogate (\\ud800) that no tokenizer can encode: refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the text holds an unpaired surrogate (\\u{ord(text[error.start]):04x}) at character {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


class _Body(BaseModel):
    """Strict types: "3" is not a number and "yes" is not a boolean; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class SamplingFields(_Body):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request.")
    stream: bool = False
    stop: Text | list[Text] | None = None
    kv_documents: list[Text] | None = None
    reuse: Text | None = None
    ratio: float | None = Field(default=None, ge=0.0, le=1.0)


class CompletionBody(SamplingFields):
    prompt: Text | list[int] | list[Text]
    kv_system: Text | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class WarmBody(_Body):
    documents: list[Text] = Field(min_length=1)
    model: Text | None = None
    chat: bool = Field(default=True, description="Warm for chat requests (true) or for plain completions (false).")
    system: Text | None = Field(default=None, description="The system text of the requests these documents will serve.")
