"""Replay protection (broker/replay.py): the skew check, seen ids, expiry and the memory bound."""

from __future__ import annotations

import pytest

from broker.replay import ReplayGuard

SKEW = 1000
NOW = 1_800_000_000_000
A, B, C = b"A" * 16, b"B" * 16, b"C" * 16


def test_default_skew_is_five_minutes() -> None:
    assert ReplayGuard().skew_ms == 5 * 60 * 1000


@pytest.mark.parametrize(
    ("offset", "fresh"),
    [
        (0, True),
        (SKEW, True),
        (-SKEW, True),
        (SKEW + 1, False),
        (-SKEW - 1, False),
        (100 * SKEW, False),
        (-NOW, False),
    ],
)
def test_ts_must_be_within_the_skew(offset: int, fresh: bool) -> None:
    guard = ReplayGuard(skew_ms=SKEW)
    reason = guard.check(A, NOW + offset, NOW)
    assert (reason is None) is fresh
    if not fresh:
        assert "ms" in reason  # type: ignore[operator]


def test_check_does_not_record() -> None:
    guard = ReplayGuard(skew_ms=SKEW)
    assert guard.check(A, NOW, NOW) is None
    assert guard.check(A, NOW, NOW) is None
    assert len(guard) == 0


def test_replayed_id_is_rejected() -> None:
    guard = ReplayGuard(skew_ms=SKEW)
    assert guard.check(A, NOW, NOW) is None
    guard.record(A, NOW)
    assert guard.check(A, NOW, NOW + 1) == "message id was already seen"
    # another id is still fresh
    assert guard.check(B, NOW, NOW + 1) is None


def test_replayed_id_with_a_new_ts_is_still_rejected() -> None:
    # ts is the sender's claim; the id alone identifies the message
    guard = ReplayGuard(skew_ms=SKEW)
    guard.record(A, NOW)
    assert guard.check(A, NOW + 500, NOW + 400) is not None


@pytest.mark.parametrize("later", [1, SKEW, 2 * SKEW - 1])
def test_id_is_remembered_inside_the_window(later: int) -> None:
    guard = ReplayGuard(skew_ms=SKEW)
    guard.record(A, NOW)
    # a ts that still passes the skew check at NOW + later
    assert guard.check(A, NOW + later, NOW + later) == "message id was already seen"


def test_id_is_remembered_for_as_long_as_its_ts_can_pass_the_skew_check() -> None:
    # Accepted at NOW with ts = NOW + SKEW (the latest allowed). That ts passes the skew check
    # until NOW + 2*SKEW inclusive (|ts - now| == SKEW is allowed), so the id must still be
    # remembered at NOW + 2*SKEW; otherwise the same envelope can be replayed once.
    guard = ReplayGuard(skew_ms=SKEW)
    ts = NOW + SKEW
    assert guard.check(A, ts, NOW) is None
    guard.record(A, NOW)
    for now in range(NOW, NOW + 2 * SKEW + 2):
        reason = guard.check(A, ts, now)
        assert reason is not None, f"replay accepted at NOW + {now - NOW} ms"


def test_ids_are_forgotten_after_the_window() -> None:
    guard = ReplayGuard(skew_ms=SKEW)
    guard.record(A, NOW)
    guard.record(B, NOW + SKEW)
    assert len(guard) == 2
    # expiry happens on check; at NOW + 2.5*SKEW the first id can no longer pass the ts check
    # (its ts was at most NOW + SKEW), the second still can
    guard.check(C, NOW + 2 * SKEW + SKEW // 2, NOW + 2 * SKEW + SKEW // 2)
    assert len(guard) == 1
    assert guard.check(B, NOW + 2 * SKEW, NOW + 2 * SKEW + SKEW // 2) is not None
    guard.check(C, NOW + 5 * SKEW, NOW + 5 * SKEW)
    assert len(guard) == 0


def test_after_the_window_the_old_envelope_is_refused_by_its_ts() -> None:
    guard = ReplayGuard(skew_ms=SKEW)
    guard.record(A, NOW)
    later = NOW + 10 * SKEW
    # the id is forgotten, but the signed ts of the old envelope no longer passes
    assert guard.check(A, NOW, later) is not None
    assert guard.check(A, NOW + SKEW, later) is not None
    assert guard.check(B, later, later) is None
    assert len(guard) == 0


def test_memory_is_bounded_by_max_ids_oldest_forgotten_first() -> None:
    guard = ReplayGuard(skew_ms=SKEW, max_ids=2)
    guard.record(A, NOW)
    guard.record(B, NOW + 1)
    guard.record(C, NOW + 2)
    assert len(guard) == 2
    assert guard.check(A, NOW, NOW + 3) is None
    assert guard.check(B, NOW, NOW + 3) is not None
    assert guard.check(C, NOW, NOW + 3) is not None


def test_many_ids_stay_within_max_ids() -> None:
    guard = ReplayGuard(skew_ms=SKEW, max_ids=100)
    for i in range(1000):
        guard.record(i.to_bytes(16, "big"), NOW)
        assert len(guard) <= 100
    assert guard.check((999).to_bytes(16, "big"), NOW, NOW) is not None
    assert guard.check((0).to_bytes(16, "big"), NOW, NOW) is None
