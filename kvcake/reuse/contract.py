"""The contract every reuse strategy keeps, and the reports it gives.

A strategy is one way to obtain a prompt's KV: the prefix strategies (compute, load,
Cake, split:M; `kvcake.reuse.prefix`) and the document strategies (blend, tune;
`kvcake.reuse`). Each has two sides, in the style of vLLM's KV connector:

- `plan(prompt, choice)` says what is stored for this prompt and what the strategy will
  load or compute; it reads the store's index, moves no KV;
- `fill(plan, cache, prefetched)` fills an empty request cache from that plan and
  reports what it did (`Filled`). It is a generator that pauses (a bare ``yield``)
  after each unit of work, so a scheduler can interleave other requests' work, and
  yields `WAITING` instead while it waits for chunks another request is computing (a
  scheduler then runs others first); `drain` runs one without pausing. A scheduler
  resumes it with None, or with `ALONE` when no other request waits for the compute
  between its units: the next unit may then be a longer pass. Before a computation of
  more than one pass it yields `PACE`, a question rather than a pause, which its driver
  answers at once the same way.

`prefetch(prompt, choice)` hands a loader of the stored prefix to a request that waits
its turn (or None); it reads no more of the store's index than that needs. A
strategy never fails a request for its store: a miss, a corrupt entry or a store that
is down makes it compute those tokens, and its report says so.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

import torch

from kvcake.model import KVCache
from kvcake.model.segments import PromptLayout
from kvcake.reuse.prefetch import PrefixPrefetch
from kvcake.reuse.cake import PrefixReport, Strategy

Plan = TypeVar("Plan")


class Alone:
    """What a scheduler sends to a paused fill when no other request waits for its units (none is decoding): the
    fill may compute its next pass in `ALONE_PASS_TOKENS`. Longer passes read each layer's weights fewer times; while
    another request decodes, a pass is the configured one, so its next token waits for at most one short unit."""

    def __repr__(self) -> str:
        return "ALONE"


ALONE = Alone()


class Pace:
    """What a fill yields before a computation of more than one pass: a question, not a pause (no work was done).
    Its driver answers at once (``send``) with `ALONE` when no other request waits for the compute, else None; the
    answer sizes the first pass, as the answers to later pauses size the passes after them."""

    def __repr__(self) -> str:
        return "PACE"


PACE = Pace()

ALONE_PASS_TOKENS = 2048
"""Tokens per prefill pass while a request runs alone (rounded down to a multiple of the configured pass). Measured
on 2 AVX-512 cores, smollm2-135m (`docs/design.md`): against 256-token passes a 2k prefill's TTFT fell 6-8% and a 6k
one's 11% in both dtypes; passes of 3k and 6k were slower than 2k (their activations leave the caches)."""

PREFIX = "prefix"
"""The prefix row of an engine's strategy table (the document rows are named in `kvcake.reuse.routing`)."""


@dataclass(frozen=True)
class ReuseChoice:
    """What a request asked of reuse: its tenant, how to take its exact prefix, and (documents) a ratio.

    `ratio` None means the strategy's default (blend: `blend_ratio`; tune: `tune_ratio`)."""

    tenant: str
    prefix: Strategy = Strategy("cake")
    ratio: float | None = None


@dataclass
class DocumentReport:
    """What a blended prefill (blend, tune) did; rides on the request's metrics."""

    ratio: float = 0.0
    mode: str = "blend"
    check_layers: list[int] = field(default_factory=list)
    """The layers where tokens were selected (none at ratio 0 or 1; none for tune, whose stored order selects, or for
    `probe`, which selects before the first layer)."""
    selection: str = ""
    """How the blend ranked the tokens it recomputes (`blend_selection`), and how it corrected the others."""
    correction: str = ""
    documents: int = 0
    documents_stored: int = 0
    documents_computed: int = 0
    document_tokens: int = 0
    tokens_recomputed: int = 0
    tokens_reused: int = 0
    tokens_loaded: int = 0
    kept_per_check: list[int] = field(default_factory=list)
    """Document tokens kept at each selection: one per check layer, or one for `probe`'s selection before the first layer."""
    tokens_per_document: list[int] = field(default_factory=list)
    """Document tokens per document in prompt order, and how many of them were recomputed (where the budget went;
    for tune, its top-scored tokens and its correction sample)."""
    recomputed_per_document: list[int] = field(default_factory=list)
    bytes_loaded: int = 0
    load_s: float = 0.0
    load_wait_s: float = 0.0
    compute_s: float = 0.0
    compute_share: float = 1.0
    """Token-layers computed over those of a full prefill of the tokens after the exact prefix."""
    fallback: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Filled:
    """A filled cache's result: the last prompt token's logits, how the exact prefix was
    obtained, and (document strategies) how the documents were."""

    logits: torch.Tensor
    prefix: PrefixReport
    documents: DocumentReport | None = None

    @property
    def tokens_loaded(self) -> int:
        return self.prefix.tokens_loaded + (self.documents.tokens_loaded if self.documents else 0)


class Reuse(Protocol[Plan]):
    """One reuse strategy (see the module docstring)."""

    def plan(self, prompt: PromptLayout, choice: ReuseChoice) -> Plan: ...

    def prefetch(self, prompt: PromptLayout, choice: ReuseChoice) -> PrefixPrefetch | None: ...

    def fill(self, plan: Plan, cache: KVCache, prefetched: PrefixPrefetch | None = None) -> Generator[Pace | None, Alone | None, Filled]: ...
