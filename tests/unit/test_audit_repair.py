"""``broker.audit.repair``: the leaf hashes and tree nodes rebuilt from the entries, checked
against the signed checkpoint before anything is written, in one transaction or not at all."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import pytest

from broker.audit import merkle
from broker.audit.leaves import DeliverEntry
from broker.audit.log import AuditLog, LogDamaged
from broker.audit.note import Checkpoint, Signer, sign_note, verify_note
from broker.audit.repair import BrokerRunning, RepairRefused, repair_tree, verify_broker_stopped
from broker.errors import StorageError
from broker.store import sqlite_repair
from broker.store.base import Batch
from broker.store.sqlite import SqliteStore

SIGNER = Signer.from_seed("broker.test", bytes(range(32)))
KEYS = [SIGNER.verifier().public_key]
ZERO = bytes(32)


def _entry(i: int) -> bytes:
    return DeliverEntry(ts=1_700_000_000_000 + i, id=i.to_bytes(16, "big"), to="GBR-GW1",
                        seq=i).to_bytes()


def write_log(path: Path, count: int, *, signed: int | None = None,
              signer: Signer = SIGNER) -> merkle.MemoryTree:
    """A store of ``count`` entries with their leaf hashes and stored nodes, as the log writes
    them, and a checkpoint of size ``signed`` (default: all) signed by ``signer``."""
    entries = [_entry(i) for i in range(count)]
    tree = merkle.MemoryTree(merkle.leaf_hash(e) for e in entries)
    nodes = [(level, index, tree.get_node(level, index))
             for level in range(merkle.STORED_LEVEL_STEP, count.bit_length(),
                                merkle.STORED_LEVEL_STEP)
             for index in range(count >> level)]
    checkpoints = []
    if signed is None or signed >= 0:
        size = count if signed is None else signed
        text = Checkpoint(signer.name, size, tree.root(size)).to_text()
        checkpoints.append((size, sign_note(text, [signer])))
    store = SqliteStore(path)
    try:
        store.commit(Batch(first_index=0, entries=entries, leaves=[tree.get_node(0, i)
                                                                   for i in range(count)],
                           nodes=nodes, checkpoints=checkpoints))
    finally:
        store.close()
    return tree


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "broker.sqlite"


def _sql(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(path) as conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


def dump(path: Path) -> list[str]:
    """Every table's content, as SQL text (blobs in hex): equal means byte-identical rows."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _opens(store: SqliteStore, keys: Sequence[bytes] = ()) -> AuditLog:
    audit = AuditLog(store, SIGNER, earlier_keys=keys)
    audit.open()
    return audit


