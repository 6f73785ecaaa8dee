"""Per-connection rate limits as token buckets (pure: no asyncio, the caller passes the time).

Every WebSocket message a connection sends (binary frames, text messages, WebSocket pings and
pongs alike) costs one token of its *frames* bucket and its length in tokens of its *bytes*
bucket. A bucket holds at most ``burst`` tokens and refills at ``rate`` per second; it may go
into debt, and the debt says how long the connection must wait.

The policy (see ``docs/decisions.md``, "Abuse limits"): modest excess is **throttled** — the
server stops reading from the connection until the debt is repaid, so TCP pushes back on the
sender and nothing is dropped. A connection that stays over its rate, throttled without a break
for longer than ``max_throttle_s`` (or one message whose pause alone would exceed it), is
**refused**: the server closes it with ``rate_limited``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RateLimits:
    """The rates of one connection of the node listener."""

    frames_per_second: float = 2000.0
    frames_burst: int = 4000
    bytes_per_second: float = float(16 << 20)
    bytes_burst: int = 32 << 20
    #: Longest continuous throttling before the connection is closed with ``rate_limited``.
    max_throttle_s: float = 10.0


class TokenBucket:
    """``burst`` tokens at most, ``rate`` more per second; ``take`` may leave a debt."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._stamp = now

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last call (a clock that steps back earns none)."""
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def retune(self, rate: float, burst: float, now: float) -> None:
        """Go on at ``rate`` and ``burst`` from ``now``: what was earned so far at the old rate
        is kept (a debt too), capped at the new burst."""
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.refill(now)
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, float(burst))

    def take(self, cost: float, now: float) -> float:
        """Spend ``cost`` tokens; return the seconds until the balance is back to zero
        (0.0 when there is no debt)."""
        self.refill(now)
        self.tokens -= cost
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with one message: go on at once, pause reading ``wait`` seconds first, or
    ``refuse`` (close the connection with ``rate_limited``; ``reason`` says why)."""

    wait: float = 0.0
    refuse: bool = False
    reason: str = ""


ADMIT = Verdict()


class ConnectionRate:
    """The frames and bytes buckets of one connection, and how long it has been throttled."""

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self.frames = TokenBucket(limits.frames_per_second, limits.frames_burst, now)
        self.bytes = TokenBucket(limits.bytes_per_second, limits.bytes_burst, now)
        #: When the current run of throttled messages began (``None``: not throttled).
        self.throttled_since: float | None = None

    def retune(self, limits: RateLimits, now: float) -> None:
        """Apply ``limits`` from ``now`` on (a node's own rates, once it has authenticated): the
        buckets keep their balances, capped at the new bursts, and any run of throttling goes
        on."""
        self.limits = limits
        self.frames.retune(limits.frames_per_second, limits.frames_burst, now)
        self.bytes.retune(limits.bytes_per_second, limits.bytes_burst, now)

    def admit(self, nbytes: int, now: float) -> Verdict:
        """Charge one message of ``nbytes`` received at ``now``.

        The caller pauses reading for ``wait`` seconds before it acts on the message. A message
        that finds both buckets out of debt ends a run of throttling; one that needs a pause
        starts or continues it, and the run (including this pause) may not exceed
        ``max_throttle_s``.
        """
        wait = max(self.frames.take(1, now), self.bytes.take(nbytes, now))
        if wait <= 0:
            self.throttled_since = None
            return ADMIT
        if self.throttled_since is None:
            self.throttled_since = now
        limit = self.limits.max_throttle_s
        if wait > limit:
            return Verdict(wait, True, f"a {nbytes}-byte message needs a {wait:.1f} s pause "
                           f"(more than {limit:g} s)")
        if now + wait - self.throttled_since > limit:
            return Verdict(wait, True, f"over {self.limits.frames_per_second:g} frames/s or "
                           f"{self.limits.bytes_per_second:g} bytes/s for more than {limit:g} s")
        return Verdict(wait)
