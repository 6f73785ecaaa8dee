"""The storage interface shared by the audit log and the delivery queues (DESIGN §11).

One :class:`Store` holds the audit entries, the Merkle tree's stored node hashes, every signed
checkpoint with its cosignatures, the content of every policy bundle that was active, the durable
per-recipient queues, the expiry notices owed to senders and the durable subscriptions. Every
write goes through :meth:`Store.commit` with a :class:`Batch`: all of it becomes durable, or
none of it does. Nothing outside the ``broker/store/sqlite*.py`` modules may assume SQLite, so a
PostgreSQL store can take its place.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class QueueRow:
    """One message owed to one recipient."""

    recipient: str
    seq: int
    prec: int
    id: bytes
    sender: str
    envelope: bytes
    expires_ms: int
    queued_ms: int


@dataclasses.dataclass(frozen=True)
class QueueRecord:
    """One message owed to one recipient, without its envelope (``size`` bytes, in the
    store): what the queues hold in memory for a backlog."""

    recipient: str
    seq: int
    prec: int
    id: bytes
    sender: str
    size: int
    expires_ms: int
    queued_ms: int


@dataclasses.dataclass(frozen=True)
class Notice:
    """A sender is owed word that its message expired undelivered for ``recipient``."""

    sender: str
    id: bytes
    recipient: str


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint note and the cosignature lines received for it (by witness)."""

    size: int
    note: str
    cosignatures: dict[str, str]


@dataclasses.dataclass
class Batch:
    """Writes that become durable together, in one transaction.

    ``first_index`` is the tree size before ``entries``; ``leaves`` their leaf hashes, recorded
    with them; ``nodes`` the ``(level, index, hash)`` tree nodes they complete at the levels the
    log stores (:func:`broker.audit.merkle.is_stored_level`).
    """

    first_index: int = 0
    entries: list[bytes] = dataclasses.field(default_factory=list)
    leaves: list[bytes] = dataclasses.field(default_factory=list)
    nodes: list[tuple[int, int, bytes]] = dataclasses.field(default_factory=list)
    enqueue: list[QueueRow] = dataclasses.field(default_factory=list)
    dequeue: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    subscribe: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unsubscribe: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    bundles: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    checkpoints: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    cosignatures: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    notices: list[Notice] = dataclasses.field(default_factory=list)
    notices_sent: list[Notice] = dataclasses.field(default_factory=list)
    #: ``(node, status)``: ``suspended`` or ``revoked`` by an operator; ``active`` clears it.
    node_status: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    #: The policy high-water marks after this batch's ``bundles`` were activated
    #: (:meth:`policies.highwater.HighWater.to_bytes`); the last one is stored.
    marks: list[bytes] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return any(dataclasses.astuple(self)[1:])


class Store(Protocol):
    """Durable state of one broker. Reads see only committed data."""

    def commit(self, batch: Batch) -> None:
        """Make every write of ``batch`` durable, atomically; raise ``StorageError`` if not."""

    def snapshot(self) -> contextlib.AbstractContextManager[None]:
        """A context in which every read sees the same committed state."""

    def size(self) -> int:
        """The number of audit entries."""

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)``."""

    def iter_entries(self, start: int = 0, chunk: int = 4096) -> Iterator[tuple[int, bytes]]:
        """Every entry from ``start``, in order, read in chunks."""

    def iter_nodes(self, level: int) -> Iterator[tuple[int, bytes]]:
        """Every stored node hash at ``level``, by index (level 0: the recorded leaf hashes)."""

    def nodes(self, level: int, start: int, end: int) -> list[bytes]:
        """The stored node hashes ``[start, end)`` at ``level`` (level 0: the recorded leaf
        hashes), fewer if some are absent."""

    def checkpoints(self, since: int = 0) -> list[StoredCheckpoint]:
        """Every stored checkpoint of size ≥ ``since`` with its cosignatures, by size."""

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint of the largest size."""

    def last_cosigned_size(self, witness: str) -> int:
        """The largest checkpoint size ``witness`` cosigned (0 if none)."""

    def bundle(self, digest: bytes) -> bytes | None:
        """The content of a bundle that was active, by hash."""

    def active_bundle(self) -> bytes | None:
        """The hash of the bundle activated last (``None`` before the first activation)."""

    def bundle_hashes(self) -> list[bytes]:
        """Every stored bundle hash."""

    def high_water(self) -> bytes | None:
        """The policy high-water marks stored with the last activation (``None`` in a store
        written before they were stored)."""

    def queue_rows(self) -> list[QueueRow]:
        """Every queued message with its envelope (for inspection and tests)."""

    def queue_records(self) -> Iterator[QueueRecord]:
        """Every queued message without its envelope, by recipient and seq, read in chunks
        (for rebuilding the queues at start)."""

    def queued_envelopes(self, recipient: str, seqs: list[int]) -> dict[int, bytes]:
        """The envelopes of ``recipient``'s queued copies ``seqs``, by seq, read from the
        committed state; a seq that is not queued is absent."""

    def subscriptions(self) -> list[tuple[str, str]]:
        """Every durable ``(node, pattern)`` subscription."""

    def notices(self) -> list[Notice]:
        """Every expiry notice not yet sent to its sender."""

    def node_statuses(self) -> dict[str, str]:
        """Nodes an operator suspended or revoked, with that status."""

    def seq_high(self) -> int:
        """The highest delivery sequence number ever queued (0 if none)."""

    def disk_bytes(self) -> int:
        """Bytes the store occupies on disk (for the store size limit)."""

    def free_bytes(self) -> int:
        """Bytes free on the file system that holds the store."""

    def close(self) -> None:
        """Release the store's resources."""



class BatchWriter(Protocol):
    """Commits batches to a :class:`Store` away from the caller's thread (a writer process)."""

    async def commit(self, batch: Batch) -> bool:
        """Make ``batch`` durable like :meth:`Store.commit`; ``True`` if the caller was
        cancelled meanwhile (the outcome was awaited all the same). Raises ``StorageError``."""
