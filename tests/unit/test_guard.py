"""Connection guards (broker/guard.py): admission, back-off, node connect rate, log limiting,
stall detection — pure bookkeeping with a fake clock."""

from __future__ import annotations

import pytest

from broker.guard import (
    AuthBackoff,
    ConnectionGuard,
    ConnectionLimits,
    LogLimiter,
    Refusal,
    StallTracker,
    Ticket,
    address_key,
)

# --- address keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(("remote", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    (None, "unknown"),
    ("", "unknown"),
    ("not-an-address", "not-an-address"),
])
def test_connections_of_one_host_share_a_key(remote: str | None, key: str) -> None:
    assert address_key(remote) == key


# --- back-off ---------------------------------------------------------------------------------


def backoff(**overrides: float) -> AuthBackoff:
    settings = {"free": 2, "initial": 1.0, "maximum": 8.0, "capacity": 100, **overrides}
    return AuthBackoff(free=int(settings["free"]), initial=settings["initial"],
                       maximum=settings["maximum"], capacity=int(settings["capacity"]))


def test_the_first_failures_are_free() -> None:
    table = backoff()
    assert table.failed("a", 0.0) == 0.0
    assert table.failed("a", 0.0) == 0.0
    assert table.remaining("a", 0.0) == 0.0


def test_back_off_doubles_with_each_failure_up_to_the_cap() -> None:
    table = backoff()
    table.failed("a", 0.0)
    table.failed("a", 0.0)
    periods = [table.failed("a", 0.0) for _ in range(6)]
    assert periods == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert table.remaining("a", 3.0) == pytest.approx(5.0)
    assert table.remaining("a", 8.0) == 0.0


def test_a_huge_failure_count_does_not_overflow() -> None:
    table = backoff(free=0)
    for _ in range(5000):
        period = table.failed("a", 0.0)
    assert period == 8.0


def test_refusals_during_a_back_off_are_counted_not_extended() -> None:
    table = backoff(free=0)
    table.failed("a", 0.0)
    assert [table.remaining("a", 0.5) for _ in range(3)] == [0.5, 0.5, 0.5]
    assert table.refusals("a") == 3
    assert table.remaining("a", 1.0) == 0.0


def test_a_success_resets_the_back_off() -> None:
    table = backoff(free=0)
    for _ in range(3):
        table.failed("a", 0.0)
    table.succeeded("a")
    assert table.remaining("a", 0.0) == 0.0
    assert table.failed("a", 0.0) == 1.0  # starts over


def test_a_quiet_period_forgets_old_failures() -> None:
    table = backoff(free=0)
    for _ in range(3):
        table.failed("a", 0.0)  # back-off until 4.0
    assert table.failed("a", 4.0 + 8.0 + 0.1) == 1.0


def test_the_back_off_table_is_bounded_least_recently_failed_first() -> None:
    table = backoff(free=0, capacity=3)
    for key in "abcd":
        table.failed(key, 0.0)
    assert len(table) == 3
    assert table.remaining("a", 0.5) == 0.0  # forgotten
    assert table.remaining("d", 0.5) > 0


def test_addresses_back_off_independently() -> None:
    table = backoff(free=0)
    table.failed("a", 0.0)
    assert table.remaining("b", 0.0) == 0.0


@pytest.mark.parametrize("settings", [{"initial": 0.0}, {"initial": 9.0}, {"capacity": 0},
                                      {"free": -1}])
