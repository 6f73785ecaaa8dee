"""Per-recipient delivery queue: precedence order, FIFO within a precedence, in-flight window,
TTL expiry and byte accounting.

Pure bookkeeping (no I/O, no clock): the hub pushes permitted messages, asks which to send next
and which have expired, and records acks; on disconnect everything in flight goes back to
pending for redelivery. Items are ordered by ``(-precedence, seq)`` where ``seq`` is the
recipient's enqueue counter, so a FLASH message is never stuck behind a ROUTINE backlog.

Removal from the middle of the heaps (an expired message, an ack) is lazy: the dictionaries
``_pending`` and ``_in_flight`` are the truth, heap entries whose seq is no longer there are
skipped when they surface. Every operation is O(log n) per message. The counts and the oldest
copy per precedence (metrics, the admin API) are kept as copies come and go, so that a scrape
of a broker with a large backlog does not walk it on the event loop.

Envelope bytes are kept in memory only up to ``memory_bytes`` per queue (the first copies
queued while the queue is short: those of a recipient that keeps up); beyond it a copy is
queued *cold*, ``envelope=None``, and whoever sends it reads the bytes from the store, where
every queued copy is durable anyway. A backlog then costs a small record per copy in memory,
not the envelope (docs/decisions.md, "Queued envelopes stay on disk").
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import sys


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One message owed to one recipient (slots: a backlog holds one per queued copy)."""

    sort_key: tuple[int, int]
    seq: int = dataclasses.field(compare=False)
    message_id: bytes = dataclasses.field(compare=False)
    sender: str = dataclasses.field(compare=False)
    #: ``None``: cold, the bytes are in the store only (read them to send the copy).
    envelope: bytes | None = dataclasses.field(compare=False, repr=False)
    size: int = dataclasses.field(compare=False)
    expires_ms: int = dataclasses.field(compare=False)
    queued_ms: int = dataclasses.field(compare=False, default=0)

    @property
    def prec(self) -> int:
        return -self.sort_key[0]


