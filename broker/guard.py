"""Connection guards of the listeners, as pure bookkeeping (no asyncio: the caller passes the
time, a monotonic clock in seconds).

- :class:`ConnectionGuard` admits or refuses a new node connection *before* any WebSocket or
  signature work: an address in authentication back-off (HTTP 429 ``rate_limited``), the broker
  at its total connection limit (HTTP 503 ``unavailable``), or an address with too many
  connections that have not authenticated yet (HTTP 429 ``rate_limited``). After the handshake
  it limits how often one node may (re)connect (each new connection of a node replaces the
  previous one), and it counts failed handshakes per address.
- :class:`AuthBackoff`: after a few failed handshakes, an address is refused for a period that
  doubles with each further failure (capped); a success resets it. A bounded LRU table.
- :class:`LogLimiter`: at most one log line per key and interval, with the count of the lines
  it held back, so that refusals cannot flood the logs either.
- :class:`StallTracker`: which connections have not been able to write for too long (their
  peer does not read), from periodic samples.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from broker.ratelimit import TokenBucket

K = TypeVar("K", bound=Hashable)


def address_key(remote: str | None) -> str:
    """The key connections of one source share: the IPv4 address, or the /64 of an IPv6
    address (one host usually holds a whole /64, so per-address limits on single IPv6 addresses
    would be trivial to sidestep). IPv4-mapped IPv6 counts as IPv4; anything else (a Unix
    socket, an unparsable name) is kept as it is."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class LogLimiter:
    """``note(key, now)`` says whether to log now: the first time a key is seen, then at most
    once per ``interval`` seconds. It returns the number of events held back since the last
    line (to log with it), or ``None`` to stay silent. At most ``capacity`` keys (LRU)."""

    def __init__(self, interval: float = 10.0, capacity: int = 1024) -> None:
        self.interval = interval
        self.capacity = capacity
        self._keys: collections.OrderedDict[Hashable, tuple[float, int]] = (
            collections.OrderedDict())

    def note(self, key: Hashable, now: float) -> int | None:
        last = self._keys.pop(key, None)
        if last is not None and now - last[0] < self.interval:
            self._keys[key] = (last[0], last[1] + 1)
            return None
        self._keys[key] = (now, 0)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return 0 if last is None else last[1]


@dataclasses.dataclass
class _Failures:
    count: int
    #: End of the back-off in force (``<= now``: none).
    until: float
    #: Connections refused during the current back-off.
    refusals: int = 0


class AuthBackoff:
    """Failed handshakes per address key, and the back-off they earn.

    The first ``free`` failures cost nothing; the next one starts a back-off of ``initial``
    seconds, and every further failure doubles it, up to ``maximum``. A successful handshake
    from the address forgets its failures, and so does a quiet period of ``maximum`` seconds
    after the last back-off ended. At most ``capacity`` addresses are remembered (the least
    recently failed ones are forgotten first), so the table's memory is bounded.
    """

    def __init__(self, *, free: int, initial: float, maximum: float, capacity: int) -> None:
        if initial <= 0 or maximum < initial or capacity < 1 or free < 0:
            raise ValueError("back-off needs 0 < initial <= maximum, capacity >= 1, free >= 0")
        self.free, self.initial, self.maximum, self.capacity = free, initial, maximum, capacity
        self._table: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def remaining(self, key: str, now: float) -> float:
        """Seconds ``key`` is still refused for (0.0: it may connect). A refusal is counted."""
        entry = self._table.get(key)
        if entry is None or now >= entry.until:
            return 0.0
        entry.refusals += 1
        return entry.until - now

    def refusals(self, key: str) -> int:
        """Connections refused during the back-off in force for ``key``."""
        entry = self._table.get(key)
        return 0 if entry is None else entry.refusals

    def failed(self, key: str, now: float) -> float:
        """Record a failed handshake; return the back-off it starts (0.0: none yet)."""
        entry = self._table.pop(key, None)
        if entry is None or now - entry.until > self.maximum:
            entry = _Failures(count=0, until=now)
        entry.count += 1
        entry.refusals = 0
        extra = entry.count - self.free
        period = 0.0 if extra <= 0 else min(self.maximum, self.initial * 2.0 ** min(extra - 1, 64))
        entry.until = max(entry.until, now + period)
        self._table[key] = entry
        while len(self._table) > self.capacity:
            self._table.popitem(last=False)
        return period

    def succeeded(self, key: str) -> None:
        """A handshake from ``key`` succeeded: forget its failures."""
        self._table.pop(key, None)


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the node listener holds, and how it backs off failed handshakes."""

    #: Open WebSocket connections in total, authenticated or not (over it: HTTP 503).
    max_connections: int = 1000
    #: Connections of one address key that have not authenticated yet (over it: HTTP 429).
    max_unauthenticated_per_address: int = 32
    #: Successful handshakes per node and minute (a burst of as many, then refilled evenly);
    #: each replaces the node's previous connection, so this bounds flapping.
    node_connects_per_minute: int = 30
    #: Failed handshakes per address before the back-off starts.
    auth_backoff_free_failures: int = 3
    auth_backoff_initial_s: float = 1.0
    auth_backoff_max_s: float = 300.0
    #: Addresses the back-off table remembers (LRU).
    auth_backoff_table_size: int = 10_000


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a connection is refused: the HTTP ``status`` (before the upgrade) or the error frame
    ``code`` (after the handshake), a ``reason``, and ``retry_after`` seconds when known.
    ``kind`` names the limit (``backoff``, ``capacity``, ``address``, ``node``) for the logs."""

    status: int
    code: str
    reason: str
    kind: str
    retry_after: float | None = None


