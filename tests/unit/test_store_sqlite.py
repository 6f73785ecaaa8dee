"""The SQLite store's schema 3: each queued envelope stored once, released with its last queue
row, batches all-or-nothing, and the in-place upgrade from schema 2."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from broker.errors import StorageError
from broker.store import sqlite_schema
from broker.store.base import Batch, QueueRecord, QueueRow
from broker.store.sqlite import SqliteStore, backup_store, open_writer

ENVELOPE = bytes(range(256)) * 4 + b"tail"

#: Schema 2 as released (``broker/store/sqlite.py`` before schema 3), frozen here: the upgrade
#: must read stores written by it.
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cosignatures (
    size INTEGER NOT NULL, witness TEXT NOT NULL, line TEXT NOT NULL,
    PRIMARY KEY (size, witness)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bundles (hash BLOB PRIMARY KEY, content BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    recipient TEXT NOT NULL, seq INTEGER NOT NULL, prec INTEGER NOT NULL, id BLOB NOT NULL,
    sender TEXT NOT NULL, envelope BLOB NOT NULL, expires_ms INTEGER NOT NULL,
    queued_ms INTEGER NOT NULL, PRIMARY KEY (recipient, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS node_status (node TEXT PRIMARY KEY, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS notices (
    sender TEXT NOT NULL, id BLOB NOT NULL, recipient TEXT NOT NULL,
    PRIMARY KEY (sender, id, recipient)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    node TEXT NOT NULL, pattern TEXT NOT NULL, PRIMARY KEY (node, pattern)) WITHOUT ROWID;
"""


def _row(recipient: str, seq: int, *, msg: int = 1, envelope: bytes = ENVELOPE,
         sender: str = "USA-GW1") -> QueueRow:
    return QueueRow(recipient, seq, 3, msg.to_bytes(16, "big"), sender, envelope,
                    10**13 + msg, 10**12 + msg)


def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def _dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "broker.sqlite"


@pytest.fixture
def store(path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(path)
    yield opened
    opened.close()


def test_a_message_to_two_recipients_is_stored_once(store: SqliteStore, path: Path) -> None:
    rows = [_row("GBR-GW1", 1), _row("FRA-GW1", 2)]
    store.commit(Batch(enqueue=rows))
    assert store.queue_rows() == sorted(rows, key=lambda r: (r.recipient, r.seq))
    assert _count(path, "messages") == 1
    assert store.seq_high() == 2


def test_an_ack_keeps_the_other_recipients_envelope(store: SqliteStore, path: Path) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1), _row("FRA-GW1", 2)]))
    store.commit(Batch(dequeue=[("GBR-GW1", 1)]))
    assert store.queue_rows() == [_row("FRA-GW1", 2)]
    assert _count(path, "messages") == 1
    reopened = SqliteStore(path)  # and after a restart
    try:
        assert reopened.queue_rows() == [_row("FRA-GW1", 2)]
    finally:
        reopened.close()


def test_the_last_ack_removes_the_message(store: SqliteStore, path: Path) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1), _row("FRA-GW1", 2),
                                _row("GBR-GW1", 3, msg=2, envelope=b"other")]))
    store.commit(Batch(dequeue=[("GBR-GW1", 1), ("FRA-GW1", 2)]))
    assert store.queue_rows() == [_row("GBR-GW1", 3, msg=2, envelope=b"other")]
    assert _count(path, "messages") == 1
    store.commit(Batch(dequeue=[("GBR-GW1", 3)]))
    assert (_count(path, "queue"), _count(path, "messages")) == (0, 0)


def test_enqueue_and_ack_in_one_batch(store: SqliteStore, path: Path) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    store.commit(Batch(enqueue=[_row("GBR-GW1", 2, msg=2), _row("FRA-GW1", 3, msg=2)],
                       dequeue=[("GBR-GW1", 1), ("GBR-GW1", 2)]))
    assert store.queue_rows() == [_row("FRA-GW1", 3, msg=2)]
    assert _count(path, "messages") == 1