class RecipientQueue:
    """Messages owed to one node: pending (by precedence) and in flight (sent, not acked)."""

    def __init__(self, window: int = 64, *, first_seq: int = 1,
                 memory_bytes: int = 1 << 20) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if memory_bytes < 0:
            raise ValueError("memory_bytes must not be negative")
        self.window = window
        #: Envelope bytes this queue may hold in memory; copies beyond it are queued cold.
        self.memory_bytes = memory_bytes
        #: Envelope bytes held in memory now (hot copies owed).
        self.hot_bytes = 0
        #: Sequence numbers never repeat for a recipient, also across broker restarts (the
        #: hub starts new queues above the store's high-water mark): a late ack of an old
        #: delivery can then never acknowledge a different message.
        self._next_seq = first_seq
        # Heap of sort keys (-prec, seq), compared as plain tuples; may hold stale entries.
        self._order: list[tuple[int, int]] = []
        self._expiry: list[tuple[int, int]] = []  # heap of (expires_ms, seq); may hold stale
        self._pending: dict[int, QueuedMessage] = {}
        self._in_flight: dict[int, QueuedMessage] = {}
        self._reserved: dict[int, int] = {}  # seq -> bytes, for writes not yet durable
        self._reserved_bytes = 0  # their sum, kept as they come and go (checked per publish)
        #: Envelope bytes owed (pending and in flight).
        self.bytes = 0
        self._depth: dict[int, int] = {}  # copies owed per precedence
        # Per precedence, seqs in the order they were queued; may hold copies no longer owed
        # (dropped when they reach the front, or in one pass when they outnumber those owed).
        self._arrivals: dict[int, collections.deque[int]] = {}

    # --- intake ---------------------------------------------------------------------------

    def reserve_seq(self, size: int = 0) -> int:
        """The sequence number of a message about to be queued once its write is durable; its
        ``size`` counts against the byte limit until :meth:`push` or :meth:`cancel`."""
        seq = self._next_seq
        self._next_seq += 1
        self._reserved[seq] = size
        self._reserved_bytes += size
        return seq

    def cancel(self, seq: int) -> None:
        """The write of a reserved message failed: it will never be queued."""
        self._reserved_bytes -= self._reserved.pop(seq, 0)

    @property
    def committed_bytes(self) -> int:
        """Bytes owed plus bytes reserved for writes in progress: what a limit checks."""
        return self.bytes + self._reserved_bytes

    def push(self, *, message_id: bytes, sender: str, envelope: bytes | None, prec: int,
             expires_ms: int, seq: int | None = None, queued_ms: int = 0,
             size: int | None = None) -> QueuedMessage:
        """Queue a message under ``seq`` (reserved earlier, or restored from the store; a new
        one if ``None``); returns it. The envelope is kept in memory if the queue's
        ``memory_bytes`` allow; without it (``envelope=None``: restored from the store),
        ``size`` is its length and the copy is cold."""
        if seq is not None and (seq in self._pending or seq in self._in_flight):
            # Twice under one seq would count its bytes twice and could send it twice.
            raise ValueError(f"seq {seq} is already queued")
        if envelope is not None:
            size = len(envelope)
            if self.hot_bytes + size > self.memory_bytes:
                envelope = None
            else:
                self.hot_bytes += size
        elif size is None:
            raise ValueError("a cold copy needs its size")
        if seq is None:
            seq = self.reserve_seq()
        elif seq >= self._next_seq:
            self._next_seq = seq + 1
        self._reserved_bytes -= self._reserved.pop(seq, 0)
        # Interned: a backlog holds one sender name per copy, and there are few senders.
        item = QueuedMessage((-prec, seq), seq, message_id, sys.intern(sender), envelope, size,
                             expires_ms, queued_ms)
        self._pending[seq] = item
        heapq.heappush(self._order, item.sort_key)
        heapq.heappush(self._expiry, (expires_ms, seq))
        self.bytes += size
        self._depth[prec] = self._depth.get(prec, 0) + 1
        self._arrivals.setdefault(prec, collections.deque()).append(seq)
        return item

    # --- delivery -------------------------------------------------------------------------

    def take_sendable(self) -> list[QueuedMessage]:
        """Move as many pending messages in flight as the window allows, best first.

        Call :meth:`take_expired` first: this method does not look at the clock.
        """
        out = []
        while self._order and len(self._in_flight) < self.window:
            _, seq = heapq.heappop(self._order)
            item = self._pending.pop(seq, None)
            if item is None:
                continue  # expired (or already in flight) since it was pushed
            self._in_flight[item.seq] = item
            out.append(item)
        return out

    def ack(self, seqs: list[int] | tuple[int, ...]) -> list[QueuedMessage]:
        """Forget acknowledged messages; unknown sequence numbers are ignored."""
        done = [item for seq in seqs if (item := self._in_flight.pop(seq, None)) is not None]
        self._forget(done)
        self._compact_expiry()
        return done

    def _forget(self, items: list[QueuedMessage]) -> None:
        for item in items:
            self.bytes -= item.size
            if item.envelope is not None:
                self.hot_bytes -= item.size
            prec = item.prec
            left = self._depth[prec] = self._depth[prec] - 1
            arrivals = self._arrivals[prec]
            if len(arrivals) > 2 * left + 64:  # amortised O(1) per copy forgotten
                self._arrivals[prec] = collections.deque(
                    seq for seq in arrivals if self._owes(seq))

    def unsend(self, seqs: list[int]) -> None:
        """Copies taken to be sent that could not be (their envelopes could not be read) go
        back to pending, in order, as if never taken."""
        for seq in seqs:
            item = self._in_flight.pop(seq, None)
            if item is not None:
                self._pending[seq] = item
                heapq.heappush(self._order, item.sort_key)
                heapq.heappush(self._expiry, (item.expires_ms, seq))

    def requeue_in_flight(self) -> None:
        """Connection lost: everything unacknowledged goes back to pending, in order."""
        self.unsend(list(self._in_flight))

    # --- expiry ---------------------------------------------------------------------------

    def next_expiry(self) -> int | None:
        """When the earliest pending message expires (ms), if any is pending."""
        self._drop_stale_expiry()
        return self._expiry[0][0] if self._expiry else None

    def take_expired(self, now_ms: int) -> list[QueuedMessage]:
        """Remove and return the pending messages whose TTL has passed at ``now_ms``.

        A message in flight is not expired: it was handed to the recipient before its TTL and
        its ack may still come. If it comes back (disconnect), it is checked again.
        """
        out = []
        while self._expiry and self._expiry[0][0] <= now_ms:
            _, seq = heapq.heappop(self._expiry)
            item = self._pending.pop(seq, None)
            if item is not None:
                out.append(item)
        self._forget(out)
        if len(self._order) > 2 * len(self._pending) + 64:
            # Expired messages of an offline node would otherwise stay referenced by the
            # order heap (envelopes included) until the node comes back.
            self._order = [key for key in self._order if key[1] in self._pending]
            heapq.heapify(self._order)
        return out

    def _compact_expiry(self) -> None:
        # Acked copies leave their (expires_ms, seq) behind until the TTL passes: at high
        # throughput and long TTLs that would grow without bound, so drop them in one pass
        # once they outnumber the copies owed (amortised O(1) per ack).
        owed = len(self._pending) + len(self._in_flight)
        if len(self._expiry) > 2 * owed + 64:
            live = {seq: when for when, seq in self._expiry
                    if seq in self._pending or seq in self._in_flight}  # one per seq
            self._expiry = [(when, seq) for seq, when in live.items()]
            heapq.heapify(self._expiry)

    def _drop_stale_expiry(self) -> None:
        while self._expiry and self._expiry[0][1] not in self._pending:
            heapq.heappop(self._expiry)

    # --- state ----------------------------------------------------------------------------

    def is_in_flight(self, seq: int) -> bool:
        return seq in self._in_flight

    @property
    def depth(self) -> int:
        """Messages owed (pending and in flight)."""
        return len(self._pending) + len(self._in_flight)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def depth_by_precedence(self) -> dict[int, int]:
        """Messages owed per precedence (for metrics and the admin view); O(precedences)."""
        return {prec: count for prec, count in self._depth.items() if count}

    def oldest_by_precedence(self) -> dict[int, int]:
        """When the copy owed that was queued first was queued (ms), per precedence: the
        oldest, as copies are queued in time order. Amortised O(precedences)."""
        oldest: dict[int, int] = {}
        for prec, arrivals in self._arrivals.items():
            while arrivals and not self._owes(arrivals[0]):
                arrivals.popleft()
            if arrivals:
                seq = arrivals[0]
                oldest[prec] = (self._pending.get(seq) or self._in_flight[seq]).queued_ms
        return oldest

    def _owes(self, seq: int) -> bool:
        return seq in self._pending or seq in self._in_flight
