"""The ids of the messages a gateway's application has finished, kept across restarts.

The broker delivers at least once; a gateway drops a redelivery whose id it has seen, so the
application sees each message once. With a state directory the ids are kept in ``seen.bin``: an
append-only file of fixed-length records (message ids are 16 bytes, DESIGN §6), each append
flushed and fsynced before the caller acknowledges the message to the broker. A crash can leave
a torn last record; loading ignores it and cuts it off. When the file holds more than twice
``capacity`` records it is rewritten atomically with the ``capacity`` most recent ids.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import structlog

from broker.errors import StorageError
from clients.link import GatewayError
from clients.witness import write_atomically

log = structlog.get_logger("clients.dedup")

SEEN_FILE = "seen.bin"
#: Length of a message id (DESIGN §6: ``id`` is bin(16)); the file's record length.
ID_BYTES = 16


class StateWriteFailed(GatewayError):
    """The gateway could not make its local state durable; it must not acknowledge."""

    code = "state_write_failed"


class StateReadFailed(GatewayError):
    """The gateway's local state exists but cannot be read."""

    code = "state_read_failed"


class SeenIds:
    """The ``capacity`` most recently finished message ids, oldest first; ``directory=None``
    keeps them in memory only."""

    def __init__(self, directory: Path | None, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.path = None if directory is None else directory / SEEN_FILE
        self._ids: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._records = 0  # whole records in the file
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateWriteFailed(f"cannot create {directory}: {exc.strerror}") from exc
            self._load()

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._ids)

    def close(self) -> None:
        """Stop writing the file: ids added later are kept in memory only. A closed client's
        directory may belong to another client by then (:mod:`clients.statelock`); a finished
        id not written is at worst a message shown again, a stale write over the other client's
        file would lose its ids."""
        self.path = None

    def add_durably(self, ids: Iterable[bytes]) -> None:
        """Remember ``ids``; with a file, they are on disk (fsynced) when this returns.
        Raises :class:`StateWriteFailed` (and remembers nothing) if they cannot be written."""
        batch = list(ids)
        if any(len(message_id) != ID_BYTES for message_id in batch):
            raise ValueError(f"message ids are {ID_BYTES} bytes")
        if self.path is not None:
            self._append(b"".join(batch))
        for message_id in batch:
            self._remember(message_id)
        if self.path is not None and self._records > 2 * self.capacity:
            self._compact()

    # --- internals ----------------------------------------------------------------------

    def _remember(self, message_id: bytes) -> None:
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            # Created (durably, directory entry included) now, so appends need no such care.
            self._write_all(b"")
            return
        except OSError as exc:
            raise StateReadFailed(f"cannot read {self.path}: {exc.strerror}") from exc
        whole = len(data) - len(data) % ID_BYTES
        if whole != len(data):
            # A crash in the middle of an append: that id was never acknowledged, so the broker
            # will deliver its message again; dropping the partial record loses nothing.
            log.warning("seen_ids_torn_tail", path=str(self.path), dropped=len(data) - whole)
        for offset in range(0, whole, ID_BYTES):
            self._remember(data[offset:offset + ID_BYTES])
        self._records = whole // ID_BYTES
        if whole != len(data) or self._records > 2 * self.capacity:
            self._compact()

    def _append(self, data: bytes) -> None:
        """Write the records at the end of the whole ones, then fsync. Writing at a computed
        offset (and truncating after) also overwrites what an earlier failed append left."""
        assert self.path is not None
        end = self._records * ID_BYTES
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], end + written)
                os.ftruncate(fd, end + len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateWriteFailed(f"cannot record seen message ids in {self.path}: "
                                   f"{exc.strerror}") from exc
        self._records += len(data) // ID_BYTES

    def _compact(self) -> None:
        self._write_all(b"".join(self._ids))
        self._records = len(self._ids)

    def _write_all(self, data: bytes) -> None:
        assert self.path is not None
        try:
            write_atomically(self.path, data)
        except StorageError as exc:
            raise StateWriteFailed(exc.reason) from exc
