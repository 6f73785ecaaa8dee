"""Per-connection token buckets (broker/ratelimit.py), driven by a fake clock."""

from __future__ import annotations

import pytest

from broker.ratelimit import ADMIT, ConnectionRate, RateLimits, TokenBucket

LIMITS = RateLimits(frames_per_second=10, frames_burst=5, bytes_per_second=1000,
                    bytes_burst=2000, max_throttle_s=2.0)


def test_a_bucket_starts_full_and_admits_its_burst_without_waiting() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(5)] == [0.0] * 5


def test_a_bucket_in_debt_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    for _ in range(5):
        bucket.take(1, 0.0)
    assert bucket.take(1, 0.0) == pytest.approx(0.1)
    assert bucket.take(1, 0.0) == pytest.approx(0.2)


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    bucket.take(5, 0.0)
    bucket.refill(0.3)
    assert bucket.tokens == pytest.approx(3)
    bucket.refill(100.0)
    assert bucket.tokens == 5


def test_a_clock_that_steps_back_earns_no_tokens() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=10.0)
    bucket.take(5, 10.0)
    bucket.refill(5.0)
    assert bucket.tokens == 0
    bucket.refill(10.1)
    assert bucket.tokens == pytest.approx(1)


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (5, 0), (-1, 5)])
def test_a_bucket_needs_a_positive_rate_and_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, now=0.0)


def test_traffic_within_the_rate_is_never_throttled() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    verdicts = [rate.admit(100, t / 10) for t in range(100)]  # 10 frames/s, 1000 bytes/s
    assert verdicts == [ADMIT] * 100


def test_a_burst_over_the_rate_is_throttled_not_refused() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    verdicts = [rate.admit(10, 0.0) for _ in range(8)]
    assert [v.wait for v in verdicts[:5]] == [0.0] * 5
    assert [round(v.wait, 3) for v in verdicts[5:]] == [0.1, 0.2, 0.3]
    assert not any(v.refuse for v in verdicts)


def test_a_throttled_sender_that_waits_its_turn_stays_connected() -> None:
    """The server pauses reading for each wait: a sender kept at the rate is never refused."""
    rate = ConnectionRate(LIMITS, now=0.0)
    now = 0.0
    for _ in range(200):
        verdict = rate.admit(10, now)
        assert not verdict.refuse
        now += max(verdict.wait, 0.1)  # it sends again as soon as it may (or at its own 10/s)


def test_a_sender_that_stays_over_the_rate_is_refused_after_the_throttle_bound() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    now, refused_at = 0.0, None
    for _ in range(1000):
        verdict = rate.admit(10, now)
        if verdict.refuse:
            refused_at = now
            break
        now += verdict.wait  # the next frame is already waiting in the socket
    assert refused_at is not None
    assert LIMITS.max_throttle_s - 0.2 <= refused_at <= LIMITS.max_throttle_s
    assert "frames/s" in verdict.reason


def test_a_pause_ends_the_run_of_throttling() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    now = 0.0
    for _ in range(15):
        now += rate.admit(10, now).wait
    assert rate.throttled_since is not None
    assert rate.admit(10, now + 0.5) == ADMIT  # a pause: the buckets refilled
    assert rate.throttled_since is None


def test_one_message_too_big_for_the_byte_rate_is_refused_at_once() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    verdict = rate.admit(5000, 0.0)  # 3000 bytes of debt at 1000 bytes/s: a 3 s pause > 2 s
    assert verdict.refuse and verdict.wait == pytest.approx(3.0)
    assert "5000-byte message" in verdict.reason


def test_bytes_throttle_independently_of_frames() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    assert rate.admit(2000, 0.0) == ADMIT
    verdict = rate.admit(500, 0.0)
    assert verdict.wait == pytest.approx(0.5) and not verdict.refuse


def test_a_retuned_bucket_keeps_its_balance_capped_at_the_new_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    bucket.take(3, 0.0)  # 2 left
    bucket.retune(rate=100, burst=50, now=0.0)
    assert bucket.tokens == 2  # no free burst for having authenticated
    assert bucket.take(4, 0.0) == pytest.approx(0.02)  # a debt of 2 at the new rate
    bucket.retune(rate=10, burst=1, now=1.0)  # refilled at 100/s first, then capped
    assert bucket.tokens == 1
    with pytest.raises(ValueError):
        bucket.retune(rate=0, burst=1, now=1.0)


def test_a_connection_retuned_to_a_node_s_own_rates_is_judged_by_them() -> None:
    rate = ConnectionRate(LIMITS, now=0.0)
    for _ in range(5):
        assert rate.admit(10, 0.0) == ADMIT
    assert rate.admit(10, 0.0).wait == pytest.approx(0.1)  # 1 frame over, at 10 frames/s
    own = RateLimits(frames_per_second=1000, frames_burst=500, bytes_per_second=10**6,
                     bytes_burst=10**6, max_throttle_s=2.0)
    rate.retune(own, 0.1)  # the debt was repaid at the old rate: a balance of 0
    assert rate.limits == own
    assert rate.admit(10, 0.1).wait == pytest.approx(0.001)  # 1 frame over, at 1000/s
    assert all(rate.admit(10, 0.2) == ADMIT for _ in range(99))  # 0.1 s at 1000/s
    assert rate.admit(10, 0.2).wait > 0
