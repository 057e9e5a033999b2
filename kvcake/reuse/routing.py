"""Routing by mode name: which row of an engine's strategy table serves a request, and the classes
behind the document rows of `kvcake.modes` (the one table of mechanisms)."""

from __future__ import annotations

import importlib

from kvcake.modes import DOCUMENT_MECHANISMS
from kvcake.reuse.cake import Strategy
from kvcake.reuse.contract import PREFIX, ReuseChoice
from kvcake.reuse.documents import DocumentReuse

BLEND = "blend"
"""The document mode a warm call or a request with documents falls back to."""
DOCUMENT_MODES = tuple(DOCUMENT_MECHANISMS)


def document_strategies() -> dict[str, type[DocumentReuse]]:
    """Document mode name -> its class, imported from the path `DOCUMENT_MECHANISMS` names."""
    classes = {}
    for mode, path in DOCUMENT_MECHANISMS.items():
        module, _, name = path.rpartition(".")
        classes[mode] = getattr(importlib.import_module(module), name)
    return classes


def parse_mode(text: str) -> Strategy | str:
    """A prefix strategy, or a document mode by name; ValueError naming the allowed values."""
    if text in DOCUMENT_MODES:
        return text
    try:
        return Strategy.parse(text)
    except ValueError as error:
        raise ValueError(f"{error} (or {', '.join(DOCUMENT_MODES)})") from None


def route(mode: Strategy | str, tenant: str, ratio: float | None, has_documents: bool) -> tuple[str, ReuseChoice]:
    """The strategy-table row a request goes to, and what it asks of that strategy.

    A prefix strategy, or a prompt without documents, goes to the prefix row; a document mode's
    prompt with documents to that mode's row, which takes the exact prefix before them with Cake.
    """
    if mode not in DOCUMENT_MODES:
        return PREFIX, ReuseChoice(tenant, mode)
    choice = ReuseChoice(tenant, Strategy("cake"), ratio)
    return (mode if has_documents else PREFIX), choice


def document_mode(requested: str | None, default: str) -> str:
    """The document mode a call with documents uses (a request's blend, a warm call's stored layout): the
    `requested` mode if it is a document mode, else the engine's `default` if it is one, else blend."""
    for candidate in (requested, default):
        if candidate in DOCUMENT_MODES:
            return candidate
    return BLEND