def test_a_reused_message_id_keeps_its_own_envelope(store: SqliteStore, path: Path) -> None:
    """Ids are the sender's: once the replay window has passed a sender may use one again while
    its earlier message is still queued. Each copy must keep the bytes it was sent with."""
    first, second = _row("GBR-GW1", 1), _row("FRA-GW1", 2, envelope=b"second")
    store.commit(Batch(enqueue=[first, second]))
    third = _row("GBR-GW1", 3, envelope=b"third")
    store.commit(Batch(enqueue=[third]))
    assert store.queue_rows() == [second, first, third]
    store.commit(Batch(dequeue=[("GBR-GW1", 1)]))
    assert store.queue_rows() == [second, third]
    assert _count(path, "messages") == 2


def test_a_failed_batch_writes_nothing(store: SqliteStore, path: Path) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    duplicate = Batch(first_index=0, entries=[b"entry"], nodes=[(0, 0, b"\x00" * 32)],
                      enqueue=[_row("FRA-GW1", 2, msg=2), _row("GBR-GW1", 1, msg=2)],
                      dequeue=[("GBR-GW1", 1)])
    with pytest.raises(StorageError, match="commit failed"):
        store.commit(duplicate)
    assert store.queue_rows() == [_row("GBR-GW1", 1)]
    assert (store.size(), store.seq_high()) == (0, 1)
    assert _count(path, "messages") == 1
    store.commit(Batch(enqueue=[_row("FRA-GW1", 2, msg=2)]))  # the store still works
    assert len(store.queue_rows()) == 2


def test_a_queue_row_deleted_by_hand_takes_its_message_along(
        store: SqliteStore, path: Path) -> None:
    """An operator's ``sqlite3`` shell has no broker code: the trigger in the schema frees the
    envelope all the same."""
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    conn = sqlite3.connect(path)
    with conn:
        assert conn.execute("DELETE FROM queue WHERE recipient = 'GBR-GW1'").rowcount == 1
    conn.close()
    assert _count(path, "messages") == 0


def _store_with_an_orphan(store: SqliteStore, path: Path) -> None:
    """One queued message, then (store closed) a message no queue row references: damage."""
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    store.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO messages VALUES (99, 'USA-GW1', x'00', x'01')")
    conn.close()


def test_an_orphan_message_is_removed_at_open(store: SqliteStore, path: Path) -> None:
    _store_with_an_orphan(store, path)
    assert _count(path, "messages") == 2
    reopened = SqliteStore(path)
    try:
        assert _count(path, "messages") == 1
        assert reopened.queue_rows() == [_row("GBR-GW1", 1)]
    finally:
        reopened.close()


@pytest.mark.parametrize("read", [SqliteStore.queue_rows, SqliteStore.queue_records])
def test_a_queue_row_without_its_message_is_an_error(
        store: SqliteStore, path: Path, read: Callable[[SqliteStore], Iterable[object]]) -> None:
    """Damage must not make a queued copy vanish silently at restart."""
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM messages")
    conn.close()
    with pytest.raises(StorageError, match=r"\(GBR-GW1, 1\) has no envelope"):
        list(read(store))


def test_queue_records_are_the_rows_without_their_envelopes(store: SqliteStore) -> None:
    rows = [_row("GBR-GW1", 1), _row("FRA-GW1", 2), _row("GBR-GW1", 3, msg=2, envelope=b"e2")]
    store.commit(Batch(enqueue=rows))
    expected = [QueueRecord(r.recipient, r.seq, r.prec, r.id, r.sender, len(r.envelope),
                            r.expires_ms, r.queued_ms)
                for r in sorted(rows, key=lambda r: (r.recipient, r.seq))]
    assert list(store.queue_records()) == expected
    # Read in chunks: every chunk boundary (within a recipient and between two) loses nothing.
    assert list(store.queue_records(chunk=1)) == list(store.queue_records(chunk=2)) == expected


def test_queued_envelopes_are_read_by_recipient_and_seq(store: SqliteStore) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1), _row("FRA-GW1", 2),
                                _row("GBR-GW1", 3, msg=2, envelope=b"e2")]))
    assert store.queued_envelopes("GBR-GW1", [3, 1, 2, 99]) == {1: ENVELOPE, 3: b"e2"}
    assert store.queued_envelopes("FRA-GW1", [2]) == {2: ENVELOPE}
    store.commit(Batch(dequeue=[("GBR-GW1", 1)]))
    assert store.queued_envelopes("GBR-GW1", [1, 3]) == {3: b"e2"}  # acked: gone
    assert store.queued_envelopes("GBR-GW1", []) == {}