def _proofs_verify(audit: AuditLog, tree: merkle.MemoryTree, size: int) -> None:
    """Inclusion and consistency proofs from the repaired store against the signed root."""
    assert audit.latest is not None
    root = Checkpoint.from_text(verify_note(audit.latest.note, [SIGNER.verifier()]).text).root
    assert audit.latest.size == size and root == tree.root(size)
    for index in {0, 3, 17, size // 2, size - 1}:
        merkle.verify_inclusion(index, size, tree.get_node(0, index),
                                audit.inclusion_proof(index, size), root)
    for old in (1, 16, size // 3):
        merkle.verify_consistency(old, size, tree.root(old), root,
                                  audit.consistency_proof(old, size))


# --- derived data damaged: refused at open, repaired, opens and proves -----------------------


def _node(level: int, index: int) -> tuple[str, tuple[object, ...]]:
    return "UPDATE nodes SET hash = ? WHERE level = ? AND idx = ?", (ZERO, level, index)


@pytest.mark.parametrize("damage, field, first", [
    ([_node(4, 2)], "wrong_nodes", [(4, 2)]),
    ([_node(8, 0), _node(4, 17)], "wrong_nodes", [(8, 0), (4, 17)]),  # in completion order
    ([("UPDATE entries SET leaf = ? WHERE idx = 3", (ZERO,))], "wrong_leaves", [3]),
    ([("UPDATE entries SET leaf = x'0102' WHERE idx = 299", ())], "wrong_leaves", [299]),
    ([("UPDATE entries SET leaf = zeroblob(32)", ())], "wrong_leaves", [0, 1, 2, 3, 4]),
    ([("DELETE FROM nodes WHERE level = 4 AND idx IN (0, 5)", ())], "missing_nodes",
     [(4, 0), (4, 5)]),
    ([("DELETE FROM nodes", ())], "missing_nodes", [(4, 0), (4, 1), (4, 2), (4, 3), (4, 4)]),
    ([("INSERT INTO nodes VALUES (8, 1, ?)", (ZERO,))], "superfluous_nodes", [(8, 1)]),
    ([("INSERT INTO nodes VALUES (12, 0, ?)", (ZERO,))], "superfluous_nodes", [(12, 0)]),
])
def test_damaged_derived_rows_are_rebuilt_and_the_log_opens_and_proves(
        path: Path, damage: list[tuple[str, tuple[object, ...]]], field: str,
        first: list[object]) -> None:
    tree = write_log(path, 300)
    _sql(path, *damage)
    with closing(SqliteStore(path)) as store:
        with pytest.raises(LogDamaged):
            _opens(store)
        report = repair_tree(store, SIGNER.name, KEYS)
        assert report.status == "repaired" and report.repaired
        assert getattr(report, field).first == first
        assert (report.entries, report.checkpoint, report.nodes) == (300, 300, 18 + 1)
        _proofs_verify(_opens(store), tree, 300)
        assert repair_tree(store, SIGNER.name, KEYS).status == "clean"


def test_a_leaf_hash_that_is_not_a_blob_is_rebuilt(path: Path) -> None:
    """(``AuditLog.open`` fails on it with a ``TypeError``, from the store's ``bytes()``.)"""
    tree = write_log(path, 40)
    _sql(path, ("UPDATE entries SET leaf = 'text' WHERE idx = 33", ()))
    with closing(SqliteStore(path)) as store:
        assert repair_tree(store, SIGNER.name, KEYS).wrong_leaves.first == [33]
        _proofs_verify(_opens(store), tree, 40)


def test_a_report_counts_every_kind_and_names_the_first_few(path: Path) -> None:
    write_log(path, 300)
    _sql(path, ("UPDATE entries SET leaf = ? WHERE idx >= 290", (ZERO,)), _node(4, 1),
         ("DELETE FROM nodes WHERE level = 8", ()),
         ("INSERT INTO nodes VALUES (3, 0, ?)", (ZERO,)),  # a level no log stores
         ("INSERT INTO nodes VALUES (4, -1, ?)", (ZERO,)),
         ("INSERT INTO nodes VALUES ('x', 2, ?)", (ZERO,)))  # a key that is no integer
    with closing(SqliteStore(path)) as store:
        report = repair_tree(store, SIGNER.name, KEYS)
        _opens(store)
    assert report.to_json() == {
        "status": "repaired", "entries": 300, "checkpoint": 300, "nodes": 19,
        "wrong_leaves": {"count": 10, "first": [290, 291, 292, 293, 294]},
        "wrong_nodes": {"count": 1, "first": [(4, 1)]},
        "missing_nodes": {"count": 1, "first": [(8, 0)]},
        "superfluous_nodes": {"count": 3, "first": [(4, -1), (3, 0), ("'x'", 2)]}}
    assert "10 wrong (290, 291, 292, 293, 294, ...)" in report.summary()
    with sqlite3.connect(path) as conn:
        levels = dict(conn.execute("SELECT level, count(*) FROM nodes GROUP BY level"))
    conn.close()
    assert levels == {4: 18, 8: 1}


def test_a_clean_log_is_left_as_it_is(path: Path) -> None:
    write_log(path, 40)
    before = dump(path)
    with closing(SqliteStore(path)) as store:
        report = repair_tree(store, SIGNER.name, KEYS)
    assert (report.status, report.damaged, report.nodes) == ("clean", False, 2)
    assert "nothing to repair" in report.summary()
    assert dump(path) == before


def test_a_dry_run_reports_and_writes_nothing(path: Path) -> None:
    write_log(path, 40)
    _sql(path, _node(4, 1), ("UPDATE entries SET leaf = ? WHERE idx = 7", (ZERO,)))
    before = dump(path)
    with closing(SqliteStore.open_read_only(path)) as store:
        report = repair_tree(store, SIGNER.name, KEYS, dry_run=True)
    assert (report.status, report.repaired) == ("damaged", False)
    assert (report.wrong_nodes.first, report.wrong_leaves.first) == ([(4, 1)], [7])
    assert "dry run: nothing written" in report.summary()
    assert dump(path) == before
    with closing(SqliteStore(path)) as store, pytest.raises(LogDamaged):
        _opens(store)


# --- the entries or the checkpoint damaged: refused, nothing written ----------------------------


def _other_signer() -> Signer:
    return Signer.from_seed("broker.test", bytes(32))


@pytest.mark.parametrize("count, signed, damage, message", [
    # An entry the checkpoint covers, changed (its leaf hash too, or not): the root says so.
    (40, None, [("UPDATE entries SET data = x'00' WHERE idx = 3", ())],
     "do not hash to the root of the checkpoint of size 40"),
    (40, None, [("UPDATE entries SET data = x'00', leaf = ? WHERE idx = 3",
                 (merkle.leaf_hash(b"\x00"),))], "root of the checkpoint of size 40"),
    # After the checkpoint: its leaf hash disagrees, and so does the stored node above it.
    (60, 40, [("UPDATE entries SET data = x'00' WHERE idx = 45", ())],
     "entry 45 does not match its recorded leaf hash, it is after the last signed checkpoint "
     r"\(size 40\), and the stored tree node above it does not confirm"),
    # After the checkpoint, in the group of 16 no stored node covers yet.
    (60, 40, [("UPDATE entries SET leaf = ? WHERE idx = 50", (ZERO,))], "entry 50 does not"),
    # The node above is itself damaged: which of the two records is right cannot be told.
    (60, 40, [("UPDATE entries SET leaf = ? WHERE idx = 45", (ZERO,)), _node(4, 2)],
     "entry 45 does not"),
    (60, -1, [("UPDATE entries SET leaf = ? WHERE idx = 5", (ZERO,)), _node(4, 0)],
     "entry 5 does not .* no checkpoint was signed"),
    (40, None, [("DELETE FROM entries WHERE idx = 5", ())],
     r"entry 5 is missing from the store \(the next one stored is 6\)"),
    (40, None, [("DELETE FROM entries WHERE idx >= 30", ())],
     "30 audit entries but a checkpoint of size 40 was signed: entries were lost"),
    (40, None, [("UPDATE entries SET data = 'text' WHERE idx = 9", ())], "entry 9 is not a blob"),
    (40, None, [("UPDATE checkpoints SET note = replace(note, 'broker.test', 'broker.else')",
                 ())], "checkpoint does not verify with this broker's key"),
])
def test_damaged_entries_are_refused_and_nothing_is_written(
        path: Path, count: int, signed: int | None,
        damage: list[tuple[str, tuple[object, ...]]], message: str) -> None:
    write_log(path, count, signed=signed)
    _sql(path, _node(4, 1), *damage)  # with derived damage that would be repaired
    before = dump(path)
    with closing(SqliteStore(path)) as store:
        with pytest.raises(RepairRefused, match=f"{message}.*; nothing was written") as refused:
            repair_tree(store, SIGNER.name, KEYS)
        assert refused.value.code == "log_damaged"
    assert dump(path) == before


def test_a_checkpoint_signed_with_another_key_is_refused(path: Path) -> None:
    write_log(path, 40, signer=_other_signer())
    _sql(path, _node(4, 1))
    before = dump(path)
    with closing(SqliteStore(path)) as store, pytest.raises(RepairRefused, match="not verify"):
        repair_tree(store, SIGNER.name, KEYS)
    assert dump(path) == before


def test_a_checkpoint_of_another_log_is_refused(path: Path) -> None:
    write_log(path, 40, signer=Signer.from_seed("broker.other", bytes(range(32))))
    with closing(SqliteStore(path)) as store, pytest.raises(RepairRefused, match="not verify"):
        repair_tree(store, "broker.other.two", KEYS)


def test_a_checkpoint_signed_with_the_key_before_a_rotation_is_accepted(path: Path) -> None:
    """As at start: the broker's earlier key (from the bundle it last ran under) verifies it."""
    old = _other_signer()
    tree = write_log(path, 40, signer=old)
    _sql(path, _node(4, 1))
    with closing(SqliteStore(path)) as store:
        report = repair_tree(store, SIGNER.name, [*KEYS, old.verifier().public_key])
        assert report.repaired
        audit = _opens(store, [old.verifier().public_key])
        assert audit.root(40) == tree.root(40)


def test_entries_after_the_checkpoint_are_rebuilt_when_their_records_agree(path: Path) -> None:
    """A leaf hash after the checkpoint is rewritten when the stored node over its group of 16
    confirms its entry's bytes; a damaged node there is rebuilt from leaves that match."""
    tree = write_log(path, 60, signed=40)
    _sql(path, ("UPDATE entries SET leaf = ? WHERE idx = 45", (ZERO,)), _node(4, 1))
    with closing(SqliteStore(path)) as store:
        report = repair_tree(store, SIGNER.name, KEYS)
        assert (report.wrong_leaves.first, report.wrong_nodes.first) == ([45], [(4, 1)])
        audit = _opens(store)
        assert audit.root(60) == tree.root(60)


def test_a_log_without_a_checkpoint_is_checked_against_its_recorded_hashes(path: Path) -> None:
    tree = write_log(path, 40, signed=-1)
    _sql(path, ("UPDATE entries SET leaf = ? WHERE idx = 20", (ZERO,)), _node(4, 0))
    with closing(SqliteStore(path)) as store:
        report = repair_tree(store, SIGNER.name, KEYS)
        assert (report.checkpoint, report.wrong_leaves.first) == (None, [20])
        assert "no signed checkpoint" in report.summary()
        assert _opens(store).root(40) == tree.root(40)


# --- one transaction ----------------------------------------------------------------------------


def test_a_write_failing_part_way_leaves_the_store_as_it_was(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_log(path, 300)
    _sql(path, ("UPDATE entries SET leaf = ? WHERE idx IN (3, 200)", (ZERO,)), _node(4, 2),
         ("INSERT INTO nodes VALUES (8, 1, ?)", (ZERO,)))
    before = dump(path)
    written: list[int] = []
    real = sqlite_repair.TreeRows.write_nodes

    def fail_on_the_third_chunk(self: sqlite_repair.TreeRows,
                                nodes: Sequence[tuple[int, int, bytes]]) -> None:
        written.append(len(nodes))
        if len(written) == 3:
            raise StorageError("disk gone")
        real(self, nodes)

    monkeypatch.setattr(sqlite_repair.TreeRows, "write_nodes", fail_on_the_third_chunk)
    with closing(SqliteStore(path)) as store:
        with pytest.raises(StorageError, match="disk gone"):
            repair_tree(store, SIGNER.name, KEYS, chunk=64)
        assert written == [4, 4, 4]  # two chunks' nodes (and the first leaf) were written
        assert dump(path) == before
        monkeypatch.undo()
        assert repair_tree(store, SIGNER.name, KEYS, chunk=64).repaired
        _opens(store)


def test_a_closed_connection_fails_the_repair_and_changes_nothing(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection itself fails between the rewrite's statements (SQLite's error, mapped)."""
    write_log(path, 300)
    _sql(path, _node(4, 2))
    before = dump(path)
    real = sqlite_repair.TreeRows.write_leaves

    def close_then_write(self: sqlite_repair.TreeRows, leaves: Sequence[tuple[bytes, int]]) -> None:
        self._conn.close()  # the failure under test
        real(self, leaves)

    monkeypatch.setattr(sqlite_repair.TreeRows, "write_leaves", close_then_write)
    with closing(SqliteStore(path)) as store, pytest.raises(StorageError, match="write failed"):
        repair_tree(store, SIGNER.name, KEYS)
    assert dump(path) == before


# --- the broker must be stopped -----------------------------------------------------------------


def test_a_live_broker_pid_refuses(tmp_path: Path) -> None:
    (tmp_path / "broker.pid").write_text(f"{os.getpid()}\n")
    with pytest.raises(BrokerRunning, match="runs on"):
        verify_broker_stopped(tmp_path)


def test_a_stale_pid_file_or_none_does_not_refuse(tmp_path: Path) -> None:
    verify_broker_stopped(tmp_path)  # no PID file
    (tmp_path / "broker.pid").write_text(f"{_dead_pid()}\n")
    verify_broker_stopped(tmp_path)


@pytest.mark.parametrize("content", ["", "0\n", "-1\n", "broker\n"])
def test_a_pid_file_without_a_process_id_refuses(tmp_path: Path, content: str) -> None:
    (tmp_path / "broker.pid").write_text(content)
    with pytest.raises(BrokerRunning, match="holds no process id"):
        verify_broker_stopped(tmp_path)


def _dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid
