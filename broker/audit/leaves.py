"""The audit log's entry kinds (DESIGN §8) as canonical msgpack maps.

Pure: each kind is a frozen dataclass with ``to_bytes``/``from_bytes``; :func:`entry_from_bytes`
parses any entry strictly (canonical encoding, known kind, exact field set, field types). The
bytes of an entry are what the Merkle tree hashes, so they are produced only by
:func:`broker.canonical.encode` and are never re-encoded on the way to an auditor.

No plaintext is ever logged: a ``route`` entry carries the SHA-256 of the envelope bytes, the
label (metadata, bound to the ciphertext by the sender's signature) and the decisions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from broker import canonical
from broker.errors import ProtocolError
from policies.decide import Decision
from policies.model import Label

#: An entry never exceeds this many bytes (a route entry with thousands of recipients fits).
MAX_ENTRY_BYTES = 4 << 20

SESSION_EVENTS = ("connect", "auth_failed", "disconnect")


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(f"audit entry: {reason}", code="bad_entry")


def _field(value: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    item = value.get(key)
    if not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
        raise _bad(f"field {key!r} missing or of the wrong type")
    return item


def _str_list(value: Mapping[str, Any], key: str) -> tuple[str, ...]:
    items = _field(value, key, list)
    if not all(isinstance(i, str) for i in items) or not canonical.is_sorted_unique(items):
        raise _bad(f"field {key!r} must be a sorted list of unique strings")
    return tuple(items)


def _decision_to_map(decision: Decision) -> dict[str, Any]:
    out: dict[str, Any] = {"permit": decision.permit, "reasons": list(decision.reasons)}
    if decision.via is not None:
        out["via"] = decision.via
    return out


@functools.lru_cache(maxsize=4096)
def _decision_value(decision: Decision) -> dict[str, Any]:
    # Entries repeat a handful of decisions (one per reason set and agreement tier): each is
    # normalised once. Shared: never mutated.
    normalised: dict[str, Any] = canonical.normalised(_decision_to_map(decision))
    return normalised


def _decision_from_map(value: Any) -> Decision:
    if not isinstance(value, dict) or not set(value) <= {"permit", "reasons", "via"}:
        raise _bad("a decision is {permit, reasons, via?}")
    permit = _field(value, "permit", bool)
    reasons = _str_list(value, "reasons")
    via = value.get("via")
    if via is not None and not isinstance(via, str):
        raise _bad("decision 'via' must be a string")
    # A same-nation PERMIT names no agreement, so only a DENY's shape is fixed.
    if permit == bool(reasons) or (via is not None and not permit):
        raise _bad("a decision PERMIT has no reasons; a DENY has reasons and no 'via'")
    return Decision(permit=permit, reasons=reasons, via=via)


class _Interned:
    """What a parser made of a decoded value, by the value's msgpack bytes: route entries
    repeat a handful of labels and decisions, and an auditor parses every entry. Sound for
    values decoded from msgpack only (lists, never tuples): equal bytes are then an equal value,
    and a parse is a function of the value. Only successes are kept, of values up to
    :attr:`MAX_KEY` bytes (a hostile export could otherwise make it hold thousands of large
    labels); bounded (cleared when full: the working set is small)."""

    MAX = 4096
    MAX_KEY = 4096

    def __init__(self) -> None:
        self._parsed: dict[bytes, Any] = {}

    def get(self, value: Any) -> tuple[bytes, Any]:
        """``(key, parsed or None)`` for a decoded ``value``."""
        key = canonical.pack(value)
        return key, self._parsed.get(key)

    def put(self, key: bytes, parsed: Any) -> None:
        if len(key) > self.MAX_KEY:
            return
        if len(self._parsed) >= self.MAX:
            self._parsed.clear()
        self._parsed[key] = parsed


_LABELS = _Interned()
_DECISIONS = _Interned()


def _decided(value: Any) -> Decision:
    """:func:`_decision_from_map` of a decoded value, interned."""
    key, decision = _DECISIONS.get(value)
    if decision is None:
        decision = _decision_from_map(value)
        _DECISIONS.put(key, decision)
    return decision  # type: ignore[no-any-return]


def _entry_label(value: Any) -> Label:
    """The label of a decoded route entry, interned (with its digest, once computed)."""
    key, label = _LABELS.get(value)
    if label is None:
        label = Label.from_canonical_map(value)
        if label.to_map() != value:
            # Label.from_map takes an absent ``cats`` as empty; an entry is written with all
            # five fields, so another form would be a second encoding of the same entry.
            raise _bad("the label must have exactly policy, class, cats, rel and orig")
        _LABELS.put(key, label)
    return label  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True)
class _Entry:
    KIND: ClassVar[str]
    FIELDS: ClassVar[frozenset[str]]

    ts: int

    @classmethod
    def from_decoded(cls, ts: int, value: dict[str, Any]) -> Any:
        """:meth:`from_map` of a map decoded from msgpack (see :func:`entry_from_bytes`)."""
        return cls.from_map(ts, value)  # type: ignore[attr-defined]

    def to_map(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The canonical bytes of this entry: what the Merkle leaf hashes."""
        return canonical.encode({"kind": self.KIND, "ts": self.ts, **self.to_map()})


