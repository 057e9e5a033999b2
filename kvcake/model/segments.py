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

from kvcake.model.tokenizer import Tokenizer

DOCUMENT_END = "\n\n"
_PROBES = ("A", "B")
"""Two user texts that differ in their first character: rendering both finds where the template puts the user text."""


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

    def documents(self) -> list[list[int]]:
        """Every document's token ids, in prompt order."""
        return [self.token_ids[start:end] for start, end in self.document_spans]


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
    """The prompt text before the documents (template head with the system text) and after the query (template tail).

    The head and tail are what two renderings with different user texts share, so no
    marker string (which a user could type) is needed.
    """
    if not (chat and tokenizer.has_chat_template):
        return (segments.system + DOCUMENT_END if segments.system else ""), segments.query
    system = [{"role": "system", "content": segments.system}] if segments.system else []
    first, second = (tokenizer.render_chat([*system, {"role": "user", "content": probe}]) for probe in _PROBES)
    head = first[: _common_prefix(first, second)]
    tail = first[len(first) - _common_prefix(first[::-1], second[::-1]) :]
    if first != head + _PROBES[0] + tail:
        raise ValueError("the chat template does not place the user text verbatim; send documents in a plain prompt instead")
    return head, segments.query + tail


def _common_prefix(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
