"""Is there room to accept more? The store-wide limits a publish is checked against.

The broker refuses a publish (``unavailable``, with the reason) rather than accept what it may
not be able to keep: a receipt is a promise. Two limits guard the store as a whole: its size on
disk and the free space left on its file system. Measuring costs a few system calls, so it is
done at most every ``every_s`` seconds and the answer reused in between.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from broker.errors import StorageError
from broker.store.base import Store


@dataclasses.dataclass(frozen=True)
class StoreLimits:
    """Refuse new messages when the store is this big, or the disk this full (0: no limit)."""

    max_store_bytes: int = 64 << 30
    min_free_bytes: int = 64 << 20


class StoreCapacity:
    """Checks a :class:`Store` against :class:`StoreLimits`, measuring at most every ``every_s``."""

    def __init__(self, store: Store, limits: StoreLimits, *, every_s: float = 0.25,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.limits = limits
        self.every_s = every_s
        self._monotonic = monotonic
        self._checked_at: float | None = None
        self._verdict: str | None = None

    def check(self) -> str | None:
        """Why the store cannot take more right now, or ``None`` if it can."""
        now = self._monotonic()
        if self._checked_at is None or now - self._checked_at >= self.every_s:
            self._verdict = self._measure()
            self._checked_at = now
        return self._verdict

    def _measure(self) -> str | None:
        limits = self.limits
        try:
            if limits.max_store_bytes:
                used = self.store.disk_bytes()
                if used >= limits.max_store_bytes:
                    return (f"the store is full: {used} bytes on disk, limit "
                            f"{limits.max_store_bytes} (limits.max_store_bytes)")
            if limits.min_free_bytes:
                free = self.store.free_bytes()
                if free < limits.min_free_bytes:
                    return (f"the disk is full: {free} bytes free, at least "
                            f"{limits.min_free_bytes} required (limits.min_free_disk_bytes)")
        except (OSError, StorageError) as exc:
            return f"cannot measure the store: {exc}"  # fail closed
        return None
