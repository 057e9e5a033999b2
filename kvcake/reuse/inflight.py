"""Keys of entries some request is computing right now, so identical work arriving at once is done once."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class InFlight:
    """Claimed keys: a claim holds until its owner has stored the entries, or will not (released)."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def any_of(self, keys: Iterable[str]) -> bool:
        with self._lock:
            return not self._keys.isdisjoint(keys)

    def claim_free(self, keys: Iterable[str]) -> list[str]:
        """Claim those of `keys` nobody holds; the ones claimed."""
        with self._lock:
            mine = [key for key in dict.fromkeys(keys) if key not in self._keys]
            self._keys.update(mine)
        return mine

    def claim_all(self, keys: Iterable[str]) -> bool:
        """Claim every one of `keys` if nobody holds any of them (else claim nothing)."""
        keys = set(keys)
        with self._lock:
            if not self._keys.isdisjoint(keys):
                return False
            self._keys.update(keys)
        return True

    def release(self, keys: Iterable[str]) -> None:
        with self._lock:
            self._keys.difference_update(keys)
