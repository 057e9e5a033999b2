"""Request bodies of the OpenAI-compatible API, with kvcake's extension fields.

A field kvcake does not act on is refused with a 400 naming it, never silently
ignored (a client would believe it got what it asked for): unknown fields, and the
OpenAI fields not implemented yet (tools, best_of, suffix, ...) unless they carry their
neutral value. `user`, a message's `name` and
`stream_options` are accepted and documented as not changing anything. Types are
strict (a number sent as a string is refused, not coerced), and text with an unpaired
surrogate is refused (no tokenizer could encode it). The extensions (reachable
from the `openai` client with `extra_body`): `kv_documents` (reusable documents placed
before the prompt or the last user message), `kv_system` (system text of a completion
with documents), `reuse` (a mode of `kvcake.modes`: compute, load, cake, split:M, blend,
tune) and `ratio` (blend, tune).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from kvcake.modes import DOCUMENT_MECHANISMS
from kvcake.requests import MAX_CHOICES

SEED_RANGE = (-(2**63), 2**64 - 1)
"""What torch's generators accept as a seed."""
DocumentMode = Literal[tuple(DOCUMENT_MECHANISMS)]  # type: ignore[valid-type]
"""A document mode's name (`kvcake.modes`), as a warm call names the layout it stores."""


def _no_lone_surrogates(text: str) -> str:
    """JSON can carry an unpaired UTF-16 surrogate (\\ud800) that no tokenizer can encode: refuse it here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the text holds an unpaired surrogate (\\u{ord(text[error.start]):04x}) at character {error.start}") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
MAX_STOP_SEQUENCES = 4
"""As OpenAI allows."""


def _stop_sequence(text: str) -> str:
    if not text:
        raise ValueError("a stop sequence must not be empty")
    return _no_lone_surrogates(text)


StopSequence = Annotated[str, AfterValidator(_stop_sequence)]


class _Body(BaseModel):
    """Strict types: "3" is not a number and "yes" is not a boolean. A field kvcake does not act on is refused
    (400 naming it), never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _only(neutral: object) -> AfterValidator:
    """A field OpenAI defines that kvcake accepts only at its neutral value (so a client cannot believe it acted)."""

    def check(value: object) -> object:
        if value not in (neutral, None):
            raise ValueError(f"kvcake does not support this field yet (only {neutral!r})")
        return value

    return AfterValidator(check)


class TextFormat(_Body):
    type: Literal["text"]


class JsonObjectFormat(_Body):
    type: Literal["json_object"]


class JsonSchemaSpec(_Body):
    name: str
    schema_: dict[str, object] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class JsonSchemaFormat(_Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


class StreamOptions(_Body):
    include_usage: bool = Field(default=True, description="kvcake always sends usage (and its accounting) in the last chunk.")


class SamplingFields(_Body):
    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="Choices sampled from one prefill of the prompt.")
    stream: bool = False
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        default=None, description="Up to 4 non-empty stop sequences; the match is not returned."
    )
    kv_documents: list[Text] | None = None
    reuse: Text | None = None
    ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    user: str | None = Field(default=None, description="Accepted and not used (OpenAI's end-user id for abuse monitoring).")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, description="Token id (as a string) -> bias added to its logit."
    )
    ignore_eos: bool | None = Field(default=None, description="vLLM's extension: generate max_tokens tokens, past the model's stop tokens.")


class CompletionBody(SamplingFields):
    prompt: Text | list[int] | list[Text]
    kv_system: Text | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5, description="Log probabilities of each token and of this many alternatives.")
    echo: bool | None = Field(default=None, description="Return the prompt before each completion (without logprobs).")
    best_of: Annotated[int | None, _only(1)] = None
    suffix: Annotated[str | None, _only("")] = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text
    name: str | None = Field(default=None, description="Accepted and not used.")


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="With logprobs: this many most likely alternatives per token.")
    response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = Field(default=None, discriminator="type")
    tools: Annotated[list[object] | None, _only([])] = None
    tool_choice: Annotated[str | dict[str, object] | None, _only("none")] = None
    parallel_tool_calls: Annotated[bool | None, _only(False)] = None


class WarmBody(_Body):
    documents: list[Text] = Field(min_length=1)
    model: Text | None = None
    chat: bool = Field(default=True, description="Warm for chat requests (true) or for plain completions (false).")
    system: Text | None = Field(default=None, description="The system text of the requests these documents will serve.")
    reuse: DocumentMode | None = Field(
        default=None, description="Store the layout of this document mode (tune: scored and sorted); default: the server's reuse setting.")
