"""Decision replay in two halves: what each entry says (parallel), and what follows in order.

An auditor replays every ``route`` entry's decisions under the bundle recorded in it and tracks
every released copy to its end (:mod:`clients.auditor`). Nearly all the cost is per entry and
independent of the others: parsing the entry strictly and re-running the decisions. That half is
:func:`decide_steps`, a pure function of a run of entries, the verified bundles and the nodes
suspended or revoked at the run's start; it turns each entry into a *step*, a short msgpack-able
list. The other half, :class:`Replay`, applies the steps one by one, in log order: the clock,
the bundle in force, the copies outstanding, who is connected. Runs of entries can then be
decided in worker processes (:mod:`clients.replay_workers`) while the auditor applies the steps
in order, with the same report as deciding them in line.

Only operator actions (``admin`` entries) change later decisions (a suspended node is
``node_inactive``); the steps of a run decided from a wrong guess of the suspensions at its
start are decided again (:meth:`Suspensions.snapshot`).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from broker.audit.leaves import (
    AdminEntry,
    DeliverEntry,
    ExpireEntry,
    PolicyEntry,
    RouteEntry,
    SessionEntry,
    entry_from_bytes,
)
from broker.errors import BrokerError, PolicyDocumentError
from broker.release import decide_recipient
from policies.bundle import Bundle
from policies.cache import DecisionCache
from policies.decide import Decision
from policies.highwater import HighWater

#: Step kinds: a step is ``[kind, index, ...]``; see :func:`decide_steps`.
BAD, ROUTE, POLICY, DELIVER, EXPIRE, ADMIN, SESSION = range(7)

#: What :attr:`Replay.outstanding` holds for a released message whose copies all ended.
_ENDED: tuple[()] = ()

#: How far entry times may step back (clock adjustments) before it counts as backdating.
MAX_CLOCK_STEP_BACK_MS = 5 * 60 * 1000

#: Where problems go: ``(what, detail, index)``, as :meth:`clients.auditor.Report.add` takes it.
Sink = Callable[[str, str, "int | None"], None]


class Suspensions:
    """Nodes an operator suspended or revoked so far (``admin`` entries with outcome ``ok``);
    decisions for them are ``node_inactive``. A revocation is for good."""

    def __init__(self, suspended: Iterable[str] = (), revoked: Iterable[str] = ()) -> None:
        self.suspended = set(suspended)
        self.revoked = set(revoked)

    def apply(self, action: str, target: str, outcome: str) -> None:
        if outcome != "ok":
            return
        if action in ("suspend", "revoke"):
            self.suspended.add(target)
        if action == "revoke":
            self.revoked.add(target)
        elif action == "resume" and target not in self.revoked:
            self.suspended.discard(target)

    def snapshot(self) -> tuple[list[str], list[str]]:
        """The state, to start a run from elsewhere (and to compare with a guess)."""
        return sorted(self.suspended), sorted(self.revoked)


#: The types of each kind's step, field by field (exact types: a ``bool`` is not an ``int``).
_SHAPES: dict[int, tuple[type, ...]] = {
    BAD: (int, int, str),
    ROUTE: (int, int, int, bytes, bytes, int, list, int, list),
    POLICY: (int, int, int, bytes),
    DELIVER: (int, int, int, bytes, str),
    EXPIRE: (int, int, int, bytes, str),
    ADMIN: (int, int, int, str, str, str),
    SESSION: (int, int, int, str, str),
}


def is_step(step: Any, index: int) -> bool:
    """Whether ``step`` is a step :func:`decide_steps` could make for entry ``index``: its
    kind's fields, of their types (what :meth:`Replay.apply` relies on). For steps that come
    from another process."""
    if type(step) is not list or len(step) < 2 or type(step[0]) is not int or step[1] != index:
        return False
    shape = _SHAPES.get(step[0])
    if shape is None or len(step) != len(shape) or any(
            type(value) is not kind for value, kind in zip(step, shape, strict=True)):
        return False
    if step[0] == ROUTE:
        return all(type(node) is str for node in step[6]) and all(
            type(found) is list and len(found) == 2 and type(found[0]) is str
            and type(found[1]) is str for found in step[8])
    return True


def show(decision: Decision) -> str:
    return decision.status() + (f" via {decision.via}" if decision.via else "")


def decide_steps(entries: Sequence[tuple[int, bytes]], bundles: Mapping[bytes, Bundle],
                 cache: DecisionCache, suspensions: Suspensions) -> list[list[Any]]:
    """One step per ``(index, entry bytes)``, in order; ``suspensions`` (the state at the first
    entry) is advanced past the run's ``admin`` entries. Steps:

    - ``[BAD, index, reason]``: the entry does not parse;
    - ``[ROUTE, index, ts, bundle, id, ttl, permitted nodes, decisions, problems]``, problems
      being ``[what, detail]`` pairs (bundle or sender unknown, a decision that differs);
    - ``[POLICY, index, ts, bundle]``; ``[DELIVER|EXPIRE, index, ts, id, to]``;
    - ``[ADMIN, index, ts, action, target, outcome]``; ``[SESSION, index, ts, event, node]``.
    """
    steps: list[list[Any]] = []
    for index, data in entries:
        try:
            entry = entry_from_bytes(data)
        except BrokerError as exc:
            steps.append([BAD, index, f"not a valid entry: {exc.reason}"])
            continue
        if isinstance(entry, RouteEntry):
            steps.append(_route_step(index, entry, bundles, cache, suspensions.suspended))
        elif isinstance(entry, (DeliverEntry, ExpireEntry)):
            kind = DELIVER if isinstance(entry, DeliverEntry) else EXPIRE
            steps.append([kind, index, entry.ts, entry.id, entry.to])
        elif isinstance(entry, PolicyEntry):
            steps.append([POLICY, index, entry.ts, entry.bundle])
        elif isinstance(entry, AdminEntry):
            suspensions.apply(entry.action, entry.target, entry.outcome)
            steps.append([ADMIN, index, entry.ts, entry.action, entry.target, entry.outcome])
        elif isinstance(entry, SessionEntry):
            steps.append([SESSION, index, entry.ts, entry.event, entry.node])
    return steps


def _route_step(index: int, entry: RouteEntry, bundles: Mapping[bytes, Bundle],
                cache: DecisionCache, suspended: set[str]) -> list[Any]:
    problems: list[list[str]] = []
    permitted: list[str] = []
    step: list[Any] = [ROUTE, index, entry.ts, entry.bundle, entry.id, entry.ttl, permitted, 0,
                       problems]
    bundle = bundles.get(entry.bundle)
    if bundle is None:
        problems.append(["replay", f"bundle {entry.bundle.hex()} is not in the export "
                                   "(or does not verify)"])
        return step
    sender = bundle.nodes.get(entry.sender)
    if sender is None:
        problems.append(["replay", f"sender {entry.sender} has no certificate in the bundle"])
        return step
    for node, recorded in entry.decisions.items():
        replayed = decide_recipient(
            entry.label, sender, node, entry.topic, entry.ts, bundle,
            sealed_for=entry.sealed, inactive_nodes=suspended, cache=cache)
        if replayed != recorded:
            problems.append(["replay", f"decision for {node}: logged {show(recorded)}, "
                                       f"replay gives {show(replayed)}"])
        if recorded.permit:
            permitted.append(node)
    step[7] = len(entry.decisions)
    return step


class Replay:
    """The in-order half: applies steps and hands what it finds to ``found``."""

    def __init__(self, found: Sink, bundles: Mapping[bytes, Bundle] | None = None, *,
                 exported: Collection[bytes] | None = None) -> None:
        #: (message id, recipient) released → the TTL ends (ms) of its copies not yet ended.
        #: Usually one; the same envelope routed again (sent again after a broker restart)
        #: makes a second copy. Each copy ends exactly once: delivered or expired.
        self.outstanding: dict[tuple[bytes, str], list[int] | tuple[()]] = {}
        self.suspensions = Suspensions()
        self.active: bytes | None = None  # the bundle of the last ``policy`` entry
        #: The verified bundles by hash: each ``policy`` entry's must follow the one before
        #: and the high-water marks of all before (as the broker checks on every activation).
        self.bundles: Mapping[bytes, Bundle] = bundles or {}
        #: Every bundle the export holds, verified or not (``None``: not known, not checked).
        self.exported = exported
        self.marks = HighWater()
        #: Nodes with a ``connect`` entry and no ``disconnect`` after it.
        self.connected: set[str] = set()
        self.last_ts = 0
        self.found = found
        self.decisions_replayed = 0
        self.deliveries_checked = 0
        self.expiries_checked = 0

    def apply(self, step: Sequence[Any]) -> None:
        """Apply one step of :func:`decide_steps`, in log order."""
        kind, index = step[0], step[1]
        if kind == BAD:
            self.found("entries", step[2], index)
            return
        self._clock(index, step[2])
        if kind == ROUTE:
            self._route(step)
        elif kind in (DELIVER, EXPIRE):
            self._end(kind, index, step[2], step[3], step[4])
        elif kind == POLICY:
            self._activate(index, step[3])
        elif kind == ADMIN:
            self.suspensions.apply(step[3], step[4], step[5])
        elif kind == SESSION:
            if step[3] == "connect":
                self.connected.add(step[4])
            elif step[3] == "disconnect":
                self.connected.discard(step[4])

    def _activate(self, index: int, digest: bytes) -> None:
        """A ``policy`` entry: the broker says it put ``digest`` in force. Its bundle must be
        in the export (the store keeps every bundle ever in force), and must neither step back
        from the one in force before nor go below the marks of every one before: a broker
        refuses that as ``rollback``, so the log shows a broker that did not."""
        new = self.bundles.get(digest)
        before = self.bundles.get(self.active) if self.active is not None else None
        self.active = digest
        if new is None:
            if self.exported is not None and digest not in self.exported:
                self.found("policy", f"bundle {digest.hex()[:16]}… was put in force but is not "
                           "in the export (a store keeps every bundle ever in force)", index)
            return  # in the export but not verified: reported with the bundles
        try:
            self.marks.check_successor(before, new)
        except PolicyDocumentError as exc:
            self.found("policy", f"bundle {digest.hex()[:16]}… was put in force although it "
                       f"{exc.reason} (rollback; brokers before session 16 let a scheme or an "
                       "agreement change at the same version, and a removed document come "
                       "back older)", index)
        self.marks = self.marks.merge(new)

    def _clock(self, index: int, ts: int) -> None:
        """Entry times may jitter, but a jump back in time would let a broker backdate a
        decision into an agreement's window."""
        if ts < self.last_ts - MAX_CLOCK_STEP_BACK_MS:
            self.found("entries", f"time goes back {self.last_ts - ts} ms", index)
        self.last_ts = max(self.last_ts, ts)

    def _route(self, step: Sequence[Any]) -> None:
        _, index, ts, bundle, message_id, ttl, permitted, decided, problems = step
        if bundle != self.active:
            shown = (self.active or b"").hex()[:16] or "none"
            self.found("replay", f"decided under bundle {bundle.hex()[:16]}…, but the bundle "
                       f"in force was {shown}…", index)
        for what, detail in problems:
            self.found(what, detail, index)
        self.decisions_replayed += decided
        for node in permitted:
            copies = self.outstanding.get((message_id, node))
            if not copies:  # new, or all its copies ended (the shared empty tuple)
                copies = self.outstanding[message_id, node] = []
            copies.append(ts + ttl * 1000)
            copies.sort()

    def _end(self, kind: int, index: int, ts: int, message_id: bytes, to: str) -> None:
        """A released copy ends once: delivered, or expired (never before its TTL, which
        would be a silent drop dressed up as an expiry)."""
        what = "deliver" if kind == DELIVER else "expire"
        if kind == DELIVER:
            self.deliveries_checked += 1
        else:
            self.expiries_checked += 1
        copies = self.outstanding.get((message_id, to))
        if copies is None:
            self.found(what, f"message {message_id.hex()} went to {to}, which it was not "
                       "released to", index)
            return
        if not copies:
            self.found(what, f"message {message_id.hex()} for {to} was already delivered "
                       "or expired", index)
            return
        deadline = copies.pop(0)  # the copy whose TTL ends first
        if not copies:
            # Remembered as ended (a second end is flagged), with one shared empty tuple
            # rather than an empty list per copy: an auditor holds one per message released.
            self.outstanding[message_id, to] = _ENDED
        if kind == EXPIRE and ts < deadline:
            self.found("expire", f"message {message_id.hex()} for {to} expired "
                       f"{deadline - ts} ms before its TTL", index)

    def finish(self, grace_ms: int) -> None:
        """A released copy whose TTL ended more than ``grace_ms`` before the log's last entry
        and that was neither delivered nor expired was dropped without a word (say, deleted
        from the broker's queue on disk): its sender was never told. A recipient still
        connected at the end may hold it un-acknowledged (in flight copies do not expire), so
        it is not flagged."""
        cutoff = self.last_ts - grace_ms
        dropped = sorted((key, deadline) for key, deadlines in self.outstanding.items()
                         if key[1] not in self.connected
                         for deadline in deadlines if deadline < cutoff)
        for (message_id, node), deadline in dropped:
            self.found("expire", f"message {message_id.hex()} for {node}: its TTL ended "
                       f"{self.last_ts - deadline} ms before the last entry, yet it was "
                       "neither delivered nor expired (dropped)", None)
