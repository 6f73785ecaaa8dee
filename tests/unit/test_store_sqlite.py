"""The SQLite store's schema 4: each queued envelope stored once, released with its last queue
row, batches all-or-nothing, and the in-place upgrades from schemas 2 and 3."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit.merkle import leaf_hash
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


def _logged(first: int, *entries: bytes) -> dict[str, Any]:
    """The ``Batch`` fields of audit entries appended at ``first``, with their leaf hashes."""
    return {"first_index": first, "entries": list(entries),
            "leaves": [leaf_hash(e) for e in entries]}


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
    duplicate = Batch(**_logged(0, b"entry"), nodes=[(4, 0, b"\x00" * 32)],
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


def test_a_closed_store_is_one_file_also_after_reading_queued_envelopes(
        store: SqliteStore, path: Path) -> None:
    store.commit(Batch(enqueue=[_row("GBR-GW1", 1)]))
    assert store.queued_envelopes("GBR-GW1", [1]) == {1: ENVELOPE}
    store.close()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    reopened = SqliteStore(path)
    try:
        assert reopened.queue_rows() == [_row("GBR-GW1", 1)]
    finally:
        reopened.close()


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
        conn.execute("INSERT INTO nodes VALUES (0, 0, ?)", (leaf_hash(b"\x00"),))
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
                "4",)
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
    reopened = SqliteStore(path)  # a second open finds version 4 and changes nothing
    try:
        assert len(reopened.queue_rows()) == 4
    finally:
        reopened.close()


def _upgrade_fails_at_its_last_step(path: Path, monkeypatch: pytest.MonkeyPatch,
                                    steps: str) -> None:
    """The upgrade ``steps`` fails after every table was rebuilt: the store is as it was."""
    before = _dump(path)
    monkeypatch.setattr(sqlite_schema, steps,
                        [*getattr(sqlite_schema, steps), "INSERT INTO nowhere VALUES (1)"])
    with pytest.raises(StorageError, match="no such table: nowhere"):
        SqliteStore(path)
    assert _dump(path) == before


def test_a_failed_upgrade_leaves_the_schema_2_store_untouched(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _v2_store(path, V2_ROWS)
    _upgrade_fails_at_its_last_step(path, monkeypatch, "UPGRADE_FROM_2")
    monkeypatch.undo()
    store = SqliteStore(path)
    try:
        assert len(store.queue_rows()) == len(V2_ROWS)
    finally:
        store.close()


def v3_store(path: Path, entries: list[bytes], nodes: Iterable[tuple[int, int, bytes]]) -> None:
    """A schema-3 store as a version-3 broker leaves it: schema 2 upgraded by the frozen
    statements of that upgrade, with ``entries`` and every complete node (``nodes``)."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")  # as every broker since schema 2 leaves it
    with conn:
        conn.executescript(V2_SCHEMA)
        conn.execute("INSERT INTO meta VALUES ('schema', '2')")
        conn.executemany("INSERT INTO entries VALUES (?, ?)", enumerate(entries))
        conn.executemany("INSERT INTO nodes VALUES (?, ?, ?)", nodes)
        for statement in sqlite_schema.UPGRADE_FROM_2:
            conn.execute(statement)
    conn.close()


V3_ENTRIES = [b"entry %d" % i for i in range(40)]
#: Made-up node hashes above the leaves: the upgrade moves rows, it does not check hashes.
V3_NODES = [(0, i, leaf_hash(e)) for i, e in enumerate(V3_ENTRIES)] + [
    (level, index, bytes([level, index]) * 16) for level in range(1, 6)
    for index in range(40 >> level)]


def test_a_schema_3_store_is_upgraded_keeping_the_leaves_and_stored_levels(path: Path) -> None:
    v3_store(path, V3_ENTRIES, V3_NODES)
    store = SqliteStore(path)
    try:
        # The rewritten tables went through the WAL; it is given back at once, not at close.
        assert path.with_name(path.name + "-wal").stat().st_size == 0
        assert store.entries(0, 40) == V3_ENTRIES
        assert store.nodes(0, 0, 40) == [leaf_hash(e) for e in V3_ENTRIES]
        assert list(store.iter_nodes(0)) == list(enumerate(store.nodes(0, 0, 40)))
        assert store.nodes(4, 0, 10) == [bytes([4, 0]) * 16, bytes([4, 1]) * 16]
        for level in (1, 2, 3, 5):
            assert store.nodes(level, 0, 40) == []
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        (nodes,) = conn.execute("SELECT count(*) FROM nodes").fetchone()
        assert nodes == 2
    finally:
        conn.close()


