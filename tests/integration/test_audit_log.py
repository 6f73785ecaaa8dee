"""The audit log on a real SQLite store: group commit, proofs, checkpoints, restart, damage."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.audit import merkle
from broker.audit.commit_policy import CommitPolicy
from broker.audit.leaves import DeliverEntry, PolicyEntry, RouteEntry, entry_from_bytes
from broker.audit.log import AuditLog, LogDamaged
from broker.audit.note import Checkpoint, Signer, verify_note
from broker.errors import StorageError
from broker.store.base import QueueRow
from broker.store.sqlite import SqliteStore
from clients.gateway import label
from policies.decide import Decision
from tests.unit.test_store_sqlite import v3_store

SEED = bytes(range(32))
FAST = CommitPolicy(max_batch=64, max_delay_s=0.001, checkpoint_interval_s=0.01)


def _signer() -> Signer:
    return Signer.from_seed("broker.test", SEED)


def _log(path: Path, policy: CommitPolicy = FAST) -> AuditLog:
    return AuditLog(SqliteStore(path / "broker.sqlite"), _signer(), policy=policy)


def _entry(i: int) -> DeliverEntry:
    return DeliverEntry(ts=1_700_000_000_000 + i, id=i.to_bytes(16, "big"), to="GBR-GW1", seq=i)


async def _append_many(audit: AuditLog, count: int, start: int = 0) -> list[int]:
    futures = [audit.append(_entry(start + i)) for i in range(count)]
    return list(await asyncio.gather(*futures))


async def test_entries_get_consecutive_indexes_in_append_order(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    await audit.start()
    try:
        indexes = await _append_many(audit, 300)
    finally:
        await audit.stop()
    assert indexes == list(range(300))
    stored = audit.store.entries(0, 300)
    assert [entry_from_bytes(e) for e in stored] == [_entry(i) for i in range(300)]


async def test_checkpoint_is_signed_over_durable_entries_and_proofs_verify(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    await audit.start()
    try:
        await _append_many(audit, 37)
        for _ in range(100):
            if audit.latest is not None and audit.latest.size == 37:
                break
            await asyncio.sleep(0.01)
        assert audit.latest is not None and audit.latest.size == 37
        checkpoint = Checkpoint.from_text(verify_note(audit.latest.note, [audit.verifier]).text)
        leaves = [merkle.leaf_hash(e) for e in audit.store.entries(0, 37)]
        assert checkpoint.root == merkle.root_hash(leaves)
        for index in (0, 17, 36):
            proof = audit.inclusion_proof(index, 37)
            merkle.verify_inclusion(index, 37, leaves[index], proof, checkpoint.root)
        old_root = merkle.root_hash(leaves[:10])
        merkle.verify_consistency(10, 37, old_root, checkpoint.root,
                                  audit.consistency_proof(10, 37))
    finally:
        await audit.stop()


async def test_restart_continues_the_same_tree(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    await audit.start()
    await _append_many(audit, 20)
    await audit.stop()
    assert audit.latest is not None and audit.latest.size == 20

    again = _log(tmp_path)
    again.open()
    assert again.size == 20
    await again.start()
    assert await _append_many(again, 5, start=20) == list(range(20, 25))
    await again.stop()
    leaves = [merkle.leaf_hash(e) for e in again.store.entries(0, 25)]
    assert again.root(25) == merkle.root_hash(leaves)
    assert again.root(20) == Checkpoint.from_text(
        verify_note(audit.latest.note, [audit.verifier]).text).root


async def _closed_log_of(tmp_path: Path, count: int) -> Path:
    audit = _log(tmp_path)
    await audit.start()
    await _append_many(audit, count)
    await audit.stop()
    audit.store.close()
    return tmp_path / "broker.sqlite"


@pytest.mark.parametrize("damage, message", [
    ("UPDATE entries SET data = ? WHERE idx = 3", "entry 3 does not match its stored leaf"),
    ("DELETE FROM entries WHERE idx = 4", "entry 4 is missing"),
    ("DELETE FROM entries WHERE idx >= 8", "entries were lost"),
    ("UPDATE entries SET leaf = 'hand-edited' WHERE idx = 5",
     "entry 5 does not match its stored leaf"),  # text, not a blob: refused, not a TypeError
])
async def test_start_refuses_a_log_that_does_not_extend_its_checkpoint(
        tmp_path: Path, damage: str, message: str) -> None:
    path = await _closed_log_of(tmp_path, 10)
    with sqlite3.connect(path) as conn:
        conn.execute(damage, (_entry(99).to_bytes(),) if "?" in damage else ())
    with pytest.raises(LogDamaged, match=message):
        _log(tmp_path).open()


def _rewrite(conn: sqlite3.Connection, index: int) -> None:
    """Rewrite an entry and its recorded leaf hash, consistently."""
    forged = _entry(99).to_bytes()
    conn.execute("UPDATE entries SET data = ?, leaf = ? WHERE idx = ?",
                 (forged, merkle.leaf_hash(forged), index))


async def test_start_refuses_a_consistently_rewritten_log(tmp_path: Path) -> None:
    """Entry, its leaf hash and the stored node above it all rewritten: only the signed
    checkpoint root can tell (the reason given first)."""
    path = await _closed_log_of(tmp_path, 40)
    with sqlite3.connect(path) as conn:
        _rewrite(conn, 2)
        leaves = [bytes(h) for (h,) in conn.execute("SELECT leaf FROM entries ORDER BY idx")]
        conn.execute("UPDATE nodes SET hash = ? WHERE level = 4 AND idx = 0",
                     (merkle.root_hash(leaves[:16]),))
    with pytest.raises(LogDamaged, match="root of the checkpoint of size 40"):
        _log(tmp_path).open()


def _rewrite_an_entry(conn: sqlite3.Connection) -> None:
    _rewrite(conn, 20)


def _damage_a_node(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE nodes SET hash = ? WHERE level = 4 AND idx = 2", (bytes(32),))


def _put_text_in_a_node(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE nodes SET hash = 'hand-edited' WHERE level = 4 AND idx = 2")


def _store_a_node_beyond(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO nodes VALUES (8, 0, ?)", (bytes(32),))


@pytest.mark.parametrize("damage, message", [
    (_rewrite_an_entry, "node over entries 16 to 31 does not match"),
    (_damage_a_node, "node over entries 32 to 47 does not match"),
    (_put_text_in_a_node, "node over entries 32 to 47 does not match"),
    (_store_a_node_beyond, r"stored beyond the entries \(level 8, index 0\)"),
])
async def test_start_checks_the_stored_nodes_beyond_the_last_checkpoint(
        tmp_path: Path, damage: Callable[[sqlite3.Connection], None], message: str) -> None:
    """Entries no checkpoint covers (here: none does) are checked against the stored nodes
    too, not only their own leaf hashes; a node stored where the log has not reached would
    fail the commit that reaches it."""
    path = await _closed_log_of(tmp_path, 50)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM checkpoints")
        damage(conn)
    with pytest.raises(LogDamaged, match=message):
        _log(tmp_path).open()


async def test_the_store_keeps_every_fourth_level_and_proofs_match_a_full_tree(
        tmp_path: Path) -> None:
    path = await _closed_log_of(tmp_path, 300)
    with sqlite3.connect(path) as conn:
        levels = dict(conn.execute("SELECT level, count(*) FROM nodes GROUP BY level"))
    assert levels == {4: 300 // 16, 8: 1}
    audit = _log(tmp_path)
    audit.open()  # after a restart: only the right edge is in memory
    full = merkle.MemoryTree(merkle.leaf_hash(e) for e in audit.store.entries(0, 300))
    for size in (1, 16, 17, 255, 256, 257, 299, 300):
        assert audit.root(size) == full.root(size)
        for index in {i for i in (0, 1, 15, 16, size // 2, size - 1) if i < size}:
            assert audit.inclusion_proof(index, size) == full.inclusion_proof(index, size)
        for old in {o for o in (1, 7, 16, size // 3 or 1, size) if o <= size}:
            assert audit.consistency_proof(old, size) == full.consistency_proof(old, size)
    audit.store.close()


async def test_a_log_written_by_a_schema_3_broker_opens_and_proves_the_same(
        tmp_path: Path) -> None:
    """Every complete node, leaves included, in ``nodes`` (schema 3): upgraded in place, the
    log rebuilds, checks the kept nodes, and answers as before; it grows on from there."""
    entries = [_entry(i).to_bytes() for i in range(70)]
    full = merkle.MemoryTree(merkle.leaf_hash(e) for e in entries)
    every_node = [(level, index, full.get_node(level, index))
                  for level in range(7) for index in range(70 >> level)]
    v3_store(tmp_path / "broker.sqlite", entries, every_node)
    audit = _log(tmp_path)
    audit.open()
    assert audit.size == 70
    for index, size in ((0, 70), (33, 64), (69, 70), (17, 40)):
        assert audit.inclusion_proof(index, size) == full.inclusion_proof(index, size)
    assert audit.consistency_proof(20, 70) == full.consistency_proof(20, 70)
    await audit.start()
    await _append_many(audit, 30, start=70)
    await audit.stop()
    full = merkle.MemoryTree(merkle.leaf_hash(e) for e in audit.store.entries(0, 100))
    assert audit.root(100) == full.root()
    assert audit.inclusion_proof(5, 100) == full.inclusion_proof(5, 100)
    audit.store.close()


async def test_a_proof_over_a_missing_stored_node_is_a_storage_error(tmp_path: Path) -> None:
    path = await _closed_log_of(tmp_path, 40)
    audit = _log(tmp_path)
    audit.open()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM entries WHERE idx = 17")
    with pytest.raises(StorageError, match=r"lacks tree nodes \[16, 18\) at level 0"):
        audit.inclusion_proof(18, 20)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM nodes WHERE level = 4 AND idx = 0")
    with pytest.raises(StorageError, match=r"lacks tree nodes \[0, 1\) at level 4"):
        audit.inclusion_proof(20, 40)
    audit.store.close()


async def test_start_refuses_a_checkpoint_signed_by_another_key(tmp_path: Path) -> None:
    await _closed_log_of(tmp_path, 3)
    other = AuditLog(SqliteStore(tmp_path / "broker.sqlite"), Signer.generate("broker.test"))
    with pytest.raises(LogDamaged, match="does not verify"):
        other.open()


class _FailingStore(SqliteStore):
    fail = False

    def commit(self, batch):  # type: ignore[no-untyped-def]
        if self.fail and batch.entries:
            raise StorageError("commit failed: [Errno 28] No space left on device")
        super().commit(batch)


@pytest.mark.parametrize("thread_min_entries", [1, 1000], ids=["in-a-thread", "on-the-loop"])
async def test_failed_commit_stops_intake_and_writes_nothing_half(
        tmp_path: Path, thread_min_entries: int) -> None:
    store = _FailingStore(tmp_path / "broker.sqlite")
    policy = dataclasses.replace(FAST, thread_min_entries=thread_min_entries)
    audit = AuditLog(store, _signer(), policy=policy)
    await audit.start()
    try:
        await _append_many(audit, 5)
        store.fail = True
        futures = [audit.append(_entry(5 + i)) for i in range(3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, StorageError) for r in results)
        with pytest.raises(StorageError, match="stopped"):
            audit.append(_entry(9))
    finally:
        await audit.stop()
    assert store.size() == 5
    assert SqliteStore(tmp_path / "broker.sqlite").size() == 5


async def test_queue_rows_commit_with_their_entry_and_leave_with_the_ack(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    await audit.start()
    row = QueueRow("USA-GW2", 1, 3, b"\x01" * 16, "GBR-GW1", b"envelope", 10**13, 10**12)
    try:
        await audit.append(PolicyEntry(ts=1, bundle=b"\x02" * 32), enqueue=[row],
                           bundles=[(b"\x02" * 32, b"content")])
        assert audit.store.queue_rows() == [row]
        assert audit.store.bundle(b"\x02" * 32) == b"content"
        await audit.append(_entry(1), dequeue=[("USA-GW2", 1)])
        assert audit.store.queue_rows() == []
    finally:
        await audit.stop()


@pytest.mark.parametrize("queued, last_requests, waits", [
    (0, 100, False),    # nothing to commit
    (1, 0, False),      # idle log: commit at once
    (1, 15, False),     # light load: commit at once
    (1, 16, True),      # busy: let the batch fill
    (63, 500, True),
    (64, 500, False),   # a full batch never waits
])
def test_the_writer_waits_for_a_batch_only_when_busy(queued: int, last_requests: int,
                                                      waits: bool) -> None:
    assert FAST.wait_to_fill(queued, last_requests) is waits


async def test_a_lone_append_is_not_held_for_the_commit_delay(tmp_path: Path) -> None:
    # A delay no test could sit out: if the writer waited for a batch to fill while idle,
    # the append would not be durable within the bound.
    audit = _log(tmp_path, CommitPolicy(max_batch=64, max_delay_s=60.0,
                                        checkpoint_interval_s=0.05))
    await audit.start()
    try:
        assert await asyncio.wait_for(audit.append(_entry(0)), timeout=10) == 0
    finally:
        await audit.stop()


async def test_a_busy_log_waits_for_the_batch_to_fill(tmp_path: Path) -> None:
    policy = CommitPolicy(max_batch=64, max_delay_s=0.3, checkpoint_interval_s=0.05,
                          busy_requests=12)
    audit = _log(tmp_path, policy)
    await audit.start()
    try:
        await _append_many(audit, 20)  # 20 requests committed at once, in one batch: busy
        loop = asyncio.get_running_loop()
        started = loop.time()
        later = [audit.append(_entry(100))]
        await asyncio.sleep(0.05)
        later.append(audit.append(_entry(101)))  # joins the batch that is filling
        assert await asyncio.gather(*later) == [20, 21]
        assert loop.time() - started >= 0.25  # sleep() never wakes early
    finally:
        await audit.stop()


async def test_one_request_of_many_entries_does_not_make_the_log_busy(tmp_path: Path) -> None:
    # The acks of one frame are one request: 20 entries, yet the next lone append must not
    # sit out a fill delay no test could wait for.
    audit = _log(tmp_path, CommitPolicy(max_batch=64, max_delay_s=60.0,
                                        checkpoint_interval_s=0.05, busy_requests=2))
    await audit.start()
    try:
        assert await audit.append_all([_entry(i) for i in range(20)]) == 0
        assert await asyncio.wait_for(audit.append(_entry(20)), timeout=10) == 20
    finally:
        await audit.stop()


LAZY = CommitPolicy(max_batch=64, max_delay_s=0.001, checkpoint_interval_s=0.05,
                    lazy_delay_s=0.2)


async def test_a_lazy_request_alone_is_committed_after_its_delay(tmp_path: Path) -> None:
    audit = _log(tmp_path, LAZY)
    await audit.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        lazy = audit.append_all([_entry(0), _entry(1)], lazy=True)
        assert await asyncio.wait_for(lazy, timeout=10) == 0
        assert loop.time() - started >= 0.2  # waited for company (sleep never wakes early)
        assert [index for index, _ in audit.store.iter_entries()] == [0, 1]
    finally:
        await audit.stop()


async def test_a_lazy_request_rides_with_the_next_urgent_one_in_order(tmp_path: Path) -> None:
    # A lazy delay no test could sit out: both must be durable once the urgent one is.
    audit = _log(tmp_path, dataclasses.replace(LAZY, lazy_delay_s=60.0))
    await audit.start()
    try:
        lazy = audit.append_all([_entry(0), _entry(1)], lazy=True)
        await asyncio.sleep(0.05)  # the writer has seen the lazy request and gone back to sleep
        assert not lazy.done()
        urgent = await asyncio.wait_for(audit.append(_entry(2)), timeout=10)
        assert lazy.done() and lazy.result() == 0 and urgent == 2
    finally:
        await audit.stop()


async def test_stop_commits_lazy_requests_at_once(tmp_path: Path) -> None:
    audit = _log(tmp_path, dataclasses.replace(LAZY, lazy_delay_s=60.0))
    await audit.start()
    lazy = audit.append_all([_entry(0)], lazy=True)
    await asyncio.wait_for(audit.stop(), timeout=10)
    assert lazy.result() == 0
    latest = audit.store.latest_checkpoint()
    assert latest is not None and latest.size == 1  # and the final checkpoint covers it


def _route(i: int, ts: int) -> RouteEntry:
    return RouteEntry(ts=ts, id=bytes([i]) * 16, env=b"\x02" * 32, sender="USA-GW1",
                      topic="maritime.tracks", label=label("NATO", "SECRET", "USA", ["GBR"]),
                      prec=0, ttl=60, bundle=b"\x03" * 32, sealed=("GBR-GW1",),
                      decisions={"GBR-GW1": Decision(True, (), "CORE@1/inner")})


@pytest.mark.parametrize("chunk", [1, 2, 3, 4096])
async def test_recent_routes_reads_back_to_the_horizon_in_log_order(
        tmp_path: Path, chunk: int) -> None:
    audit = _log(tmp_path)
    await audit.start()
    try:
        # Old routes, then a deliver entry and routes inside the window (one a few ms out of
        # clock order, as two publishes committed together can be).
        deliver = DeliverEntry(ts=3_000, id=b"\x01" * 16, to="GBR-GW1", seq=1)
        for entry in (_route(1, 1_000), _route(2, 2_000), deliver, _route(4, 5_000),
                      _route(5, 5_200), _route(6, 5_100)):
            await audit.append(entry)
        recent = audit.recent_routes(5_000, chunk=chunk)
        assert recent == [(bytes([4]) * 16, 5_000), (bytes([5]) * 16, 5_200),
                          (bytes([6]) * 16, 5_100)]
        # The newest entry is older than the horizon, the one before it is not.
        assert audit.recent_routes(5_150, chunk=chunk) == [(bytes([5]) * 16, 5_200)]
        assert audit.recent_routes(1_500, chunk=chunk)[0] == (bytes([2]) * 16, 2_000)
        assert audit.recent_routes(10_000, chunk=chunk) == []
    finally:
        await audit.stop()


async def test_a_commit_of_lazy_requests_does_not_make_the_log_busy(tmp_path: Path) -> None:
    # Five lazy requests committed together; an urgent append after them must not sit out a
    # fill delay no test could wait for (only requests somebody waits for count as busy).
    audit = _log(tmp_path, CommitPolicy(max_batch=64, max_delay_s=60.0,
                                        checkpoint_interval_s=0.05, busy_requests=2,
                                        lazy_delay_s=0.01))
    await audit.start()
    try:
        lazy = [audit.append_all([_entry(i)], lazy=True) for i in range(5)]
        assert await asyncio.wait_for(asyncio.gather(*lazy), timeout=10) == [0, 1, 2, 3, 4]
        assert await asyncio.wait_for(audit.append(_entry(5)), timeout=10) == 5
    finally:
        await audit.stop()


class _HoldingStore(SqliteStore):
    """Records the thread of every commit with entries; holds large ones until released."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[tuple[int, int]] = []  # (thread ident, entries)
        self.release = threading.Event()

    def commit(self, batch):  # type: ignore[no-untyped-def]
        if batch.entries:
            self.commits.append((threading.get_ident(), len(batch.entries)))
            if len(batch.entries) >= 8:
                self.release.wait(30)
        super().commit(batch)


