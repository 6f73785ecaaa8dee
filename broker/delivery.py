"""Per-recipient delivery queue: precedence order, FIFO within a precedence, in-flight window.

Pure bookkeeping (no I/O): the hub pushes permitted messages, asks which to send next, and
records acks; on disconnect everything in flight goes back to pending for redelivery.
Items are ordered by ``(-precedence, seq)`` where ``seq`` is the recipient's enqueue counter,
so a FLASH message is never stuck behind a ROUTINE backlog.
"""

from __future__ import annotations

import dataclasses
import heapq


@dataclasses.dataclass(frozen=True, order=True)
class QueuedMessage:
    """One message owed to one recipient."""

    sort_key: tuple[int, int]
    seq: int = dataclasses.field(compare=False)
    message_id: bytes = dataclasses.field(compare=False)
    sender: str = dataclasses.field(compare=False)
    envelope: bytes = dataclasses.field(compare=False, repr=False)
    expires_ms: int = dataclasses.field(compare=False)


class RecipientQueue:
    """Messages owed to one node: pending (heap) and in flight (sent, not yet acked)."""

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._next_seq = 1
        self._pending: list[QueuedMessage] = []
        self._in_flight: dict[int, QueuedMessage] = {}

    def reserve_seq(self) -> int:
        """The sequence number of a message about to be queued (once its write is durable)."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def push(self, *, message_id: bytes, sender: str, envelope: bytes, prec: int,
             expires_ms: int, seq: int | None = None) -> QueuedMessage:
        """Queue a message under ``seq`` (reserved earlier, or restored from the store; a new
        one if ``None``); returns it."""
        if seq is None:
            seq = self.reserve_seq()
        elif seq >= self._next_seq:
            self._next_seq = seq + 1
        item = QueuedMessage((-prec, seq), seq, message_id, sender, envelope, expires_ms)
        heapq.heappush(self._pending, item)
        return item

    def take_sendable(self) -> list[QueuedMessage]:
        """Move as many pending messages in flight as the window allows, best first."""
        out = []
        while self._pending and len(self._in_flight) < self.window:
            item = heapq.heappop(self._pending)
            self._in_flight[item.seq] = item
            out.append(item)
        return out

    def ack(self, seqs: list[int] | tuple[int, ...]) -> list[QueuedMessage]:
        """Forget acknowledged messages; unknown sequence numbers are ignored."""
        return [item for seq in seqs if (item := self._in_flight.pop(seq, None)) is not None]

    def requeue_in_flight(self) -> None:
        """Connection lost: everything unacknowledged goes back to pending, in order."""
        for item in self._in_flight.values():
            heapq.heappush(self._pending, item)
        self._in_flight.clear()

    def is_in_flight(self, seq: int) -> bool:
        return seq in self._in_flight

    @property
    def depth(self) -> int:
        """Messages owed (pending and in flight)."""
        return len(self._pending) + len(self._in_flight)