def test_a_schema_3_store_with_an_entry_but_no_leaf_hash_is_refused_untouched(
        path: Path) -> None:
    v3_store(path, V3_ENTRIES, [n for n in V3_NODES if n[:2] != (0, 7)])
    before = _dump(path)
    with pytest.raises(StorageError, match="1 audit entries have no recorded leaf hash"):
        SqliteStore(path)
    assert _dump(path) == before


def test_a_schema_2_store_refused_on_the_way_to_4_says_it_is_at_3(path: Path) -> None:
    """Each version's step is its own transaction: the step to 3 stays done."""
    _v2_store(path, V2_ROWS)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM nodes")  # entry 0 loses its leaf hash
    conn.close()
    with pytest.raises(StorageError, match=r"changed nothing \(the store is at schema 3\)"):
        SqliteStore(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
    finally:
        conn.close()


def test_a_failed_upgrade_leaves_the_schema_3_store_untouched(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v3_store(path, V3_ENTRIES, V3_NODES)
    _upgrade_fails_at_its_last_step(path, monkeypatch, "UPGRADE_FROM_3")


def test_a_store_of_another_schema_version_is_refused_untouched(path: Path) -> None:
    _v2_store(path, V2_ROWS, schema="99")
    before = _dump(path)
    with pytest.raises(StorageError, match="schema version 99; this broker reads version 4"):
        SqliteStore(path)
    assert _dump(path) == before


def test_a_new_store_is_schema_4(path: Path) -> None:
    SqliteStore(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
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
    store.commit(Batch(**_logged(0, b"e0", b"e1"), enqueue=[_row("GBR-GW1", 1)]))
    reader = SqliteStore.open_read_only(path)
    try:
        assert reader.size() == 2 and reader.entries(0, 2) == [b"e0", b"e1"]
        store.commit(Batch(**_logged(2, b"e2")))  # the live writer goes on
        assert reader.size() == 3
        assert reader.queue_rows() == [_row("GBR-GW1", 1)]
    finally:
        reader.close()


def test_a_read_only_store_refuses_to_commit(store: SqliteStore, path: Path) -> None:
    reader = SqliteStore.open_read_only(path)
    try:
        with pytest.raises(StorageError, match="opened read-only"):
            reader.commit(Batch(**_logged(0, b"e0")))
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
    with pytest.raises(StorageError, match="schema version 2; this broker reads version 4"):
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


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.parent.glob(path.name + "*")}


def _as_a_crash_leaves_it(source: Path, path: Path) -> None:
    """Copy ``source`` and its companions to ``path`` as they are on disk now, e.g. in the middle
    of a transaction of a connection still open: what a crash at this moment leaves. (The copy
    holds no lock, as a dead process holds none; reading ``source`` drops this process's locks
    on it, so ``source`` is only rolled back and closed afterwards.)"""
    for suffix in ("", "-journal", "-wal", "-shm"):
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{path}{suffix}")


@contextlib.contextmanager
def _companions_while_open(path: Path) -> Iterator[list[list[str]]]:
    """The companions of ``path`` seen each time a connection opened meanwhile (by anyone) is
    closed, i.e. while it was still open: a read-write connection deletes the -wal and -shm it
    created when it closes, so they are not there afterwards."""
    seen: list[list[str]] = []
    connect = sqlite3.connect

    class Watched(sqlite3.Connection):
        def close(self) -> None:
            seen.append(_companions(path))
            super().close()

    def watched(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(*args, factory=Watched, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", watched)
        yield seen


_OPENERS: list[Callable[[Path], object]] = [SqliteStore, SqliteStore.open_read_only, open_writer]
_OPENER_NAMES = ["SqliteStore", "open_read_only", "open_writer"]


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
@pytest.mark.parametrize("open_", _OPENERS, ids=_OPENER_NAMES)
def test_another_programs_database_is_refused_byte_for_byte_untouched(
        path: Path, journal_mode: str, open_: Callable[[Path], object]) -> None:
    """Neither our tables nor WAL mode (which rewrites the file header) go into a database
    that is not ours, e.g. a data directory pointed at the wrong place; nor a -wal or -shm file
    next to it, not even for a while: a read-write connection to a WAL database creates them
    (and deletes them when it closes), a mode=ro one creates them and leaves them."""
    before = _foreign_database(path, journal_mode)
    with _companions_while_open(path) as seen, pytest.raises(
            StorageError, match=r"is not a broker store \(a database with other tables: "
                                r"accounts\); nothing was changed"):
        open_(path)
    assert seen and all(companions == [] for companions in seen)
    assert path.read_bytes() == before
    assert _companions(path) == []


@pytest.mark.parametrize("open_", _OPENERS, ids=_OPENER_NAMES)
def test_another_programs_wal_database_left_by_a_crash_is_refused_untouched(
        path: Path, tmp_path: Path, open_: Callable[[Path], object]) -> None:
    """Its -wal still holds committed transactions (its program died, or runs now). A
    read-write connection that closes last checkpoints them into the file and deletes the
    -wal; the check reads through them with mode=ro, which cannot (immutable=1 would not see
    them: here the accounts table is only in the -wal)."""
    source = tmp_path / "other.sqlite"
    conn = sqlite3.connect(source, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE accounts (name TEXT, balance INTEGER)")
    conn.execute("INSERT INTO accounts VALUES ('x', 1)")
    _as_a_crash_leaves_it(source, path)
    conn.close()
    before = _files(path)
    assert sorted(before) == ["broker.sqlite", "broker.sqlite-shm", "broker.sqlite-wal"]
    with pytest.raises(StorageError, match=r"not a broker store \(a database with other "
                                           r"tables: accounts\); nothing was changed"):
        open_(path)
    after = _files(path)
    assert sorted(after) == sorted(before)
    # The -shm is SQLite's index of the -wal, nothing persistent: a reader may rebuild it.
    assert (after["broker.sqlite"], after["broker.sqlite-wal"]) == (
        before["broker.sqlite"], before["broker.sqlite-wal"])


@pytest.mark.parametrize("open_", _OPENERS, ids=_OPENER_NAMES)
def test_another_programs_interrupted_transaction_is_refused_untouched(
        path: Path, tmp_path: Path, open_: Callable[[Path], object]) -> None:
    """A hot rollback journal of a database that had pages: mode=ro cannot read the file
    (SQLite would roll the journal back first, a write), immutable=1 would read it torn."""
    source = tmp_path / "other.sqlite"
    _foreign_database(source)
    conn = sqlite3.connect(source, isolation_level=None)
    conn.execute("PRAGMA cache_size=1")  # the transaction's pages spill into the file
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO accounts VALUES ('y', zeroblob(200000))")
    _as_a_crash_leaves_it(source, path)
    conn.execute("ROLLBACK")
    conn.close()
    before = _files(path)
    assert sorted(before) == ["broker.sqlite", "broker.sqlite-journal"]
    with pytest.raises(StorageError, match=r"has a transaction that was interrupted .*"
                                           r"nothing was changed"):
        open_(path)
    assert _files(path) == before


@pytest.mark.parametrize(("other", "refusal"), [
    ("accounts (name TEXT, balance INTEGER)", r"other tables: accounts, meta\); nothing was"),
    # Empty tables named like the broker's are no proof of a half-made store: never dropped.
    ("messages (id INTEGER, body TEXT)", r"empty tables \(messages, meta\).*nothing was"),
])
def test_a_foreign_meta_table_does_not_make_a_broker_store(path: Path, other: str,
                                                           refusal: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(f"CREATE TABLE {other}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StorageError, match=refusal):
        SqliteStore(path)
    assert path.read_bytes() == before
    assert list(_files(path)) == ["broker.sqlite"]


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


# --- creation: all or nothing, at any point a broker may die ----------------------------------


def _tables(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    finally:
        conn.close()


def _is_a_new_store(path: Path) -> None:
    store = SqliteStore(path)
    try:
        assert (store.size(), store.queue_rows(), store.seq_high()) == (0, [], 0)
        store.commit(Batch(**_logged(0, b"e0"), enqueue=[_row("GBR-GW1", 1)]))
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM entries").fetchone() == (1,)
    finally:
        conn.close()


def test_creation_is_all_or_nothing(path: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker that fails, or dies, after the last statement of its store's creation and
    before the commit leaves no tables: the next start creates the store. (A version that
    created the tables one transaction each could leave some without the schema version,
    which would then look like another program's database.)"""
    crashed = tmp_path / "crashed" / "broker.sqlite"
    crashed.parent.mkdir()
    create_new = sqlite_schema._create_new

    def dies_before_the_commit(conn: sqlite3.Connection, at: Path) -> None:
        conn.execute("PRAGMA cache_size=1")  # the transaction's pages spill to disk
        create_new(conn, at)
        conn.execute("INSERT INTO entries VALUES (0, zeroblob(32), zeroblob(300000))")
        _as_a_crash_leaves_it(at, crashed)
        raise RuntimeError("the broker dies")

    monkeypatch.setattr(sqlite_schema, "_create_new", dies_before_the_commit)
    with pytest.raises(RuntimeError, match="the broker dies"):
        SqliteStore(path)
    monkeypatch.undo()
    assert _companions(crashed) == ["broker.sqlite-shm", "broker.sqlite-wal"]
    assert crashed.with_name("broker.sqlite-wal").stat().st_size > 300_000  # the creation's
    assert _tables(path) == []  # rolled back
    for left in (path, crashed):
        _is_a_new_store(left)


def test_a_store_whose_creation_died_in_a_rollback_journal_is_created(
        path: Path, tmp_path: Path) -> None:
    """What a broker before this version left when it died creating its store (the creation
    then used a rollback journal), and what one dying while it switches an empty file to WAL
    leaves: a hot journal that records an empty database, and pages of the transaction in
    the file. mode=ro cannot read that (SQLite must roll the journal back first) and
    immutable=1 would read the torn file, but its committed state is an empty file: new."""
    source = tmp_path / "source.sqlite"
    conn = sqlite3.connect(source, isolation_level=None)
    conn.execute("PRAGMA cache_size=1")  # the transaction's pages spill into the file
    conn.execute("BEGIN IMMEDIATE")
    for statement in sqlite_schema._CREATE:
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema', '3')")
    conn.execute("INSERT INTO entries VALUES (0, zeroblob(32), zeroblob(300000))")
    _as_a_crash_leaves_it(source, path)
    conn.execute("ROLLBACK")
    conn.close()
    assert _companions(path) == ["broker.sqlite-journal"]
    assert path.stat().st_size > 300_000
    _is_a_new_store(path)
    assert _companions(path) == []


def test_a_new_store_is_in_wal_mode_before_its_tables_are_created(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Switched while the file is empty, so that no crash leaves a hot rollback journal of a
    database with pages, which the read-only check refuses (it cannot tell whose it is): the
    switch of a whole store used one, a one-page transaction on a store of any size."""
    modes = []
    create_new = sqlite_schema._create_new

    def watched(conn: sqlite3.Connection, at: Path) -> None:
        modes.append(conn.execute("PRAGMA journal_mode").fetchone()[0])
        create_new(conn, at)

    monkeypatch.setattr(sqlite_schema, "_create_new", watched)
    SqliteStore(path).close()
    assert modes == ["wal"]


def test_two_brokers_creating_one_store_at_once(path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The second finds no store when it looks, then the first creates it before the second
    takes the write lock: the second must neither refuse the first's tables as another
    program's nor create them again (hence the check under the lock)."""
    other: list[SqliteStore] = []
    stored_version = sqlite_schema.stored_version

    def first_broker_gets_there_first(conn: sqlite3.Connection) -> str | None:
        version = stored_version(conn)  # the second's first look (no lock): no store
        monkeypatch.setattr(sqlite_schema, "stored_version", stored_version)
        other.append(SqliteStore(path))
        other[0].commit(Batch(**_logged(0, b"first")))
        return version

    monkeypatch.setattr(sqlite_schema, "stored_version", first_broker_gets_there_first)
    second = SqliteStore(path)
    try:
        assert other and second.entries(0, 1) == [b"first"]
        second.commit(Batch(**_logged(1, b"second")))
        assert other[0].size() == 2
    finally:
        second.close()
        other[0].close()


def _earlier_versions_interrupted_creation(path: Path, tables: int) -> None:
    """What a schema-2 broker left when it died creating its store: WAL mode, then the first
    ``tables`` statements of its schema, one transaction each, and no schema version."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in V2_SCHEMA.split(";")[:tables]:
        conn.execute(statement)
    conn.close()


@pytest.mark.parametrize("tables", [1, 7, 10])
def test_an_earlier_versions_interrupted_creation_is_refused_with_a_hint(path: Path,
                                                                        tables: int) -> None:
    """Its tables are empty: refused untouched, naming the way out (delete the file), since
    empty tables named like the broker's may as well be another program's."""
    _earlier_versions_interrupted_creation(path, tables)
    before = _dump(path)
    with pytest.raises(StorageError, match="no schema version: what a broker before schema 3 "
                                           r"left .* delete the file and start again"):
        SqliteStore(path)
    assert _dump(path) == before


def test_empty_broker_tables_with_data_beside_them_are_refused(path: Path) -> None:
    """Not an interrupted creation: a table holds a row (and the writer opens nothing)."""
    _earlier_versions_interrupted_creation(path, 3)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO nodes VALUES (0, 0, x'00')")
    conn.close()
    before = _dump(path)
    with pytest.raises(StorageError, match=r"other tables: entries, meta, nodes\); nothing"):
        SqliteStore(path)
    with pytest.raises(StorageError, match="is not a broker store"):
        open_writer(path)
    assert _dump(path) == before


def test_the_writer_connection_creates_no_file(path: Path) -> None:
    with pytest.raises(StorageError, match="is not a broker store"):
        open_writer(path)
    assert not path.exists()
