"""Per-recipient queues (broker/delivery.py): precedence, FIFO, window, acks, requeue."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.delivery import RecipientQueue

ROUTINE, PRIORITY, IMMEDIATE, FLASH = 0, 1, 2, 3


def _queue(precs: list[int], window: int = 64) -> RecipientQueue:
    queue = RecipientQueue(window=window)
    for i, prec in enumerate(precs):
        queue.push(message_id=i.to_bytes(2, "big") * 8, sender="GBR-GW1", envelope=b"env %d" % i,
                   prec=prec, expires_ms=1000 + i)
    return queue


def _ids(items: list) -> list[int]:  # type: ignore[type-arg]
    return [int.from_bytes(item.message_id[:2], "big") for item in items]


@pytest.mark.parametrize("window", [0, -1])
def test_window_must_be_positive(window: int) -> None:
    with pytest.raises(ValueError):
        RecipientQueue(window=window)


def test_push_numbers_messages_from_one_and_keeps_their_fields() -> None:
    queue = RecipientQueue()
    first = queue.push(message_id=b"a" * 16, sender="GBR-GW1", envelope=b"E", prec=FLASH,
                       expires_ms=99)
    second = queue.push(message_id=b"b" * 16, sender="USA-GW1", envelope=b"F", prec=ROUTINE,
                        expires_ms=100)
    assert (first.seq, second.seq) == (1, 2)
    assert (first.message_id, first.sender, first.envelope, first.expires_ms) == (
        b"a" * 16, "GBR-GW1", b"E", 99)
    assert queue.depth == 2


@pytest.mark.parametrize(
    ("precs", "order"),
    [
        ([ROUTINE, ROUTINE, ROUTINE], [0, 1, 2]),
        ([ROUTINE, FLASH], [1, 0]),
        ([ROUTINE, PRIORITY, IMMEDIATE, FLASH], [3, 2, 1, 0]),
        ([FLASH, IMMEDIATE, PRIORITY, ROUTINE], [0, 1, 2, 3]),
        ([ROUTINE, FLASH, ROUTINE, FLASH, PRIORITY], [1, 3, 4, 0, 2]),
        ([IMMEDIATE, ROUTINE, IMMEDIATE, FLASH, ROUTINE, IMMEDIATE], [3, 0, 2, 5, 1, 4]),
    ],
)
def test_precedence_first_then_fifo(precs: list[int], order: list[int]) -> None:
    assert _ids(_queue(precs).take_sendable()) == order


def test_flash_is_never_stuck_behind_a_routine_backlog() -> None:
    queue = _queue([ROUTINE] * 500 + [FLASH], window=1)
    assert _ids(queue.take_sendable()) == [500]


def test_window_bounds_what_is_in_flight() -> None:
    queue = _queue([ROUTINE] * 5, window=2)
    first = queue.take_sendable()
    assert _ids(first) == [0, 1]
    assert queue.take_sendable() == []
    assert queue.depth == 5
    assert queue.ack([first[0].seq]) == [first[0]]
    assert _ids(queue.take_sendable()) == [2]
    assert queue.take_sendable() == []


def test_ack_frees_the_window_and_reduces_depth() -> None:
    queue = _queue([ROUTINE] * 3, window=3)
    items = queue.take_sendable()
    assert all(queue.is_in_flight(item.seq) for item in items)
    assert queue.ack([item.seq for item in items]) == items
    assert queue.depth == 0
    assert not any(queue.is_in_flight(item.seq) for item in items)


@pytest.mark.parametrize(
    "seqs",
    [[99], [0], [-1], [3], [1, 1], [1, 99, 1]],
    ids=["unknown", "zero", "negative", "pending-not-sent", "duplicate", "mixed"],
)
def test_ack_of_unknown_or_unsent_seqs_is_ignored(seqs: list[int]) -> None:
    queue = _queue([ROUTINE] * 3, window=2)
    sent = queue.take_sendable()
    assert [item.seq for item in sent] == [1, 2]
    acked = queue.ack(seqs)
    assert [item.seq for item in acked] == ([1] if 1 in seqs else [])
    assert queue.depth == 3 - len(acked)
    # seq 2 stays in flight, seq 3 was never sent and is still owed
    assert queue.is_in_flight(2)
    assert not queue.is_in_flight(3)
    assert [item.seq for item in queue.take_sendable()] == ([3] if acked else [])


def test_acking_a_pending_seq_does_not_lose_the_message() -> None:
    queue = _queue([ROUTINE] * 2, window=1)
    assert _ids(queue.take_sendable()) == [0]
    assert queue.ack([2]) == []  # seq 2 is pending, not in flight
    assert queue.depth == 2
    queue.ack([1])
    assert [item.seq for item in queue.take_sendable()] == [2]


def test_requeue_in_flight_restores_the_order() -> None:
    queue = _queue([ROUTINE, ROUTINE, PRIORITY], window=2)
    sent = queue.take_sendable()
    assert _ids(sent) == [2, 0]
    for i, prec in ((3, FLASH), (4, ROUTINE)):
        queue.push(message_id=i.to_bytes(2, "big") * 8, sender="x", envelope=b"", prec=prec,
                   expires_ms=0)
    queue.requeue_in_flight()
    assert not any(queue.is_in_flight(item.seq) for item in sent)
    assert queue.depth == 5
    queue.window = 10
    assert _ids(queue.take_sendable()) == [3, 2, 0, 1, 4]


def test_requeued_messages_keep_their_seq() -> None:
    queue = _queue([ROUTINE, ROUTINE], window=2)
    before = [item.seq for item in queue.take_sendable()]
    queue.requeue_in_flight()
    after = [item.seq for item in queue.take_sendable()]
    assert before == after == [1, 2]


def test_acked_message_is_not_requeued() -> None:
    queue = _queue([ROUTINE, ROUTINE], window=2)
    first, _ = queue.take_sendable()
    queue.ack([first.seq])
    queue.requeue_in_flight()
    assert _ids(queue.take_sendable()) == [1]
    assert queue.depth == 1


def test_requeue_with_nothing_in_flight_is_harmless() -> None:
    queue = _queue([ROUTINE])
    queue.requeue_in_flight()
    assert queue.depth == 1
    assert _ids(queue.take_sendable()) == [0]


def test_seq_numbers_keep_increasing_after_acks() -> None:
    queue = _queue([ROUTINE])
    (item,) = queue.take_sendable()
    queue.ack([item.seq])
    new = queue.push(message_id=b"n" * 16, sender="x", envelope=b"", prec=ROUTINE, expires_ms=0)
    assert new.seq == 2


# --- TTL expiry -------------------------------------------------------------------------


def _push(queue: RecipientQueue, i: int, *, prec: int = ROUTINE, expires_ms: int = 10_000,
          size: int = 10) -> int:
    return queue.push(message_id=i.to_bytes(2, "big") * 8, sender="USA-GW1",
                      envelope=b"e" * size, prec=prec, expires_ms=expires_ms).seq


def test_take_expired_returns_only_pending_messages_past_their_ttl() -> None:
    queue = RecipientQueue()
    for i, expires in enumerate([300, 100, 200, 400]):
        _push(queue, i, expires_ms=expires)
    assert queue.take_expired(99) == []
    assert _ids(queue.take_expired(200)) == [1, 2]  # by expiry time, boundary included
    assert queue.depth == 2
    assert _ids(queue.take_sendable()) == [0, 3]  # the expired ones are never sent
    assert queue.take_expired(10_000) == []  # both are in flight now


def test_in_flight_message_is_not_expired_until_it_comes_back() -> None:
    queue = RecipientQueue()
    _push(queue, 0, expires_ms=100)
    (sent,) = queue.take_sendable()
    assert queue.take_expired(500) == []  # handed to the recipient before its TTL
    queue.requeue_in_flight()  # the connection dropped without an ack
    assert queue.next_expiry() == 100
    assert queue.take_expired(500) == [sent]
    assert queue.depth == 0 and queue.take_sendable() == []


def test_acked_message_never_expires_later() -> None:
    queue = RecipientQueue()
    _push(queue, 0, expires_ms=100)
    (sent,) = queue.take_sendable()
    queue.ack([sent.seq])
    queue.requeue_in_flight()
    assert queue.take_expired(500) == [] and queue.next_expiry() is None


def test_flash_expiring_does_not_disturb_the_order_of_the_rest() -> None:
    queue = RecipientQueue(window=10)
    _push(queue, 0, expires_ms=1000)
    _push(queue, 1, prec=FLASH, expires_ms=50)
    _push(queue, 2, prec=IMMEDIATE, expires_ms=1000)
    _push(queue, 3, expires_ms=1000)
    assert _ids(queue.take_expired(60)) == [1]
    assert _ids(queue.take_sendable()) == [2, 0, 3]


def test_expired_messages_of_an_offline_node_are_not_kept_in_memory() -> None:
    queue = RecipientQueue()
    for i in range(1000):
        _push(queue, i, expires_ms=i)
    _push(queue, 1000, expires_ms=10_000)
    assert len(queue.take_expired(999)) == 1000
    # The order heap is compacted: it no longer references 1000 dropped envelopes.
    assert len(queue._order) <= 64 + 2
    assert _ids(queue.take_sendable()) == [1000]


# --- byte accounting ---------------------------------------------------------------------


def test_bytes_count_what_is_owed_until_acked_or_expired() -> None:
    queue = RecipientQueue(window=1)
    _push(queue, 0, size=100, expires_ms=50)
    _push(queue, 1, size=30)
    assert queue.bytes == 130
    (sent,) = queue.take_sendable()  # in flight still counts
    assert queue.bytes == 130
    queue.ack([sent.seq])
    assert queue.bytes == 30
    queue.requeue_in_flight()
    assert len(queue.take_expired(20_000)) == 1
    assert queue.bytes == 0


def test_reserved_bytes_count_until_pushed_or_cancelled() -> None:
    queue = RecipientQueue()
    first, second = queue.reserve_seq(100), queue.reserve_seq(50)
    assert (first, second) == (1, 2)
    assert queue.committed_bytes == 150 and queue.bytes == 0
    queue.push(message_id=b"a" * 16, sender="x", envelope=b"e" * 100, prec=ROUTINE,
               expires_ms=1, seq=first)
    assert queue.committed_bytes == 150 and queue.bytes == 100  # reservation became bytes
    queue.cancel(second)  # its write failed
    assert queue.committed_bytes == 100
    assert queue.reserve_seq() == 3  # a cancelled seq is never reused


def test_depth_by_precedence_counts_pending_and_in_flight() -> None:
    queue = _queue([ROUTINE, FLASH, ROUTINE, PRIORITY], window=2)
    queue.take_sendable()
    assert queue.depth_by_precedence() == {ROUTINE: 2, FLASH: 1, PRIORITY: 1}
    assert queue.in_flight == 2


def test_expiry_bookkeeping_of_acked_copies_stays_bounded() -> None:
    queue = RecipientQueue(window=8)
    for i in range(10_000):
        _push(queue, i, expires_ms=10**12)  # long TTL: nothing expires by time
        for item in queue.take_sendable():
            queue.ack([item.seq])
    assert queue.depth == 0
    assert len(queue._expiry) <= 64 + 2 * 8
    for _ in range(100):  # reconnect churn does not pile up entries either
        _push(queue, 0, expires_ms=10**12)
        queue.take_sendable()
        queue.requeue_in_flight()
        queue.take_sendable()
        queue.ack([queue._next_seq - 1])
    assert len(queue._expiry) <= 64 + 2 * 8


def test_first_seq_lets_a_restarted_broker_never_reuse_a_seq() -> None:
    queue = RecipientQueue(first_seq=1_001)
    assert _push(queue, 0) == 1_001
    assert queue.reserve_seq() == 1_002


# --- envelopes in memory up to a budget, the rest cold (read from the store to send) -------


def test_envelopes_beyond_the_memory_budget_are_queued_cold() -> None:
    queue = RecipientQueue(window=100, memory_bytes=250)
    for i in range(5):
        _push(queue, i, size=100)
    sent = queue.take_sendable()
    assert [item.envelope is not None for item in sent] == [True, True, False, False, False]
    assert [item.size for item in sent] == [100] * 5
    assert (queue.hot_bytes, queue.bytes) == (200, 500)  # owed bytes count the cold ones too


def test_an_acked_or_expired_hot_copy_makes_room_for_the_next() -> None:
    queue = RecipientQueue(window=1, memory_bytes=200)
    _push(queue, 0, size=100)
    _push(queue, 1, size=100, expires_ms=1001)
    (first,) = queue.take_sendable()
    queue.ack([first.seq])
    assert queue.hot_bytes == 100
    _push(queue, 2, size=100, expires_ms=1002)  # hot: the acked copy's bytes were released
    assert queue.take_expired(1000) == [] and queue.hot_bytes == 200
    expired = queue.take_expired(1002)
    assert [item.envelope is not None for item in expired] == [True, True]
    assert (queue.hot_bytes, queue.bytes) == (0, 0)


def test_a_zero_budget_queues_every_copy_cold() -> None:
    queue = RecipientQueue(memory_bytes=0)
    _push(queue, 0, size=1)
    (item,) = queue.take_sendable()
    assert item.envelope is None and item.size == 1 and queue.hot_bytes == 0


def test_a_cold_copy_restored_from_the_store_needs_its_size() -> None:
    queue = RecipientQueue()
    with pytest.raises(ValueError, match="size"):
        queue.push(message_id=b"a" * 16, sender="x", envelope=None, prec=ROUTINE, expires_ms=0)
    item = queue.push(message_id=b"a" * 16, sender="x", envelope=None, size=700, prec=FLASH,
                      expires_ms=0, seq=7)
    assert (item.envelope, item.size, item.seq, queue.bytes, queue.hot_bytes) == (
        None, 700, 7, 700, 0)
    queue.ack([s.seq for s in queue.take_sendable()])
    assert queue.bytes == 0 and queue.hot_bytes == 0


def test_the_memory_budget_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        RecipientQueue(memory_bytes=-1)


def test_a_seq_already_queued_is_refused_and_counts_nothing() -> None:
    queue = RecipientQueue()
    seq = _push(queue, 0, size=100)
    with pytest.raises(ValueError, match="already queued"):
        queue.push(message_id=b"x" * 16, sender="x", envelope=b"e" * 100, prec=ROUTINE,
                   expires_ms=0, seq=seq)
    queue.take_sendable()
    with pytest.raises(ValueError, match="already queued"):  # in flight, too
        queue.push(message_id=b"x" * 16, sender="x", envelope=None, size=100, prec=ROUTINE,
                   expires_ms=0, seq=seq)
    assert (queue.bytes, queue.hot_bytes, queue.depth) == (100, 100, 1)


def test_unsent_copies_go_back_to_pending_in_order() -> None:
    queue = RecipientQueue(window=3)
    for i, prec in enumerate([ROUTINE, FLASH, ROUTINE, ROUTINE]):
        _push(queue, i, prec=prec)
    taken = queue.take_sendable()
    queue.unsend([taken[0].seq, taken[2].seq, 999])  # 999: not in flight, ignored
    assert queue.in_flight == 1 and queue.depth == 4
    assert [item.seq for item in queue.take_sendable()] == [taken[0].seq, taken[2].seq]
    queue.ack([item.seq for item in taken])
    assert [item.seq for item in queue.take_sendable()] == [4] and queue.bytes == 10


def _brute_force(queue: RecipientQueue) -> tuple[dict[int, int], dict[int, int]]:
    """Counts and oldest per precedence by walking every copy owed (what a scrape did)."""
    counts: dict[int, int] = {}
    oldest: dict[int, int] = {}
    for item in (*queue._pending.values(), *queue._in_flight.values()):
        counts[item.prec] = counts.get(item.prec, 0) + 1
        oldest[item.prec] = min(oldest.get(item.prec, item.queued_ms), item.queued_ms)
    return counts, oldest


OPS = st.lists(st.one_of(
    st.tuples(st.just("push"), st.integers(ROUTINE, FLASH), st.integers(0, 50)),
    st.tuples(st.just("send"), st.integers(0, 8)),
    st.tuples(st.just("ack"), st.lists(st.integers(0, 40), max_size=6)),
    st.tuples(st.just("expire"), st.integers(0, 60)),
    st.tuples(st.just("requeue")),
), max_size=120)


@given(OPS)
def test_counts_and_oldest_per_precedence_match_a_walk_of_every_copy(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Kept as copies come and go (pushed, sent, acked, expired, requeued), they equal what a
    walk of the queue finds; copies are queued in time order, as the hub queues them."""
    queue = RecipientQueue(window=4, memory_bytes=64)
    now = 0
    for op in ops:
        if op[0] == "push":
            now += 1
            queue.push(message_id=now.to_bytes(16, "big"), sender="GBR-GW1", envelope=b"e" * 20,
                       prec=op[1], expires_ms=now + op[2], queued_ms=now)
        elif op[0] == "send":
            queue.take_sendable()
        elif op[0] == "ack":
            queue.ack(op[1])
        elif op[0] == "expire":
            queue.take_expired(op[1])
        else:
            queue.requeue_in_flight()
        assert (queue.depth_by_precedence(), queue.oldest_by_precedence()) == _brute_force(queue)


def test_the_arrival_order_of_acked_copies_stays_bounded() -> None:
    """One old copy stays in flight (never acked) while thousands after it are: the record of
    arrivals behind it does not keep them all."""
    queue = RecipientQueue(window=8)
    for i in range(10_000):
        queue.push(message_id=i.to_bytes(16, "big"), sender="USA-GW1", envelope=b"e",
                   prec=ROUTINE, expires_ms=10**12, queued_ms=1000 + i)
        for item in queue.take_sendable():
            if item.queued_ms != 1000:  # the first stays unacknowledged
                queue.ack([item.seq])
    assert queue.depth_by_precedence() == {ROUTINE: 1}
    assert queue.oldest_by_precedence() == {ROUTINE: 1000}
    assert sum(len(d) for d in queue._arrivals.values()) <= 64 + 2 * 8
