"""The SQLite store's schema (version 4), its creation, and the in-place upgrades from versions 2
and 3.

Version 3 holds each queued envelope once, in ``messages``; the ``queue`` has one row per
recipient that references it by ``msg``. Version 2 kept the envelope in every ``queue`` row, so a
message released to N recipients wrote (and, one ack at a time, deleted) it N times, each copy a
4 KiB overflow page in the ``WITHOUT ROWID`` queue. The ``queue_release`` trigger deletes a
message together with the last queue row that references it, in the same statement: every batch
stays one transaction, and no connection (not even an operator's ``sqlite3`` shell) leaves an
envelope behind.

Version 4 records each entry's leaf hash in the entry's own row, and keeps the tree nodes of
every fourth level only (the audit log recomputes the others from at most eight,
:func:`broker.audit.merkle.is_stored_level`); version 3 kept every complete node in ``nodes``,
leaves included: two rows per entry, a third of the store. :func:`prepare` is the only entry
point; nothing outside ``broker/store`` may depend on this layout.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from broker.errors import StorageError

SCHEMA_VERSION = 4

# `messages` is a rowid table: a ~1 KiB envelope fits in its leaf page, where a WITHOUT ROWID
# row that size spills into a 4 KiB overflow page of its own.
_MESSAGES = """CREATE TABLE IF NOT EXISTS messages (
    mid INTEGER PRIMARY KEY, sender TEXT NOT NULL, id BLOB NOT NULL, envelope BLOB NOT NULL)"""

# The leaf before the data: reading it (at start, for proofs) does not walk a long entry's
# overflow pages.
_ENTRIES = """CREATE TABLE IF NOT EXISTS {name} (
    idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL, data BLOB NOT NULL)"""

_QUEUE = """CREATE TABLE IF NOT EXISTS {name} (
    recipient TEXT NOT NULL, seq INTEGER NOT NULL, prec INTEGER NOT NULL, msg INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL, queued_ms INTEGER NOT NULL,
    PRIMARY KEY (recipient, seq)) WITHOUT ROWID"""

# The index makes the trigger's "still referenced?" one lookup instead of a queue scan.
_RELEASE = [
    "CREATE INDEX IF NOT EXISTS queue_msg ON queue (msg)",
    """CREATE TRIGGER IF NOT EXISTS queue_release AFTER DELETE ON queue BEGIN
        DELETE FROM messages WHERE mid = old.msg
            AND NOT EXISTS (SELECT 1 FROM queue WHERE msg = old.msg);
    END""",
]

_CREATE = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    _ENTRIES.format(name="entries"),
    """CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL, witness TEXT NOT NULL, line TEXT NOT NULL,
    PRIMARY KEY (size, witness)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS bundles (hash BLOB PRIMARY KEY, content BLOB NOT NULL)",
    _MESSAGES,
    _QUEUE.format(name="queue"),
    *_RELEASE,
    "CREATE TABLE IF NOT EXISTS node_status (node TEXT PRIMARY KEY, status TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS notices (
    sender TEXT NOT NULL, id BLOB NOT NULL, recipient TEXT NOT NULL,
    PRIMARY KEY (sender, id, recipient)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
    node TEXT NOT NULL, pattern TEXT NOT NULL, PRIMARY KEY (node, pattern)) WITHOUT ROWID""",
]

#: Version 2 → 3: one message per distinct (sender, id, envelope), numbered in queue order and
#: matched back through a temporary index (without it the join could compare every pair).
UPGRADE_FROM_2 = [
    _MESSAGES,
    "CREATE INDEX upgrade_messages ON messages (sender, id)",
    "INSERT INTO messages (sender, id, envelope) "
    "SELECT sender, id, envelope FROM queue GROUP BY sender, id, envelope ORDER BY min(seq)",
    _QUEUE.format(name="queue_v3"),
    "INSERT INTO queue_v3 SELECT q.recipient, q.seq, q.prec, m.mid, q.expires_ms, q.queued_ms "
    "FROM queue AS q JOIN messages AS m "
    "ON m.sender = q.sender AND m.id = q.id AND m.envelope = q.envelope",
    "DROP INDEX upgrade_messages",
    "DROP TABLE queue",
    "ALTER TABLE queue_v3 RENAME TO queue",
    *_RELEASE,
    "UPDATE meta SET value = '3' WHERE key = 'schema'",
]

#: Version 3 → 4: each entry takes its recorded leaf hash (level 0 of ``nodes``) into its row;
#: then the nodes a version-4 log does not store go (it reads no others). The step of 4 is
#: written out: it is schema 4's (``merkle.STORED_LEVEL_STEP`` may change only with a new
#: schema version, which would move the nodes).
UPGRADE_FROM_3 = [
    _ENTRIES.format(name="entries_v4"),
    "INSERT INTO entries_v4 SELECT e.idx, n.hash, e.data "
    "FROM entries AS e JOIN nodes AS n ON n.level = 0 AND n.idx = e.idx",
    "DROP TABLE entries",
    "ALTER TABLE entries_v4 RENAME TO entries",
    "DELETE FROM nodes WHERE level % 4 != 0 OR level = 0",
    "UPDATE meta SET value = '4' WHERE key = 'schema'",
]

_ORPHANS = "FROM messages WHERE NOT EXISTS (SELECT 1 FROM queue WHERE msg = mid)"


def stored_version(conn: sqlite3.Connection) -> str | None:
    """The schema version written in the store, ``None`` for an empty file."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                    ).fetchone() is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return None if row is None else str(row[0])


