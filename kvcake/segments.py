"""Prompts made of reusable segments: system text, documents, query.

Each document is tokenized on its own (its text plus a blank line), so its token ids,
and hence its stored KV and key, are the same wherever it appears. The prompt is the
chat template rendered around the documents: the template's head (with the system
text) is the exact prefix, then the documents in the given order, then the query and
the template's tail (where the assistant's reply starts).

A document's KV is computed after a *preamble*: the prompt's exact prefix, i.e. the
template's head with the system text (for raw prompts, the system text or nothing).
Computed from position 0 with nothing before it, a document's first tokens would
become the attention sink that every later token leans on; after the preamble they
are ordinary tokens that have read the instructions, as they are in a real prompt.
A stored document therefore serves every prompt with the same system text, at any
position; its key covers the preamble.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcake.model import Tokenizer

DOCUMENT_END = "\n\n"
_PLACEHOLDER = "\ue000kvcake-documents\ue000"


@dataclass(frozen=True)
class Segments:
    query: str
    documents: tuple[str, ...] = ()
    system: str | None = None


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of the whole prompt and where its parts lie."""

    token_ids: list[int]
    prefix_length: int
    document_spans: tuple[tuple[int, int], ...] = ()

    @property
    def preamble(self) -> tuple[int, ...]:
        """What this prompt's documents are computed after when stored: its exact prefix."""
        return tuple(self.token_ids[: self.prefix_length])

    @classmethod
    def plain(cls, token_ids: list[int]) -> PromptLayout:
        return cls(token_ids, len(token_ids))

    def document_ids(self, index: int) -> list[int]:
        start, end = self.document_spans[index]
        return self.token_ids[start:end]


def split_prompt(prompt: str, separator: str) -> Segments | None:
    """A plain prompt cut at `separator`: every part but the last is a document, the last is the query."""
    if not separator or separator not in prompt:
        return None
    *documents, query = prompt.split(separator)
    return Segments(query=query.strip(), documents=tuple(d.strip() for d in documents if d.strip()))


def document_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text + DOCUMENT_END)


def document_preamble(tokenizer: Tokenizer, chat: bool, system: str | None = None) -> tuple[int, ...]:
    """What a stored document's KV is computed after (not stored itself): the exact prefix of prompts with this system text."""
    head, _ = _head_and_tail(tokenizer, Segments(query="", system=system), chat)
    return tuple(tokenizer.encode(head)) if head else ()


def layout(tokenizer: Tokenizer, segments: Segments, chat: bool) -> PromptLayout:
    head, tail = _head_and_tail(tokenizer, segments, chat)
    token_ids = tokenizer.encode(head) if head else []
    prefix_length = len(token_ids)
    spans = []
    for document in segments.documents:
        ids = document_token_ids(tokenizer, document)
        spans.append((len(token_ids), len(token_ids) + len(ids)))
        token_ids += ids
    token_ids += tokenizer.encode(tail)
    return PromptLayout(token_ids, prefix_length, tuple(spans))


def _head_and_tail(tokenizer: Tokenizer, segments: Segments, chat: bool) -> tuple[str, str]:
    if not (chat and tokenizer.has_chat_template):
        return (segments.system + DOCUMENT_END if segments.system else ""), segments.query
    messages = [{"role": "system", "content": segments.system}] if segments.system else []
    messages.append({"role": "user", "content": _PLACEHOLDER + segments.query})
    head, tail = tokenizer.render_chat(messages).split(_PLACEHOLDER)
    return head, tail