@dataclasses.dataclass
class Ticket:
    """One admitted connection, until :meth:`ConnectionGuard.release`."""

    key: str
    authenticated: bool = False
    released: bool = False
    #: Still counted among the unauthenticated connections of its address.
    pending: bool = True


class ConnectionGuard:
    """Admission control and handshake bookkeeping of the node listener (see the module
    docstring). Every admitted connection holds a :class:`Ticket` until it is released."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open = 0
        self.unauthenticated: dict[str, int] = {}
        self.backoff = AuthBackoff(free=limits.auth_backoff_free_failures,
                                   initial=limits.auth_backoff_initial_s,
                                   maximum=limits.auth_backoff_max_s,
                                   capacity=limits.auth_backoff_table_size)
        self._nodes: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def admit(self, remote: str | None, now: float) -> Ticket | Refusal:
        """A :class:`Ticket` for a new connection from ``remote``, or why it is refused."""
        key = address_key(remote)
        wait = self.backoff.remaining(key, now)
        if wait > 0:
            return Refusal(429, "rate_limited", f"too many failed handshakes from this address; "
                           f"retry in {wait:.1f} s", "backoff", retry_after=wait)
        if self.open >= self.limits.max_connections:
            return Refusal(503, "unavailable", f"the broker holds its maximum of "
                           f"{self.limits.max_connections} connections", "capacity")
        pending = self.unauthenticated.get(key, 0)
        if pending >= self.limits.max_unauthenticated_per_address:
            return Refusal(429, "rate_limited", f"{pending} connections from this address have "
                           "not authenticated yet", "address")
        self.open += 1
        self.unauthenticated[key] = pending + 1
        return Ticket(key)

    def authenticated(self, ticket: Ticket, node: str, now: float) -> Refusal | None:
        """The handshake of ``ticket`` succeeded as ``node``: ``None`` to welcome it, or a
        refusal when the node (re)connects too often. Charged after the signature verified,
        so that nobody but the node itself can use up its allowance."""
        bucket = self._nodes.pop(node, None)
        if bucket is None:
            per_minute = self.limits.node_connects_per_minute
            bucket = TokenBucket(per_minute / 60.0, per_minute, now)
        self._nodes[node] = bucket
        while len(self._nodes) > self.limits.auth_backoff_table_size:
            self._nodes.popitem(last=False)
        wait = bucket.take(1, now)
        if wait > 0:
            bucket.tokens += 1  # a refused connection is not charged
            return Refusal(429, "rate_limited", f"node {node} connects more than "
                           f"{self.limits.node_connects_per_minute} times a minute; retry in "
                           f"{wait:.1f} s", "node", retry_after=wait)
        self._settle(ticket)
        ticket.authenticated = True
        self.backoff.succeeded(ticket.key)
        return None

    def failed(self, ticket: Ticket, now: float) -> float:
        """The handshake of ``ticket`` failed; return the back-off this starts (0.0: none)."""
        return self.backoff.failed(ticket.key, now)

    def release(self, ticket: Ticket) -> None:
        """The connection ended (idempotent)."""
        if ticket.released:
            return
        ticket.released = True
        self.open -= 1
        self._settle(ticket)

    def _settle(self, ticket: Ticket) -> None:
        """``ticket`` no longer counts as an unauthenticated connection of its address."""
        if not ticket.pending:
            return
        ticket.pending = False
        left = self.unauthenticated.get(ticket.key, 0) - 1
        if left > 0:
            self.unauthenticated[ticket.key] = left
        else:
            self.unauthenticated.pop(ticket.key, None)


class StallTracker(Generic[K]):
    """Connections whose writing has been stuck for ``timeout`` seconds, from samples.

    A sample is ``(connection, paused, buffered)``: whether the transport paused writing (its
    buffer above the high-water mark) and how many bytes it still buffers. A connection that is
    not paused, or whose buffer shrank since the previous sample, made progress; one that stays
    paused without progress for ``timeout`` is stalled.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._since: dict[K, tuple[float, int]] = {}

    def sweep(self, samples: Iterable[tuple[K, bool, int]], now: float) -> list[K]:
        """Take one round of samples; return the stalled connections (each reported once)."""
        seen: dict[K, tuple[float, int]] = {}
        stalled: list[K] = []
        for conn, paused, buffered in samples:
            if not paused:
                continue
            since, last = self._since.get(conn, (now, buffered))
            if buffered < last:
                since = now
            if now - since >= self.timeout:
                stalled.append(conn)
                continue
            seen[conn] = (since, buffered)
        self._since = seen
        return stalled