#: Every table a broker has created, at any schema version (1 to 4).
_BROKER_TABLES = frozenset({"meta", "entries", "nodes", "checkpoints", "cosignatures", "bundles",
                            "messages", "queue", "node_status", "notices", "subscriptions"})


def _interrupted_creation(conn: sqlite3.Connection, objects: list[tuple[str, str]]) -> bool:
    """Whether the schema objects of a database with no schema version are what a broker of
    schema 1 or 2 leaves when it dies creating its store: those versions created the ``meta``
    table, then the others, one statement and one transaction each, and wrote the version row
    before the first commit. So: ``meta`` and only broker tables (and their automatic indexes),
    every one of them empty. Version 3 creates the store in one transaction."""
    tables = [name for kind, name in objects if kind == "table"]
    return ("meta" in tables and set(tables) <= _BROKER_TABLES
            and all(kind == "table" or name.startswith("sqlite_autoindex_")
                    for kind, name in objects)
            and not any(conn.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone()
                        for name in tables))


def refuse_a_foreign_database(conn: sqlite3.Connection, path: Path) -> None:
    """Raise ``StorageError`` if the database on ``conn``, which has no schema version, has
    tables: another program's, or what an earlier version left when it died creating its store
    (see :func:`_interrupted_creation`). Never dropped automatically: empty tables named like
    ours (``meta``, ``messages``, ``nodes``) are common in other programs' databases too, so
    the operator decides (the message says how). Reads only: also run on a read-only connection
    before any read-write one."""
    objects = [(str(kind), str(name)) for kind, name in conn.execute(
        "SELECT type, name FROM sqlite_master ORDER BY name")]
    names = [name for kind, name in objects if kind == "table"]
    if not names:
        return
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    if _interrupted_creation(conn, objects):
        raise StorageError(f"{path} has empty tables ({shown}) and no schema version: what a "
                           "broker before schema 3 left if it died creating its store, or "
                           "another program's database; nothing was changed (if it is a "
                           "half-made store and holds nothing, delete the file and start again)")
    raise StorageError(f"{path} is not a broker store (a database with other tables: "
                       f"{shown}); nothing was changed")


def _create(conn: sqlite3.Connection) -> None:
    # Each statement takes no lock when its table, index or trigger exists.
    for statement in _CREATE:
        conn.execute(statement)


def _create_new(conn: sqlite3.Connection, path: Path) -> None:
    # Under the write lock: another broker process may have created the store meanwhile (then
    # the version is no longer None and this does not run), or it is another program's file
    # (SqliteStore refuses one before its read-write connection; checked again here, the
    # authority, for a file that changed since).
    refuse_a_foreign_database(conn, path)
    _create(conn)
    conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))


def _upgrade_from_2(conn: sqlite3.Connection) -> None:
    (queued,) = conn.execute("SELECT count(*) FROM queue").fetchone()
    for statement in UPGRADE_FROM_2:
        conn.execute(statement)
    (kept,) = conn.execute("SELECT count(*) FROM queue").fetchone()
    if kept != queued:  # cannot happen (every row's triple is in messages); checked all the same
        raise StorageError(f"the upgrade to schema 3 kept {kept} of {queued} queue rows")


def _upgrade_from_3(conn: sqlite3.Connection) -> None:
    (entries,) = conn.execute("SELECT count(*) FROM entries").fetchone()
    for statement in UPGRADE_FROM_3:
        conn.execute(statement)
    (kept,) = conn.execute("SELECT count(*) FROM entries").fetchone()
    if kept != entries:  # a version-3 broker refuses such a store at start too
        raise StorageError(f"{entries - kept} audit entries have no recorded leaf hash: the "
                           "store is damaged (a version-3 broker would refuse it as well); the "
                           "upgrade to schema 4 changed nothing (the store is at schema 3)")


def _transaction(conn: sqlite3.Connection, expect: str | None,
                 step: Callable[[sqlite3.Connection], None]) -> None:
    """Run ``step`` in one write transaction if the stored version is still ``expect``: read
    again under the write lock, as another process may have got there first."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if stored_version(conn) == expect:
            step(conn)
        conn.execute("COMMIT")
    except BaseException:
        # The original error is the one to report; the store is as it was.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Make the store on ``conn`` (autocommit) a version-4 store, or raise ``StorageError``.

    A new store is created in one transaction (in an empty file only, or in place of the empty
    tables an earlier version left when it died creating its store: a database with tables of
    its own is another program's, refused untouched); a version-2 or 3 store is upgraded in
    place, one transaction per version (nothing changes in a step that fails); a store of
    another version is refused untouched. Then messages no queue row references (a commit never
    leaves one; damage might) are deleted.
    """
    version = stored_version(conn)
    if version is None:
        _transaction(conn, None, lambda locked: _create_new(locked, path))
    if version == "2":
        _transaction(conn, "2", _upgrade_from_2)
    if stored_version(conn) == "3":
        _transaction(conn, "3", _upgrade_from_3)
    if version in ("2", "3"):
        # An upgrade rewrote tables through the WAL (in WAL mode): give the space back now, not
        # at the last connection's close, since the store's size is checked against its limit.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    version = stored_version(conn)
    if version != str(SCHEMA_VERSION):
        raise StorageError(f"{path} has schema version {version}; this broker reads "
                           f"version {SCHEMA_VERSION} (nothing was changed)")
    _create(conn)  # as every version did at open: a table added since is created (if absent)
    # Looked for first: a store opened only to read (an export of a live store) takes no write
    # lock when there is nothing to delete.
    if conn.execute(f"SELECT 1 {_ORPHANS} LIMIT 1").fetchone() is not None:
        conn.execute(f"DELETE {_ORPHANS}")