@dataclasses.dataclass(frozen=True)
class RouteEntry(_Entry):
    """One publish: who sent what to which candidates, and the decision for each."""

    KIND = "route"
    FIELDS = frozenset({"id", "env", "from", "topic", "label", "prec", "ttl", "bundle",
                        "sealed", "decisions"})

    id: bytes
    env: bytes  # SHA-256 of the envelope bytes
    sender: str
    topic: str
    label: Label
    prec: int
    ttl: int
    bundle: bytes  # hash of the policy bundle the decisions were made under
    sealed: tuple[str, ...]  # recipients the envelope carries a key for
    decisions: Mapping[str, Decision]

    def to_map(self) -> dict[str, Any]:
        return {
            "id": self.id, "env": self.env, "from": self.sender, "topic": self.topic,
            "label": self.label.to_map(), "prec": self.prec, "ttl": self.ttl,
            "bundle": self.bundle, "sealed": sorted(self.sealed),
            "decisions": {n: _decision_to_map(d) for n, d in self.decisions.items()},
        }

    def to_bytes(self) -> bytes:
        """As :meth:`_Entry.to_bytes`, built in canonical order and packed once: this runs for
        every publish, and the label and the decisions are normalised once, not per entry
        (tests check it against the generic encoding). A field of an unexpected type takes the
        generic path, so it is refused exactly as there (and never reaches the decision cache,
        where an equal ``Decision(permit=1)`` would stand in for ``permit=True``)."""
        if not self._plain_types():
            return super().to_bytes()
        return canonical.encode_ordered({
            "bundle": self.bundle,
            "decisions": {node: _decision_value(self.decisions[node])
                          for node in sorted(self.decisions)},
            "env": self.env, "from": self.sender, "id": self.id, "kind": self.KIND,
            "label": self.label.canonical_map, "prec": self.prec,
            "sealed": sorted(self.sealed), "topic": self.topic, "ts": self.ts, "ttl": self.ttl,
        })

    def _plain_types(self) -> bool:
        # Exact types (not subclasses: ``bool`` is not an ``int``). Written out: once per
        # publish, and a generator per field group made this half the cost of to_bytes.
        if not (type(self.ts) is int and type(self.prec) is int and type(self.ttl) is int
                and type(self.id) is bytes and type(self.env) is bytes
                and type(self.bundle) is bytes and type(self.sender) is str
                and type(self.topic) is str):
            return False
        for node in self.sealed:
            if type(node) is not str:
                return False
        for node, d in self.decisions.items():
            if type(node) is not str or type(d.permit) is not bool or (
                    d.via is not None and type(d.via) is not str):
                return False
            for reason in d.reasons:
                if type(reason) is not str:
                    return False
        return True

    @classmethod
    def from_map(cls, ts: int, value: Mapping[str, Any]) -> RouteEntry:
        label_map = _field(value, "label", dict)
        label = Label.from_map(label_map)
        if label.to_map() != label_map:
            raise _bad("the label must have exactly policy, class, cats, rel and orig")
        return cls._build(ts, value, label, _decision_from_map)

    @classmethod
    def from_decoded(cls, ts: int, value: dict[str, Any]) -> RouteEntry:
        """:meth:`from_map`, with the label and the decisions interned by their bytes."""
        return cls._build(ts, value, _entry_label(_field(value, "label", dict)), _decided)

    @classmethod
    def _build(cls, ts: int, value: Mapping[str, Any], label: Label,
               decision: Callable[[Any], Decision]) -> RouteEntry:
        decisions = _field(value, "decisions", dict)
        if not all(isinstance(n, str) for n in decisions):
            raise _bad("decision keys must be node ids")
        return cls(
            ts=ts, id=_field(value, "id", bytes), env=_field(value, "env", bytes),
            sender=_field(value, "from", str), topic=_field(value, "topic", str),
            label=label,
            prec=_field(value, "prec", int), ttl=_field(value, "ttl", int),
            bundle=_field(value, "bundle", bytes), sealed=_str_list(value, "sealed"),
            decisions={n: decision(d) for n, d in decisions.items()},
        )

    @property
    def permitted(self) -> tuple[str, ...]:
        """The recipients the message was released to."""
        return tuple(n for n, d in self.decisions.items() if d.permit)


