"""The embedded store: one SQLite file in the broker's data directory (WAL, ``synchronous=FULL``).

SQLite gives atomic, durable transactions (torn writes are its problem); this module maps the
:class:`~broker.store.base.Store` interface onto tables. Writes use one connection, serialised
by a lock (the audit log commits small batches on the event loop's thread and large ones in
its worker thread); reads use a second connection, which in WAL mode sees the last committed
transaction and never blocks the writer. Every SQLite or OS failure is mapped to
:class:`~broker.errors.StorageError` here. The tables, and the upgrade of a store written by an
earlier version, are in :mod:`broker.store.sqlite_schema`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from broker.errors import StorageError
from broker.store.base import Batch, Notice, QueueRecord, QueueRow, StoredCheckpoint
from broker.store.sqlite_files import FILE_NAME as FILE_NAME
from broker.store.sqlite_files import backup_store as backup_store
from broker.store.sqlite_files import connect_read_only, is_broker_store, storage_error
from broker.store.sqlite_schema import SCHEMA_VERSION as SCHEMA_VERSION
from broker.store.sqlite_schema import prepare, stored_version
from broker.store.sqlite_write import commit_batch

#: Sequence numbers per query when reading queued envelopes (SQLite bounds host parameters).
_SEQS_PER_QUERY = 500


class SqliteStore:
    """The :class:`~broker.store.base.Store` on one SQLite file."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """Open (creating or upgrading if need be) the store at ``path``; with ``read_only``,
        see :meth:`open_read_only`."""
        self.path = path
        self._write_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._queue_reader: sqlite3.Connection | None = None
        if read_only:
            self._reader = open_reader(path)
            return
        try:
            # Another program's database is refused before any read-write connection.
            is_store = is_broker_store(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _connect(path)
            if not is_store:
                # A new store is switched to WAL while its file is still empty (the switch
                # is a rollback-journal transaction that records an empty database), then
                # created in one WAL transaction: a crash at any point leaves an empty file or
                # database, or a whole store, never a hot journal of a non-empty one.
                _use_wal(self._writer)
            # Creates, upgrades (version 2) or refuses untouched (any other version, or a
            # database of something else); only then is a store that is not yet in WAL mode
            # (a copy made with other tools) switched.
            prepare(self._writer, path)
            _use_wal(self._writer)
            self._reader = _connect(path)
        except BaseException as exc:
            self.close()  # a store refused or failing to open is not held open
            if isinstance(exc, (sqlite3.Error, OSError)):
                raise storage_error(f"cannot open the store {path}", exc) from exc
            raise

    @classmethod
    def in_dir(cls, data_dir: Path, *, read_only: bool = False) -> SqliteStore:
        """The store of a broker whose data directory is ``data_dir``."""
        return cls(data_dir / FILE_NAME, read_only=read_only)

    @classmethod
    def open_read_only(cls, path: Path) -> SqliteStore:
        """The store at ``path`` for reading only: an export or an inspection, typically of a
        running broker's store. The store file is never created, upgraded, cleaned or written
        (SQLite refuses any write on the connection); a missing file or another schema version
        is refused. :meth:`commit` raises ``StorageError``. WAL mode: when the broker is not
        running, SQLite creates the ``-shm`` and ``-wal`` companions, so the directory must be
        writable (read a ``coalition broker backup`` copy otherwise); another program's
        database is refused before, with nothing created next to it."""
        return cls(path, read_only=True)

    # --- writes -------------------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Write the whole batch in one durable transaction, or nothing."""
        with self._write_lock:
            if self._writer is None:
                raise StorageError(f"{self.path} was opened read-only")
            commit_batch(self._writer, batch)

    # --- reads --------------------------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (a WAL read transaction), however long they
        take while the broker keeps writing: an export is then self-consistent."""
        try:
            self._reader.execute("BEGIN")
        except sqlite3.Error as exc:
            raise storage_error("cannot start a read snapshot", exc) from exc
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._reader.execute("COMMIT")

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._reader.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error("read failed", exc) from exc

    def size(self) -> int:
        row = self._query("SELECT max(idx) FROM entries")[0]
        return 0 if row[0] is None else int(row[0]) + 1

    def entries(self, start: int, end: int) -> list[bytes]:
        rows = self._query("SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? "
                           "ORDER BY idx", (start, end))
        return [bytes(data) for _, data in rows]

    def iter_entries(self, start: int = 0, chunk: int = 4096) -> Iterator[tuple[int, bytes]]:
        while True:
            rows = self._query("SELECT idx, data FROM entries WHERE idx >= ? ORDER BY idx "
                               "LIMIT ?", (start, chunk))
            for idx, data in rows:
                yield int(idx), bytes(data)
            if len(rows) < chunk:
                return
            start = int(rows[-1][0]) + 1

    def iter_nodes(self, level: int) -> Iterator[tuple[int, bytes]]:
        select, args = _nodes_at(level)
        start = 0
        while True:
            rows = self._query(f"{select} idx >= ? ORDER BY idx LIMIT 4096", (*args, start))
            for idx, digest in rows:
                yield int(idx), _blob(digest)
            if len(rows) < 4096:
                return
            start = int(rows[-1][0]) + 1

    def nodes(self, level: int, start: int, end: int) -> list[bytes]:
        select, args = _nodes_at(level)
        rows = self._query(f"{select} idx >= ? AND idx < ? ORDER BY idx", (*args, start, end))
        return [_blob(digest) for _, digest in rows]

    def checkpoints(self, since: int = 0) -> list[StoredCheckpoint]:
        cosigs: dict[int, dict[str, str]] = {}
        for size, witness, line in self._query(
                "SELECT size, witness, line FROM cosignatures WHERE size >= ?", (since,)):
            cosigs.setdefault(int(size), {})[str(witness)] = str(line)
        rows = self._query("SELECT size, note FROM checkpoints WHERE size >= ? ORDER BY size",
                           (since,))
        return [StoredCheckpoint(int(size), str(note), cosigs.get(int(size), {}))
                for size, note in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        row = self._query("SELECT max(size) FROM checkpoints")[0]
        if row[0] is None:
            return None
        found = self.checkpoints(int(row[0]))
        return found[0] if found else None

    def last_cosigned_size(self, witness: str) -> int:
        row = self._query("SELECT max(size) FROM cosignatures WHERE witness = ?", (witness,))[0]
        return 0 if row[0] is None else int(row[0])

    def bundle(self, digest: bytes) -> bytes | None:
        rows = self._query("SELECT content FROM bundles WHERE hash = ?", (digest,))
        return bytes(rows[0][0]) if rows else None

    def bundle_hashes(self) -> list[bytes]:
        return [bytes(h) for (h,) in self._query("SELECT hash FROM bundles ORDER BY hash")]

    def queue_rows(self) -> list[QueueRow]:
        rows = self._query("SELECT q.recipient, q.seq, q.prec, q.msg, m.id, m.sender, m.envelope, "
                           "q.expires_ms, q.queued_ms FROM queue AS q LEFT JOIN messages AS m "
                           "ON m.mid = q.msg ORDER BY q.recipient, q.seq")
        out = []
        for r, s, p, mid, i, f, e, x, q in rows:
            if e is None:  # only damage does this; a copy must not vanish without a word
                raise StorageError(f"queued message ({r}, {s}) has no envelope (message {mid} "
                                   "is missing from the store)")
            out.append(QueueRow(str(r), int(s), int(p), bytes(i), str(f), bytes(e), int(x),
                                int(q)))
        return out

    def queue_records(self, chunk: int = 4096) -> Iterator[QueueRecord]:
        # In chunks (keyset on the queue's primary key), so that a large backlog is never
        # all in memory twice, as rows and as the queues built from them.
        after: tuple[str, int] = ("", 0)
        while True:
            rows = self._query(
                "SELECT q.recipient, q.seq, q.prec, q.msg, m.id, m.sender, length(m.envelope), "
                "q.expires_ms, q.queued_ms FROM queue AS q LEFT JOIN messages AS m "
                "ON m.mid = q.msg WHERE (q.recipient, q.seq) > (?, ?) "
                "ORDER BY q.recipient, q.seq LIMIT ?", (*after, chunk))
            for r, s, p, mid, i, f, n, x, q in rows:
                if n is None:  # only damage does this; a copy must not vanish without a word
                    raise StorageError(f"queued message ({r}, {s}) has no envelope (message "
                                       f"{mid} is missing from the store)")
                yield QueueRecord(sys.intern(r), int(s), int(p), bytes(i), sys.intern(f),
                                  int(n), int(x), int(q))
            if len(rows) < chunk:
                return
            after = (str(rows[-1][0]), int(rows[-1][1]))

    def queued_envelopes(self, recipient: str, seqs: list[int]) -> dict[int, bytes]:
        # Its own connection: the reader may be inside a long snapshot (an export), which
        # would not see copies committed since it began.
        if self._queue_reader is None:
            try:
                self._queue_reader = connect_read_only(self.path)
            except sqlite3.Error as exc:
                raise storage_error("cannot open the store to read queued envelopes",
                                     exc) from exc
        out: dict[int, bytes] = {}
        try:
            for start in range(0, len(seqs), _SEQS_PER_QUERY):
                chunk = seqs[start:start + _SEQS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                out.update(self._queue_reader.execute(
                    "SELECT q.seq, m.envelope FROM queue AS q JOIN messages AS m "
                    f"ON m.mid = q.msg WHERE q.recipient = ? AND q.seq IN ({marks})",
                    (recipient, *chunk)).fetchall())
        except sqlite3.Error as exc:
            raise storage_error("read of queued envelopes failed", exc) from exc
        return out

    def subscriptions(self) -> list[tuple[str, str]]:
        return [(str(n), str(p)) for n, p in
                self._query("SELECT node, pattern FROM subscriptions ORDER BY node, pattern")]

    def notices(self) -> list[Notice]:
        return [Notice(str(s), bytes(i), str(r)) for s, i, r in
                self._query("SELECT sender, id, recipient FROM notices ORDER BY sender")]

    def seq_high(self) -> int:
        rows = self._query("SELECT value FROM meta WHERE key = 'seq_high'")
        return int(rows[0][0]) if rows else 0

    def active_bundle(self) -> bytes | None:
        rows = self._query("SELECT value FROM meta WHERE key = 'active_bundle'")
        return bytes.fromhex(rows[0][0]) if rows else None

    def high_water(self) -> bytes | None:
        rows = self._query("SELECT value FROM meta WHERE key = 'high_water'")
        if not rows:
            return None
        try:
            return base64.b64decode(rows[0][0], validate=True)
        except (TypeError, ValueError) as exc:
            raise StorageError("the stored policy high-water marks are not base64: damaged "
                               "store") from exc

    def node_statuses(self) -> dict[str, str]:
        return {str(n): str(st) for n, st in
                self._query("SELECT node, status FROM node_status ORDER BY node")}

    def disk_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path.parent).free

    def close(self) -> None:
        # The writer last: the last connection to close checkpoints the WAL into the file and
        # removes the -wal and -shm, and only one that may write can (a stopped broker's store
        # is then one file, as docs/operations.md promises).
        for conn in (getattr(self, "_queue_reader", None), getattr(self, "_reader", None),
                     getattr(self, "_writer", None)):
            if conn is not None:
                conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    """A connection for writing, to a file :func:`_inspect` found new or a broker store. Journal
    mode is left as the file has it: switching to WAL rewrites the file's header, so it is done
    (:func:`_use_wal`) only to an empty file or a broker store, never to a database of
    something else opened by mistake."""
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one transaction.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    # Persistent in the file: a no-op for every open after the store's creation.
    conn.execute("PRAGMA journal_mode=WAL")


def open_reader(path: Path) -> sqlite3.Connection:
    """A connection to the existing store at ``path`` (this schema version) that cannot write
    it, creating no file next to it when it can be helped (see the comment)."""
    # Decided first without a mode=ro connection, which creates the -shm and -wal of a WAL
    # database that nobody has open (kept for the export itself: immutable=1 would not see
    # a running broker's commits, or its checkpoints, safely).
    if not is_broker_store(path) and path.exists():
        raise StorageError(f"{path} is not a broker store (no schema version)")
    try:
        conn = connect_read_only(path)
    except sqlite3.Error as exc:
        hint = (" (SQLite needs write access to the directory for the store's -shm file; "
                "read a `coalition broker backup` copy instead)"
                if path.exists() and not os.access(path.parent, os.W_OK) else "")
        raise storage_error(f"cannot open the store {path} to read{hint}", exc) from exc
    return _with_our_schema(conn, path, "read")


def open_writer(path: Path) -> sqlite3.Connection:
    """A connection that commits batches to the existing store at ``path`` (see
    :func:`commit_batch`): for a writer in another process. The store must have been opened
    (created or upgraded) by :class:`SqliteStore` first; this one only checks the version."""
    if not is_broker_store(path):  # nothing is created, not even an empty file
        raise StorageError(f"{path} is not a broker store (no schema version)")
    try:
        conn = _connect(path)
    except sqlite3.Error as exc:
        raise storage_error(f"cannot open the store {path} to write", exc) from exc
    conn = _with_our_schema(conn, path, "write")
    try:
        _use_wal(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise storage_error(f"cannot open the store {path} to write", exc) from exc
    return conn


def _with_our_schema(conn: sqlite3.Connection, path: Path, to: str) -> sqlite3.Connection:
    """``conn`` if the store has this version's schema; else close it and raise."""
    try:
        version = stored_version(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise storage_error(f"cannot open the store {path} to {to}", exc) from exc
    if version != str(SCHEMA_VERSION):
        conn.close()
        raise StorageError(f"{path} is not a broker store (no schema version)"
                           if version is None else
                           f"{path} has schema version {version}; this broker {to}s "
                           f"version {SCHEMA_VERSION}")
    return conn


def _blob(value: object) -> bytes:
    """A stored hash as bytes; anything but a blob (a damaged or hand-edited row) as ``b""``,
    which matches no hash: the caller reports the row as damaged instead of failing on it."""
    return value if type(value) is bytes else b""


def _nodes_at(level: int) -> tuple[str, tuple[int, ...]]:
    """The start of a query for ``(idx, hash)`` of the tree nodes at ``level``, to complete
    with conditions on ``idx``: level 0 is the leaf hashes recorded in the entry rows."""
    if level == 0:
        return "SELECT idx, leaf FROM entries WHERE", ()
    return "SELECT idx, hash FROM nodes WHERE level = ? AND", (level,)