async def test_a_large_batch_commits_in_a_thread_while_the_loop_goes_on(tmp_path: Path) -> None:
    store = _HoldingStore(tmp_path / "broker.sqlite")
    audit = AuditLog(store, _signer(), policy=dataclasses.replace(FAST, thread_min_entries=8))
    await audit.start()
    try:
        assert await asyncio.wait_for(audit.append(_entry(0)), timeout=10) == 0
        big = audit.append_all([_entry(i) for i in range(1, 9)])
        for _ in range(2000):  # the loop runs while the big commit is held in its thread
            await asyncio.sleep(0.005)
            if len(store.commits) == 2:
                break
        assert len(store.commits) == 2 and not big.done()
        assert store.size() == 1 and audit.size == 1  # not durable, not counted, until it returns
        store.release.set()
        assert await asyncio.wait_for(big, timeout=10) == 1
        assert await asyncio.wait_for(audit.append(_entry(9)), timeout=10) == 9
    finally:
        store.release.set()
        await audit.stop()
    loop_thread = threading.get_ident()
    assert [(t == loop_thread, n) for t, n in store.commits] == [(True, 1), (False, 8), (True, 1)]
    assert store.size() == 10


async def test_a_writer_cancelled_during_a_threaded_commit_reports_it_durable(
        tmp_path: Path) -> None:
    """The commit cannot be stopped once it runs: a cancelled stop() waits for it, and the
    batch's future says it is durable, which it is."""
    store = _HoldingStore(tmp_path / "broker.sqlite")
    audit = AuditLog(store, _signer(), policy=dataclasses.replace(FAST, thread_min_entries=8))
    await audit.start()
    big = audit.append_all([_entry(i) for i in range(8)])
    for _ in range(2000):
        await asyncio.sleep(0.005)
        if store.commits:
            break
    assert store.commits and not big.done()
    stopping = asyncio.create_task(audit.stop())
    await asyncio.sleep(0.01)
    threading.Timer(0.2, store.release.set).start()  # the loop is blocked once cancelled
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert big.done() and big.result() == 0
    assert store.size() == 8
    assert audit.failed is not None and "writer was cancelled" in audit.failed.reason
    with pytest.raises(StorageError, match="writer was cancelled"):
        audit.append(_entry(8))