@dataclasses.dataclass(frozen=True)
class DeliverEntry(_Entry):
    """A recipient acknowledged a delivery."""

    KIND = "deliver"
    FIELDS = frozenset({"id", "to", "seq"})

    id: bytes
    to: str
    seq: int

    def to_map(self) -> dict[str, Any]:
        return {"id": self.id, "to": self.to, "seq": self.seq}

    def to_bytes(self) -> bytes:
        """As :meth:`_Entry.to_bytes`, without the generic pass: one per delivered copy (a
        field of an unexpected type takes the generic path, and its refusal)."""
        if not (type(self.ts) is int and type(self.seq) is int and type(self.id) is bytes
                and type(self.to) is str):
            return super().to_bytes()
        return canonical.encode_ordered({"id": self.id, "kind": self.KIND, "seq": self.seq,
                                         "to": self.to, "ts": self.ts})

    @classmethod
    def from_map(cls, ts: int, value: Mapping[str, Any]) -> DeliverEntry:
        return cls(ts=ts, id=_field(value, "id", bytes), to=_field(value, "to", str),
                   seq=_field(value, "seq", int))


@dataclasses.dataclass(frozen=True)
class ExpireEntry(_Entry):
    """An undelivered message passed its TTL and was dropped for one recipient."""

    KIND = "expire"
    FIELDS = frozenset({"id", "to", "from"})

    id: bytes
    to: str
    sender: str

    def to_map(self) -> dict[str, Any]:
        return {"id": self.id, "to": self.to, "from": self.sender}

    @classmethod
    def from_map(cls, ts: int, value: Mapping[str, Any]) -> ExpireEntry:
        return cls(ts=ts, id=_field(value, "id", bytes), to=_field(value, "to", str),
                   sender=_field(value, "from", str))


@dataclasses.dataclass(frozen=True)
class SessionEntry(_Entry):
    """A node connected, failed to authenticate (with the reason), or disconnected."""

    KIND = "session"
    FIELDS = frozenset({"event", "node", "conn", "reason"})

    event: str
    node: str  # "" when the peer never named a node
    conn: str
    reason: str = ""

    def __post_init__(self) -> None:
        if self.event not in SESSION_EVENTS:
            raise _bad(f"unknown session event {self.event!r}")

    def to_map(self) -> dict[str, Any]:
        return {"event": self.event, "node": self.node, "conn": self.conn, "reason": self.reason}

    @classmethod
    def from_map(cls, ts: int, value: Mapping[str, Any]) -> SessionEntry:
        return cls(ts=ts, event=_field(value, "event", str), node=_field(value, "node", str),
                   conn=_field(value, "conn", str), reason=_field(value, "reason", str))


@dataclasses.dataclass(frozen=True)
class PolicyEntry(_Entry):
    """A policy bundle became active (its content is kept by the store under this hash)."""

    KIND = "policy"
    FIELDS = frozenset({"bundle"})

    bundle: bytes

    def to_map(self) -> dict[str, Any]:
        return {"bundle": self.bundle}

    @classmethod
    def from_map(cls, ts: int, value: Mapping[str, Any]) -> PolicyEntry:
        return cls(ts=ts, bundle=_field(value, "bundle", bytes))


@dataclasses.dataclass(frozen=True)
class AdminEntry(_Entry):
    """An operator action through the admin API (``suspend``/``resume`` change decisions)."""

    KIND = "admin"
    FIELDS = frozenset({"operator", "action", "target", "outcome"})

    operator: str
    action: str
    target: str
    outcome: str

    def to_map(self) -> dict[str, Any]:
        return {"operator": self.operator, "action": self.action, "target": self.target,
                "outcome": self.outcome}

    @classmethod
    def from_map(cls, ts: int, value: Mapping[str, Any]) -> AdminEntry:
        return cls(ts=ts, operator=_field(value, "operator", str),
                   action=_field(value, "action", str), target=_field(value, "target", str),
                   outcome=_field(value, "outcome", str))


Entry = RouteEntry | DeliverEntry | ExpireEntry | SessionEntry | PolicyEntry | AdminEntry
_KINDS: dict[str, Any] = {cls.KIND: cls for cls in (
    RouteEntry, DeliverEntry, ExpireEntry, SessionEntry, PolicyEntry, AdminEntry)}


def entry_from_bytes(data: bytes) -> Entry:
    """Parse one entry strictly; raise :class:`ProtocolError` (``bad_entry``/``non_canonical``)."""
    value = canonical.decode(data, max_bytes=MAX_ENTRY_BYTES)
    if not isinstance(value, dict):
        raise _bad("an entry is a map")
    kind = value.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _bad(f"unknown kind {kind!r}")
    if set(value) != cls.FIELDS | {"kind", "ts"}:
        raise _bad(f"a {kind} entry has exactly the fields {sorted(cls.FIELDS | {'kind', 'ts'})}")
    entry: Entry = cls.from_decoded(_field(value, "ts", int), value)
    return entry


def envelope_digest(envelope: bytes) -> bytes:
    """The SHA-256 a route entry records for the envelope bytes."""
    return hashlib.sha256(envelope).digest()