def test_back_off_settings_are_checked(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        backoff(**settings)


# --- admission --------------------------------------------------------------------------------

LIMITS = ConnectionLimits(max_connections=4, max_unauthenticated_per_address=2,
                          node_connects_per_minute=2, auth_backoff_free_failures=1,
                          auth_backoff_initial_s=1.0, auth_backoff_max_s=4.0,
                          auth_backoff_table_size=100)


def admit(guard: ConnectionGuard, remote: str, now: float = 0.0) -> Ticket:
    ticket = guard.admit(remote, now)
    assert isinstance(ticket, Ticket), ticket
    return ticket


def refusal(guard: ConnectionGuard, remote: str, now: float = 0.0) -> Refusal:
    answer = guard.admit(remote, now)
    assert isinstance(answer, Refusal), answer
    return answer


def test_unauthenticated_connections_per_address_are_bounded() -> None:
    guard = ConnectionGuard(LIMITS)
    admit(guard, "10.0.0.1")
    admit(guard, "10.0.0.1")
    refused = refusal(guard, "10.0.0.1")
    assert (refused.status, refused.code, refused.kind) == (429, "rate_limited", "address")
    admit(guard, "10.0.0.2")  # another address is not affected


def test_authenticating_frees_the_address_slot() -> None:
    guard = ConnectionGuard(LIMITS)
    first = admit(guard, "10.0.0.1")
    admit(guard, "10.0.0.1")
    assert guard.authenticated(first, "USA-GW1", 0.0) is None
    admit(guard, "10.0.0.1")
    assert guard.unauthenticated == {"10.0.0.1": 2}


def test_total_connections_are_bounded_authenticated_or_not() -> None:
    guard = ConnectionGuard(LIMITS)
    tickets = [admit(guard, f"10.0.0.{i}") for i in range(4)]
    guard.authenticated(tickets[0], "USA-GW1", 0.0)
    refused = refusal(guard, "10.0.0.9")
    assert (refused.status, refused.code, refused.kind) == (503, "unavailable", "capacity")
    guard.release(tickets[0])
    admit(guard, "10.0.0.9")


def test_release_is_idempotent_and_balances_every_counter() -> None:
    guard = ConnectionGuard(LIMITS)
    unauthenticated, authenticated = admit(guard, "10.0.0.1"), admit(guard, "10.0.0.1")
    guard.authenticated(authenticated, "USA-GW1", 0.0)
    for ticket in (unauthenticated, authenticated, unauthenticated, authenticated):
        guard.release(ticket)
    assert guard.open == 0 and guard.unauthenticated == {}


def test_failed_handshakes_put_the_address_in_back_off_before_any_other_check() -> None:
    guard = ConnectionGuard(LIMITS)
    for _ in range(2):  # one free failure, then 1 s
        ticket = admit(guard, "10.0.0.1")
        guard.failed(ticket, 0.0)
        guard.release(ticket)
    refused = refusal(guard, "10.0.0.1", 0.5)
    assert (refused.status, refused.code, refused.kind) == (429, "rate_limited", "backoff")
    assert refused.retry_after == pytest.approx(0.5)
    admit(guard, "10.0.0.1", 1.0)


def test_a_successful_handshake_clears_the_address_back_off() -> None:
    guard = ConnectionGuard(LIMITS)
    ticket = admit(guard, "10.0.0.1")
    guard.failed(ticket, 0.0)
    good = admit(guard, "10.0.0.1")
    assert guard.authenticated(good, "USA-GW1", 0.0) is None
    assert guard.failed(admit(guard, "10.0.0.1"), 0.0) == 0.0  # the free failure again


def test_a_node_that_reconnects_too_often_is_refused_and_not_charged() -> None:
    guard = ConnectionGuard(LIMITS)  # 2 per minute
    assert guard.authenticated(admit(guard, "10.0.0.1"), "USA-GW1", 0.0) is None
    assert guard.authenticated(admit(guard, "10.0.0.1"), "USA-GW1", 1.0) is None
    third = admit(guard, "10.0.0.1")
    refused = guard.authenticated(third, "USA-GW1", 2.0)
    assert refused is not None and (refused.code, refused.kind) == ("rate_limited", "node")
    assert refused.retry_after == pytest.approx(28.0)
    assert not third.authenticated and guard.unauthenticated == {"10.0.0.1": 1}
    assert guard.authenticated(admit(guard, "10.0.0.2"), "GBR-GW1", 2.0) is None
    guard.release(third)
    assert guard.authenticated(admit(guard, "10.0.0.3"), "USA-GW1", 30.0) is None


# --- log limiting -----------------------------------------------------------------------------


def test_log_lines_are_limited_per_key_and_report_what_was_held_back() -> None:
    quiet = LogLimiter(interval=10.0)
    assert quiet.note("a", 0.0) == 0
    assert [quiet.note("a", t) for t in (1.0, 2.0, 3.0)] == [None, None, None]
    assert quiet.note("b", 3.0) == 0
    assert quiet.note("a", 10.0) == 3
    assert quiet.note("a", 11.0) is None


def test_the_log_limiter_remembers_a_bounded_number_of_keys() -> None:
    quiet = LogLimiter(interval=10.0, capacity=2)
    for key in "abc":
        quiet.note(key, 0.0)
    assert quiet.note("a", 1.0) == 0  # forgotten: logged again
    assert quiet.note("c", 1.0) is None


# --- stalls -----------------------------------------------------------------------------------


def test_a_connection_paused_without_progress_is_stalled_after_the_timeout() -> None:
    tracker: StallTracker[str] = StallTracker(timeout=2.0)
    assert tracker.sweep([("a", True, 100_000)], 0.0) == []
    assert tracker.sweep([("a", True, 100_000)], 1.0) == []
    assert tracker.sweep([("a", True, 100_000)], 2.0) == ["a"]
    assert tracker.sweep([("a", True, 100_000)], 2.5) == []  # reported once, then tracked anew


def test_a_slow_reader_that_makes_progress_is_not_stalled() -> None:
    tracker: StallTracker[str] = StallTracker(timeout=2.0)
    for step in range(10):
        assert tracker.sweep([("a", True, 100_000 - step * 1000)], float(step)) == []


def test_a_resumed_connection_starts_over() -> None:
    tracker: StallTracker[str] = StallTracker(timeout=2.0)
    tracker.sweep([("a", True, 100_000), ("b", True, 100_000)], 0.0)
    tracker.sweep([("a", False, 0), ("b", True, 100_000)], 1.5)
    assert tracker.sweep([("a", True, 100_000), ("b", True, 100_000)], 2.0) == ["b"]
    assert tracker.sweep([("a", True, 100_000)], 3.9) == []
    assert tracker.sweep([("a", True, 100_000)], 4.0) == ["a"]


def test_connections_that_are_gone_are_forgotten() -> None:
    tracker: StallTracker[str] = StallTracker(timeout=2.0)
    tracker.sweep([("a", True, 1)], 0.0)
    tracker.sweep([], 1.0)
    assert tracker.sweep([("a", True, 1)], 2.5) == []
