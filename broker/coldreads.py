"""Cold copies read back from the store, with a per-node backoff when a read fails.

A recipient's queue keeps envelopes in memory up to a budget; beyond it a queued copy is *cold*:
only its row is in memory and the envelope is read from the store when the copy is sent
(:mod:`broker.delivery`). When that read fails, the copies go back to pending and the node is
not pumped again until a retry, 0.1 s later, doubling to 30 s while reads keep failing: a
failing disk is not hammered once per ack, and nothing is dropped (a copy stays owed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from broker.errors import StorageError

log = structlog.get_logger("broker.hub")

#: Backoff of a node's sending after its queued envelopes could not be read.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 30.0


class ColdReads:
    """Reads of cold copies for the hub, and the retry schedule of nodes whose read failed."""

    def __init__(self, read: Callable[[str, list[int]], dict[int, bytes]],
                 pump: Callable[[str], None]) -> None:
        #: The store's ``queued_envelopes(node, seqs)``: envelopes by sequence number.
        self._read = read
        #: Called with the node when its retry is due (the hub's pump).
        self._pump = pump
        #: Nodes whose cold copies could not be read: seconds until the next try (doubling).
        self._delay_s: dict[str, float] = {}
        #: Nodes with a retry scheduled: not pumped meanwhile.
        self._due: set[str] = set()

    def waiting(self, node: str) -> bool:
        """Whether ``node`` waits for a retry (its sending is paused until then)."""
        return node in self._due

    def read(self, node: str, seqs: list[int]) -> dict[int, bytes] | None:
        """The envelopes of ``node``'s cold copies; ``None`` if the read failed (logged; call
        :meth:`retry_later`). A copy missing from the store is logged and left out (never
        dropped: it stays owed)."""
        try:
            found = self._read(node, seqs)
        except StorageError as exc:
            log.error("queued_envelopes_unreadable", node=node, count=len(seqs),
                      reason=exc.reason, retry_in_s=self._delay_s.get(node, RETRY_FIRST_S))
            return None
        self._delay_s.pop(node, None)
        if len(found) != len(seqs):
            missing = sorted(set(seqs) - set(found))
            log.error("queued_envelopes_missing", node=node, seqs=missing[:16],
                      count=len(missing), reason="queued in memory but not in the store")
        return found

    def retry_later(self, node: str) -> None:
        """Pump ``node`` again after its backoff, which doubles until a read succeeds."""
        delay = self._delay_s.get(node, RETRY_FIRST_S)
        self._delay_s[node] = min(2 * delay, RETRY_MAX_S)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next pump tries again
        self._due.add(node)
        loop.call_later(delay, self._retry, node)

    def _retry(self, node: str) -> None:
        self._due.discard(node)
        self._pump(node)