def test_queued_envelopes_beyond_one_query_are_all_read(store: SqliteStore) -> None:
    rows = [_row("GBR-GW1", seq, msg=seq, envelope=b"e%d" % seq) for seq in range(1, 1201)]
    store.commit(Batch(enqueue=rows))
    assert store.queued_envelopes("GBR-GW1", list(range(1, 1201))) == {
        row.seq: row.envelope for row in rows}


def test_queued_envelopes_see_commits_made_during_a_snapshot(store: SqliteStore) -> None:
    """An export holds the reader in one snapshot for its whole length; a copy queued
    meanwhile must still be readable for its delivery."""
    with store.snapshot():
        assert store.queue_rows() == []  # the read transaction starts here
        store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
        assert store.queue_rows() == []  # still the snapshot's view
        assert store.queued_envelopes("GBR-GW1", [1]) == {1: ENVELOPE}


def test_unreadable_queued_envelopes_are_a_storage_error(store: SqliteStore, path: Path) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    store.close()
    path.unlink()
    (path.parent / (path.name + "-wal")).unlink(missing_ok=True)
    with pytest.raises(StorageError, match="cannot open the store to read queued envelopes"):
        store.queued_envelopes("GBR-GW1", [1])


def _v2_store(path: Path, rows: list[QueueRow], schema: str = "2") -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(V2_SCHEMA)
        conn.execute("INSERT INTO meta VALUES ('schema', ?)", (schema,))
        conn.execute("INSERT INTO meta VALUES ('seq_high', '9')")
        conn.execute("INSERT INTO entries VALUES (0, x'00')")
        conn.executemany("INSERT INTO queue VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         ((r.recipient, r.seq, r.prec, r.id, r.sender, r.envelope, r.expires_ms,
                           r.queued_ms) for r in rows))
    conn.close()


V2_ROWS = [
    _row("GBR-GW1", 1), _row("FRA-GW1", 2),  # one message, two recipients
    _row("GBR-GW1", 3, msg=2, envelope=b"two"),
    _row("FRA-GW1", 4, envelope=b"reused id"),  # same sender and id, other bytes
    _row("FRA-GW1", 5, msg=2, envelope=b"two", sender="GBR-GW1"),  # same id, other sender
]


def test_a_schema_2_store_is_upgraded_keeping_every_queued_row(path: Path) -> None:
    _v2_store(path, V2_ROWS)
    store = SqliteStore(path)
    try:
        assert store.queue_rows() == sorted(V2_ROWS, key=lambda r: (r.recipient, r.seq))
        assert (store.size(), store.seq_high()) == (1, 9)
        assert _count(path, "messages") == 4
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (
                "3",)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(queue)")}
            assert "envelope" not in columns
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            conn.close()
        # The upgraded store behaves as a new one: the last ack frees the envelope.
        store.commit(Batch(dequeue=[("GBR-GW1", 1), ("FRA-GW1", 2)]))
        assert _count(path, "messages") == 3
        store.commit(Batch(enqueue=[_row("GBR-GW1", 10, msg=3)]))
        assert len(store.queue_rows()) == 4
    finally:
        store.close()
    reopened = SqliteStore(path)  # a second open finds version 3 and changes nothing
    try:
        assert len(reopened.queue_rows()) == 4
    finally:
        reopened.close()


