"""Stop sequences on generated text: found across token boundaries, never returned.

Text arrives in pieces (one per token). Everything that can no longer be the start of
a stop sequence is released at once; only a tail that is a prefix of some stop
sequence is held back, so a stream lags the generation by at most the longest stop
sequence minus one character.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to release, whether a stop sequence matched: then generation ends)."""
        pending = self._held + text
        if not self.stops:
            return pending, False
        found = [index for index in (pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self._held = ""
            return pending[: min(found)], True
        keep = self._partial_suffix(pending)
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        """What was held back, once generation has ended without a match."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
