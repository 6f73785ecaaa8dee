"""Batches written with many rows per statement (``broker/store/sqlite_write.py``): every row
lands, a failure in a later statement still writes nothing, and a large batch takes a handful
of statements (each one a GIL re-take for a commit beside the event loop), not one per row."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.audit.merkle import leaf_hash
from broker.errors import StorageError
from broker.store import sqlite_write
from broker.store.base import Batch, QueueRow
from broker.store.sqlite import SqliteStore

RECIPIENTS = ("FRA-GW1", "GBR-GW1", "DEU-GW1")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "broker.sqlite")
    yield opened
    opened.close()


def _entries(first: int, count: int) -> Batch:
    data = [f"entry {first + i}".encode() * 7 for i in range(count)]
    return Batch(first_index=first, entries=data, leaves=[leaf_hash(d) for d in data])


def _rows(messages: int, first_seq: int = 1) -> list[QueueRow]:
    """Each message to two of the three recipients, as the throughput benchmark sends them."""
    rows = []
    seq = first_seq
    for m in range(messages):
        for recipient in (RECIPIENTS[m % 3], RECIPIENTS[(m + 1) % 3]):
            rows.append(QueueRow(recipient, seq, m % 4, m.to_bytes(16, "big"), "USA-GW1",
                                 b"envelope %d " % m * 80, 10**13 + m, 10**12 + m))
            seq += 1
    return rows


def _statements(store: SqliteStore) -> list[str]:
    """Every statement the store's write connection runs from now on. A trigger's runs
    (inside the step that fired them) are traced again with the firing statement's text:
    repeats in a row are one statement (two real ones differ in their bound values)."""
    seen: list[str] = []

    def trace(sql: str) -> None:
        if not seen or seen[-1] != sql:
            seen.append(sql)

    assert store._writer is not None
    store._writer.set_trace_callback(trace)
    return seen


@given(st.integers(0, 3000), st.sampled_from([1, 2, 32, 128, 256]))
def test_chunks_cover_every_row_once_in_powers_of_two(total: int, most: int) -> None:
    chunks = list(sqlite_write._chunks(total, most))
    assert [start for start, _ in chunks] == [sum(c for _, c in chunks[:i])
                                             for i in range(len(chunks))]
    assert sum(count for _, count in chunks) == total
    assert all(count & (count - 1) == 0 and 0 < count <= most for _, count in chunks)
    # Greedy: full statements first, then the remainder's binary digits.
    assert len(chunks) == total // most + bin(total % most).count("1")


def test_statements_stay_within_the_connections_parameter_limit(tmp_path: Path) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        assert sqlite_write._rows_per_statement(conn, 6) == sqlite_write.ROWS_PER_STATEMENT
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)  # SQLite before 3.32
        for width in range(1, 9):
            assert sqlite_write._rows_per_statement(conn, width) * width + 1 <= 999
        assert sqlite_write._rows_per_statement(conn, 6) == 128
    finally:
        conn.close()
    # And a store on such a connection writes a large batch all the same.
    low = SqliteStore(tmp_path / "low.sqlite")
    try:
        assert low._writer is not None
        low._writer.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        batch = _entries(0, 700)
        batch.enqueue = _rows(300)
        low.commit(batch)
        assert low.size() == 700 and len(low.queue_rows()) == 600
    finally:
        low.close()


def test_a_large_batch_writes_every_row_in_a_few_statements(store: SqliteStore) -> None:
    rows = _rows(700)
    batch = _entries(0, 1027)
    batch.nodes = [(2, i, leaf_hash(b"node %d" % i)) for i in range(257)]
    batch.enqueue = rows
    statements = _statements(store)
    store.commit(batch)
    assert store.entries(0, 1027) == batch.entries
    assert store.nodes(0, 0, 1027) == batch.leaves
    assert store.nodes(2, 0, 257) == [h for _, _, h in batch.nodes]
    assert store.queue_rows() == sorted(rows, key=lambda r: (r.recipient, r.seq))
    assert store.seq_high() == 1400
    # 1,027 entries, 257 nodes, 700 messages and 1,400 queue rows: a row per statement
    # would be 3,384 steps.
    assert len(statements) <= 40


def test_acks_of_many_recipients_delete_exactly_their_rows(store: SqliteStore) -> None:
    rows = _rows(600)
    store.commit(Batch(enqueue=rows))
    acked = [(r.recipient, r.seq) for r in rows if r.seq % 3 != 0]
    statements = _statements(store)
    store.commit(Batch(dequeue=acked))
    left = [r for r in rows if (r.recipient, r.seq) not in set(acked)]
    assert store.queue_rows() == sorted(left, key=lambda r: (r.recipient, r.seq))
    # 800 acks: 400 of DEU-GW1's rows, 200 each of FRA-GW1's and GBR-GW1's.
    assert left and len(acked) == 800
    # One `seq IN (…)` per recipient and power-of-two chunk of at most 256 (400 = 256 + 128 +
    # 16; 200 = 128 + 64 + 8), plus BEGIN and COMMIT; a statement per row would be 800.
    assert len(statements) == 3 + 3 + 3 + 2
    # A message goes with its last queue row (the trigger runs inside the one statement).
    envelopes = store.queued_envelopes("FRA-GW1", [r.seq for r in left
                                                   if r.recipient == "FRA-GW1"])
    assert len(envelopes) == sum(r.recipient == "FRA-GW1" for r in left)
    conn = sqlite3.connect(store.path)
    try:
        (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    finally:
        conn.close()
    assert messages == len({r.id for r in left})


def test_a_conflict_in_a_later_statement_writes_nothing(store: SqliteStore) -> None:
    store.commit(_entries(0, 300))
    # The entries (two statements) are written before the nodes' statement fails on a
    # duplicate key: the rollback must take them back too.
    batch = _entries(300, 257)
    batch.enqueue = _rows(2)
    batch.nodes = [(2, 0, b"\x00" * 32)] * 2
    with pytest.raises(StorageError, match="commit failed"):
        store.commit(batch)
    assert store.size() == 300
    assert store.queue_rows() == []
    store.commit(_entries(300, 1))  # the store still works
    assert store.size() == 301