def test_a_failed_upgrade_leaves_the_schema_2_store_untouched(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _v2_store(path, V2_ROWS)
    before = _dump(path)
    # Fails at the last step, after every table was rebuilt.
    monkeypatch.setattr(sqlite_schema, "UPGRADE_FROM_2",
                        [*sqlite_schema.UPGRADE_FROM_2, "INSERT INTO nowhere VALUES (1)"])
    with pytest.raises(StorageError, match="no such table: nowhere"):
        SqliteStore(path)
    assert _dump(path) == before
    monkeypatch.undo()
    store = SqliteStore(path)
    try:
        assert len(store.queue_rows()) == len(V2_ROWS)
    finally:
        store.close()


def test_a_store_of_another_schema_version_is_refused_untouched(path: Path) -> None:
    _v2_store(path, V2_ROWS, schema="99")
    before = _dump(path)
    with pytest.raises(StorageError, match="schema version 99; this broker reads version 3"):
        SqliteStore(path)
    assert _dump(path) == before


def test_a_new_store_is_schema_3(path: Path) -> None:
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert {"messages", "queue", "queue_msg", "queue_release"} <= names


def test_a_backup_holds_the_queued_envelopes(store: SqliteStore, tmp_path: Path) -> None:
    rows = [_row("FRA-GW1", 2), _row("GBR-GW1", 1)]
    store.commit(Batch(enqueue=rows))
    backup_store(tmp_path, tmp_path / "copy.sqlite")
    copy = SqliteStore(tmp_path / "copy.sqlite")
    try:
        assert copy.queue_rows() == rows
    finally:
        copy.close()


# --- read-only opening (exports and inspections of a running broker's store) ------------------


def test_a_read_only_store_reads_what_the_writer_committed(store: SqliteStore,
                                                           path: Path) -> None:
    store.commit(Batch(first_index=0, entries=[b"e0", b"e1"], enqueue=[_row("GBR-GW1", 1)]))
    reader = SqliteStore.open_read_only(path)
    try:
        assert reader.size() == 2 and reader.entries(0, 2) == [b"e0", b"e1"]
        store.commit(Batch(first_index=2, entries=[b"e2"]))  # the live writer goes on
        assert reader.size() == 3
        assert reader.queue_rows() == [_row("GBR-GW1", 1)]
    finally:
        reader.close()


def test_a_read_only_store_refuses_to_commit(store: SqliteStore, path: Path) -> None:
    reader = SqliteStore.open_read_only(path)
    try:
        with pytest.raises(StorageError, match="opened read-only"):
            reader.commit(Batch(first_index=0, entries=[b"e0"]))
    finally:
        reader.close()
    assert store.size() == 0


def test_a_read_only_open_leaves_an_orphan_message_alone(store: SqliteStore,
                                                         path: Path) -> None:
    """Cleaning at open is the writer's job: a reader changes nothing, not even damage."""
    _store_with_an_orphan(store, path)
    before = _dump(path)
    SqliteStore.open_read_only(path).close()
    assert _dump(path) == before


def test_a_read_only_open_never_upgrades_or_creates(path: Path) -> None:
    with pytest.raises(StorageError, match=r"cannot open the store .* to read"):
        SqliteStore.open_read_only(path)
    assert not path.exists()
    _v2_store(path, V2_ROWS)
    before = _dump(path)
    with pytest.raises(StorageError, match="schema version 2; this broker reads version 3"):
        SqliteStore.open_read_only(path)
    assert _dump(path) == before


def _foreign_database(path: Path, journal_mode: str = "delete") -> bytes:
    """Another program's SQLite database (a table of its own, the journal mode given), closed
    as that program leaves it: no -wal or -shm companion. Its bytes."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute(f"PRAGMA journal_mode={journal_mode}").fetchone() == (journal_mode,)
        conn.execute("CREATE TABLE accounts (name TEXT, balance INTEGER)")
        conn.execute("INSERT INTO accounts VALUES ('x', 1)")
        conn.commit()
    finally:
        conn.close()
    assert _companions(path) == []
    return path.read_bytes()


def _companions(path: Path) -> list[str]:
    """The files next to the store that SQLite names after it (-wal, -shm, -journal)."""
    return sorted(p.name for p in path.parent.glob(path.name + "-*"))


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_another_programs_database_is_refused_byte_for_byte_untouched(
        path: Path, journal_mode: str) -> None:
    """Neither our tables nor WAL mode (which rewrites the file header) go into a database
    that is not ours, e.g. a data directory pointed at the wrong place; nor a -wal or -shm file
    next to it: a read-write connection (or a mode=ro one, for a WAL database) creates them."""
    before = _foreign_database(path, journal_mode)
    with pytest.raises(StorageError, match=r"is not a broker store \(a database with other "
                                           r"tables: accounts\); nothing was changed"):
        SqliteStore(path)
    assert path.read_bytes() == before
    assert _companions(path) == []


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_the_writer_connection_leaves_another_programs_database_untouched(
        path: Path, journal_mode: str) -> None:
    before = _foreign_database(path, journal_mode)
    with pytest.raises(StorageError, match="is not a broker store"):
        open_writer(path)
    assert path.read_bytes() == before
    assert _companions(path) == []


def test_a_new_store_is_in_wal_mode(path: Path) -> None:
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()


def test_a_file_that_is_not_a_broker_store_is_refused_read_only(path: Path) -> None:
    sqlite3.connect(path).close()
    with pytest.raises(StorageError, match="is not a broker store"):
        SqliteStore.open_read_only(path)
