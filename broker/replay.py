"""Replay protection for envelopes (DESIGN §6), pure: time is a parameter.

An envelope is fresh when its ``ts`` is within ``skew_ms`` of now and its id was not seen within
the window. Ids are remembered for ``2 × skew`` (anything older is refused by the ``ts`` check
anyway), so memory is bounded by the window times the message rate, and by ``max_ids``.
"""

from __future__ import annotations

import collections


class ReplayGuard:
    """Remembers recently seen message ids."""

    def __init__(self, skew_ms: int = 5 * 60 * 1000, max_ids: int = 4_000_000) -> None:
        self.skew_ms = skew_ms
        self._max_ids = max_ids
        self._seen: dict[bytes, int] = {}
        self._order: collections.deque[tuple[int, bytes]] = collections.deque()

    def check(self, message_id: bytes, ts_ms: int, now_ms: int) -> str | None:
        """A reason the envelope is a replay, or ``None`` when fresh. Does not record it."""
        if abs(ts_ms - now_ms) > self.skew_ms:
            return f"ts is {abs(ts_ms - now_ms)} ms from broker time (allowed {self.skew_ms})"
        self._expire(now_ms)
        if message_id in self._seen:
            return "message id was already seen"
        return None

    def record(self, message_id: bytes, now_ms: int) -> None:
        """Remember an accepted id until it can no longer pass the ``ts`` check."""
        expiry = now_ms + 2 * self.skew_ms
        self._seen[message_id] = expiry
        self._order.append((expiry, message_id))
        while len(self._seen) > self._max_ids:
            _, oldest = self._order.popleft()
            self._seen.pop(oldest, None)

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now_ms: int) -> None:
        # Strictly older: at exactly now == expiry an envelope with ts = first_seen + skew still
        # passes the ts check, so its id must still be remembered.
        while self._order and self._order[0][0] < now_ms:
            _, message_id = self._order.popleft()
            self._seen.pop(message_id, None)
