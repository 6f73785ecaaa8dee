"""Writing one :class:`~broker.store.base.Batch` to the SQLite store: one transaction, few
statements.

The busy tables (audit entries, tree nodes, queued messages and their queue rows, acked queue
rows) are written with many rows per statement, not one ``executemany`` step per row. Python's
``sqlite3`` releases the GIL around every ``sqlite3_step``, so a commit in the audit log's
worker thread (or anywhere beside a busy event loop) re-takes the GIL once per step; each
re-take may wait for the loop's thread to give it up (up to ``sys.getswitchinterval()``, 5 ms by
default). With a row per step a 1,000-entry commit beside the loop took ~90 ms in the
throughput benchmark where the same batch alone takes ~25 ms (16 ms now); the broker's rate did
not move, as the loop's own Python is its ceiling (docs/performance.md, session 17). Rows per
statement are powers of two up to :data:`ROWS_PER_STATEMENT`, so a handful of SQL texts serve
every batch size and stay in the connection's statement cache.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from collections.abc import Iterable, Sequence

from broker.store.base import Batch, QueueRow
from broker.store.sqlite_files import storage_error

#: Most rows in one statement (fewer if the connection's host-parameter limit, 32,766 by
#: default since SQLite 3.32 and 999 before, is lower: see :func:`_rows_per_statement`).
ROWS_PER_STATEMENT = 256


def commit_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    """Write the whole batch on ``conn`` in one durable transaction, or nothing; SQLite and
    OS failures are raised as ``StorageError``."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        _write_batch(conn, batch)
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            # The original error is the one to report.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if isinstance(exc, (sqlite3.Error, OSError)):
            raise storage_error("commit failed", exc) from exc
        raise


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[object]]) -> None:
    """``head`` (``INSERT … INTO table [(columns)]``) for every row of ``rows``, in as few
    statements as :func:`_chunks` allows; all rows have the same width."""
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ", ".join("?" * width) + ")"
    for start, count in _chunks(len(rows), _rows_per_statement(conn, width)):
        conn.execute(f"{head} VALUES {', '.join([one] * count)}",
                     [value for row in rows[start:start + count] for value in row])


def delete_queued(conn: sqlite3.Connection, keys: Iterable[tuple[str, int]]) -> None:
    """Delete the queue rows ``(recipient, seq)``: one ``seq IN (…)`` per recipient and chunk,
    which SQLite answers from the primary key (a row-value ``IN (VALUES …)`` would scan)."""
    by_recipient: dict[str, list[int]] = {}
    for recipient, seq in keys:
        by_recipient.setdefault(recipient, []).append(seq)
    most = _rows_per_statement(conn, 1)
    for recipient, seqs in by_recipient.items():
        for start, count in _chunks(len(seqs), most):
            conn.execute("DELETE FROM queue WHERE recipient = ? AND seq IN "
                         f"({', '.join('?' * count)})", [recipient, *seqs[start:start + count]])


def _chunks(total: int, most: int) -> Iterable[tuple[int, int]]:
    """``(start, count)`` pieces covering ``range(total)``; each count a power of two of at
    most ``most``."""
    start = 0
    while start < total:
        count = 1 << (min(most, total - start).bit_length() - 1)
        yield start, count
        start += count


def _rows_per_statement(conn: sqlite3.Connection, width: int) -> int:
    """Rows of ``width`` values per statement within the connection's parameter limit."""
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    rows = ROWS_PER_STATEMENT
    while rows > 1 and rows * width + 1 > limit:  # +1: the recipient of a delete
        rows //= 2
    return rows


def _write_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    insert_rows(conn, "INSERT INTO entries (idx, data, leaf)",
                [(batch.first_index + i, data, leaf) for i, (data, leaf) in
                 enumerate(zip(batch.entries, batch.leaves, strict=True))])
    insert_rows(conn, "INSERT INTO nodes", batch.nodes)
    if batch.enqueue:
        _enqueue(conn, batch.enqueue)
        conn.execute("INSERT INTO meta VALUES ('seq_high', ?) ON CONFLICT (key) DO UPDATE "
                     "SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS "
                     "INTEGER))", (str(max(r.seq for r in batch.enqueue)),))
    delete_queued(conn, batch.dequeue)
    # The rest is rare (operators, checkpoints, expiry): a row per step is fine.
    conn.executemany("INSERT OR IGNORE INTO subscriptions VALUES (?, ?)", batch.subscribe)
    conn.executemany("DELETE FROM subscriptions WHERE node = ? AND pattern = ?",
                     batch.unsubscribe)
    conn.executemany("INSERT OR IGNORE INTO bundles VALUES (?, ?)", batch.bundles)
    if batch.bundles:  # a bundle is written when it is activated: the last one is in force
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('active_bundle', ?)",
                     (batch.bundles[-1][0].hex(),))
    if batch.marks:  # the last includes every earlier one (HighWater.merge)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('high_water', ?)",
                     (base64.b64encode(batch.marks[-1]).decode(),))
    conn.executemany("INSERT INTO checkpoints VALUES (?, ?)", batch.checkpoints)
    conn.executemany("INSERT OR REPLACE INTO cosignatures VALUES (?, ?, ?)",
                     batch.cosignatures)
    conn.executemany("INSERT OR IGNORE INTO notices VALUES (?, ?, ?)",
                     ((n.sender, n.id, n.recipient) for n in batch.notices))
    conn.executemany("DELETE FROM notices WHERE sender = ? AND id = ? AND recipient = ?",
                     ((n.sender, n.id, n.recipient) for n in batch.notices_sent))
    conn.executemany("INSERT OR REPLACE INTO node_status VALUES (?, ?)",
                     ((n, st) for n, st in batch.node_status if st != "active"))
    conn.executemany("DELETE FROM node_status WHERE node = ?",
                     ((n,) for n, st in batch.node_status if st == "active"))


def _enqueue(conn: sqlite3.Connection, rows: list[QueueRow]) -> None:
    # The rows of one message (its recipients) share one `messages` row. They are matched
    # on the whole (sender, id, envelope), not on the id: a sender may reuse an id once the
    # replay window has passed, while its earlier message is still queued. A message
    # enqueued again in a later batch gets a row of its own (the hub never does that).
    # Numbered here, inside the write transaction, so one statement inserts them all.
    (top,) = conn.execute("SELECT coalesce(max(mid), 0) FROM messages").fetchone()
    mids: dict[tuple[str, bytes, bytes], int] = {}
    messages: list[tuple[int, str, bytes, bytes]] = []
    queue: list[tuple[str, int, int, int, int, int]] = []
    for r in rows:
        key = (r.sender, r.id, r.envelope)
        mid = mids.get(key)
        if mid is None:
            mid = mids[key] = top + len(mids) + 1
            messages.append((mid, r.sender, r.id, r.envelope))
        queue.append((r.recipient, r.seq, r.prec, mid, r.expires_ms, r.queued_ms))
    insert_rows(conn, "INSERT INTO messages", messages)
    insert_rows(conn, "INSERT INTO queue", queue)
