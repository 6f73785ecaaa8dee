"""The SQL of ``coalition broker repair-tree`` (:mod:`broker.audit.repair`): one transaction on a
stopped broker's store that reads its audit entries with their recorded leaf hashes, its stored
tree nodes and its last checkpoint, and may rewrite the derived part (the ``leaf`` column and the
``nodes`` table), all or nothing.

Its own connection to the store's file (the store's writer connection is private to
:class:`~broker.store.sqlite.SqliteStore`): SQLite's file lock serialises it with any other
writer. A repair takes the write lock before its first read (``BEGIN IMMEDIATE``), so what it
checks is what it rewrites; a dry run reads one snapshot on a read-only connection. Nothing is
committed unless :meth:`TreeRows.commit` is called: leaving the context rolls back. Every SQLite
or OS failure is mapped to :class:`~broker.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from broker.errors import StorageError
from broker.store.base import StoredCheckpoint
from broker.store.sqlite import open_reader, open_writer
from broker.store.sqlite_files import storage_error

#: ``(idx, recorded leaf hash, data)`` of an entry row, as stored: a hand edit may have left
#: another type than a blob in ``leaf`` or ``data``, which the caller judges.
EntryRow = tuple[int, object, object]


class TreeRows:
    """The audit tree's rows inside one transaction of :func:`tree_transaction`."""

    def __init__(self, conn: sqlite3.Connection, *, writable: bool) -> None:
        """``conn`` is inside its transaction; ``writable``: it holds the write lock."""
        self._conn = conn
        self._writable = writable

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error("read failed", exc) from exc

    def _write(self, sql: str, rows: Sequence[tuple[object, ...]] = ((),)) -> None:
        if not self._writable:
            raise StorageError("the repair's transaction was opened to read only")
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise storage_error("the repair's write failed", exc) from exc

    # --- reads --------------------------------------------------------------------------

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The checkpoint of the largest size (without its cosignatures, which the repair does
        not need), ``None`` if none."""
        rows = self._query("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1")
        if not rows:
            return None
        size, note = rows[0]
        return StoredCheckpoint(int(size), str(note), {})

    def entry_chunks(self, chunk: int) -> Iterator[list[EntryRow]]:
        """Every entry row by index, ``chunk`` rows at a time (each chunk read whole, so the
        caller may write between chunks)."""
        after: int | None = None
        while True:
            where, args = _after(after)
            rows = self._query(f"SELECT idx, leaf, data FROM entries {where} ORDER BY idx "
                               "LIMIT ?", (*args, chunk))
            if rows:
                yield [(int(idx), leaf, data) for idx, leaf, data in rows]
            if len(rows) < chunk:
                return
            after = int(rows[-1][0])

    def node_levels(self) -> list[int]:
        """Every level that has a stored node row with integer keys."""
        return [int(level) for (level,) in self._query(
            "SELECT DISTINCT level FROM nodes WHERE typeof(level) = 'integer' ORDER BY level")]

    def iter_nodes(self, level: int, chunk: int = 4096) -> Iterator[tuple[int, object]]:
        """``(idx, hash)`` of every node row of ``level`` with an integer index, by index."""
        after: int | None = None
        while True:
            where, args = _after(after)
            rows = self._query(f"SELECT idx, hash FROM nodes {where} AND level = ? AND "
                               "typeof(idx) = 'integer' ORDER BY idx LIMIT ?",
                               (*args, level, chunk))
            for idx, digest in rows:
                yield int(idx), digest
            if len(rows) < chunk:
                return
            after = int(rows[-1][0])

    def odd_nodes(self) -> list[tuple[object, object]]:
        """``(level, idx)`` of the node rows whose keys are not integers (a hand edit): no log
        reads them, and the rewrite drops them."""
        return [(level, idx) for level, idx in self._query(
            "SELECT level, idx FROM nodes WHERE typeof(level) != 'integer' "
            "OR typeof(idx) != 'integer'")]

    # --- writes (a writable transaction only) -------------------------------------------

    def clear_nodes(self) -> None:
        """Delete every stored node (the rewrite then inserts the recomputed ones)."""
        self._write("DELETE FROM nodes")

    def write_leaves(self, leaves: Sequence[tuple[bytes, int]]) -> None:
        """Set the recorded leaf hash of each ``(leaf, idx)``."""
        self._write("UPDATE entries SET leaf = ? WHERE idx = ?", leaves)

    def write_nodes(self, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        """Insert ``(level, idx, hash)`` node rows."""
        self._write("INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", nodes)

    def commit(self) -> None:
        """Make the transaction's writes durable, all of them."""
        if not self._writable:
            raise StorageError("the repair's transaction was opened to read only")
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise storage_error("the repair's commit failed", exc) from exc


@contextlib.contextmanager
def tree_transaction(path: Path, *, write: bool) -> Iterator[TreeRows]:
    """A transaction on the (schema 4) store at ``path``: with ``write``, on a read-write
    connection holding the write lock from the start; else a read snapshot on a connection
    that cannot write. Rolled back on leaving unless :meth:`TreeRows.commit` was called."""
    conn = open_writer(path) if write else open_reader(path)
    try:
        with _transaction(conn, write=write) as rows:
            yield rows
    finally:
        conn.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[TreeRows]:
    """``conn`` (autocommit) inside one transaction, rolled back unless committed: the part a
    store that runs the repair on its own writer connection would share."""
    try:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    except sqlite3.Error as exc:
        raise storage_error("cannot start the repair's transaction", exc) from exc
    try:
        yield TreeRows(conn, writable=write)
    finally:
        # Whatever was not committed never was: the error that got here is the one to tell
        # (also when the connection itself failed, or was closed, which rolls back too).
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")


def _after(idx: int | None) -> tuple[str, tuple[int, ...]]:
    """The ``WHERE`` of a keyset read past ``idx`` (``None``: from the first row, which may
    have a negative index after a hand edit)."""
    return ("WHERE 1", ()) if idx is None else ("WHERE idx > ?", (idx,))
