"""Raw byte backends: where encoded entries physically live (memory, files, Redis).

A backend raises on failure; ``ByteStore`` turns every failure into a miss or a skipped
write and counts it. Backends only move bytes: they know nothing of the codec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager

Buffer = bytes | memoryview
Range = tuple[int, int]


class BackendError(Exception):
    """A failure a backend classifies itself: ``kind`` for stats, ``outage`` if the backend is down."""

    def __init__(self, kind: str, message: str, outage: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.outage = outage


class Reader(ABC):
    """Byte-range access to one entry; all reads of one reader see the same version of it
    where the backend allows (memory and files do; Redis reads are per command)."""

    #: False when the reader was opened without checking that the entry exists (Redis):
    #: then an empty read means "absent" rather than "truncated"
    entry_known: bool = True

    @abstractmethod
    def read(self, ranges: Sequence[Range]) -> list[Buffer]:
        """Bytes of each [start, end) range; shorter (or empty) past the end of the entry."""


class BufferReader(Reader):
    """Reader over an immutable in-memory entry."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, ranges: Sequence[Range]) -> list[Buffer]:
        return [self._view[start:end] for start, end in ranges]


class Backend(ABC):
    """Stores opaque byte strings under keys."""

    #: human-readable location, used in logs
    name: str = "backend"
    #: after an outage, how long (s) operations on the failed route are skipped before retrying
    retry_s: float = 0.0

    @property
    def evictions(self) -> int:
        """Entries this backend evicted to stay within its budget."""
        return 0

    @abstractmethod
    def read_all(self, key: str) -> Buffer | None:
        """The whole entry, or None if absent."""

    @abstractmethod
    def open_reader(self, key: str) -> AbstractContextManager[Reader | None]:
        """A reader for byte ranges of the entry (None if it is known to be absent)."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Store the entry atomically (readers see the old or the new bytes, never a mix)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the key is present."""

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are present; backends with round trips override it to make it one."""
        return [self.exists(key) for key in keys]

    @abstractmethod
    def remove(self, key: str) -> None:
        """Delete the key if present."""

    def touch(self, keys: Sequence[str]) -> None:  # noqa: B027 - a backend that evicts by itself may ignore it
        """Mark present entries as used in this order (the last most recently); absent ones are skipped."""

    def fits(self, keys: Sequence[str], nbytes: int) -> bool:
        """Whether the entries `keys` and a new one of `nbytes` fit in the backend's budget together, so that
        writing it need not evict any of them. True where the backend keeps its own budget exactly (memory and
        files evict by the recency order ``touch`` sets) or cannot tell."""
        return True

    def route(self, key: str) -> str:
        """Which server/device serves the key: outages are tracked per route."""
        return self.name

    def classify(self, exc: Exception) -> tuple[str, bool] | None:
        """(error kind, is an outage) for an exception this backend raised, or None if unknown."""
        if isinstance(exc, BackendError):
            return exc.kind, exc.outage
        return None

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release resources."""
