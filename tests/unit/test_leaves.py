"""Audit entries: canonical round trips and strict parsing (a changed entry never parses as
another valid entry of a different meaning without its bytes changing)."""

from __future__ import annotations

import dataclasses

import pytest

from broker import canonical
from broker.audit.leaves import (
    AdminEntry,
    DeliverEntry,
    Entry,
    ExpireEntry,
    PolicyEntry,
    RouteEntry,
    SessionEntry,
    _decision_value,
    _Entry,
    entry_from_bytes,
)
from broker.errors import ProtocolError
from clients.gateway import label
from policies.decide import Decision

ROUTE = RouteEntry(
    ts=1_800_000_000_000, id=b"\x01" * 16, env=b"\x02" * 32, sender="GBR-GW1",
    topic="maritime.tracks", label=label("NATO", "SECRET", "GBR", ["FRA", "GBR", "USA"]),
    prec=2, ttl=3600, bundle=b"\x03" * 32, sealed=("FRA-GW1", "USA-GW1"),
    decisions={"FRA-GW1": Decision(True, (), "CORE@1/inner"),
               "USA-GW1": Decision.deny("ceiling", "no_agreement")},
)
EXAMPLES: list[Entry] = [
    ROUTE,
    DeliverEntry(ts=5, id=b"\x01" * 16, to="FRA-GW1", seq=7),
    ExpireEntry(ts=6, id=b"\x01" * 16, to="USA-GW2", sender="GBR-GW1"),
    SessionEntry(ts=7, event="auth_failed", node="FRA-OLD", conn="ab12", reason="node_inactive"),
    PolicyEntry(ts=8, bundle=b"\x04" * 32),
    AdminEntry(ts=9, operator="alice", action="suspend", target="USA-GW2", outcome="ok"),
]


@pytest.mark.parametrize("entry", EXAMPLES, ids=lambda e: e.KIND)
def test_entry_round_trips_through_canonical_bytes(entry: Entry) -> None:
    data = entry.to_bytes()
    assert entry_from_bytes(data) == entry
    assert canonical.encode(canonical.decode(data)) == data


def test_route_entry_lists_permitted_recipients() -> None:
    assert ROUTE.permitted == ("FRA-GW1",)


def _mutated(entry: Entry, **changes: object) -> bytes:
    value = canonical.decode(entry.to_bytes())
    value.update(changes)
    return canonical.encode({k: v for k, v in value.items() if v is not None})


@pytest.mark.parametrize("changes, message", [
    ({"kind": "teleport"}, "unknown kind"),
    ({"extra": 1}, "exactly the fields"),
    ({"seq": None}, "exactly the fields"),
    ({"seq": "7"}, "'seq'"),
    ({"ts": True}, "'ts'"),
])
def test_malformed_deliver_entry_is_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        entry_from_bytes(_mutated(EXAMPLES[1], **changes))


@pytest.mark.parametrize("decision", [
    {"permit": True, "reasons": ["ceiling"]},  # a permit has no failed reasons
    {"permit": False, "reasons": []},  # a deny must say why
    {"permit": False, "reasons": ["ceiling"], "via": "CORE@1/inner"},
    {"permit": False, "reasons": ["z", "a"]},  # not canonical order
])
def test_inconsistent_decision_is_refused(decision: dict[str, object]) -> None:
    with pytest.raises(ProtocolError, match=r"decision|sorted"):
        entry_from_bytes(_mutated(ROUTE, decisions={"FRA-GW1": decision}))


def test_unknown_session_event_is_refused() -> None:
    with pytest.raises(ProtocolError, match="session event"):
        entry_from_bytes(_mutated(EXAMPLES[3], event="teleport"))


def test_non_canonical_bytes_are_refused() -> None:
    data = bytearray(EXAMPLES[4].to_bytes())
    with pytest.raises(ProtocolError):
        entry_from_bytes(bytes(data) + b"\x00")


class _Str(str):
    """A ``str`` subclass: equal to its value, but not a plain type (the generic path decides)."""


def _generic_outcome(entry: Entry) -> bytes | str:
    try:
        return _Entry.to_bytes(entry)
    except ProtocolError as exc:
        return exc.code


@pytest.mark.parametrize("entry", [
    dataclasses.replace(ROUTE, ttl=2.0),  # type: ignore[arg-type]
    dataclasses.replace(ROUTE, topic=None),  # type: ignore[arg-type]
    dataclasses.replace(ROUTE, prec=True),
    dataclasses.replace(ROUTE, decisions={"FRA-GW1": Decision(permit=1)}),  # type: ignore[arg-type]
    dataclasses.replace(ROUTE, sealed=(7,)),  # type: ignore[arg-type]
    dataclasses.replace(ROUTE, decisions={b"FRA-GW1": Decision(permit=True)}),  # type: ignore[dict-item]
    dataclasses.replace(ROUTE, decisions={"FRA-GW1": Decision(permit=True, via=1)}),  # type: ignore[arg-type]
    dataclasses.replace(ROUTE, decisions={"FRA-GW1": Decision(permit=False, reasons=(b"x",))}),  # type: ignore[arg-type]
    dataclasses.replace(ROUTE, sender=_Str("USA-GW1")),
    dataclasses.replace(ROUTE, bundle=bytearray(32)),  # type: ignore[arg-type]
    DeliverEntry(ts=1.5, id=b"\x01" * 16, to="FRA-GW1", seq=7),  # type: ignore[arg-type]
    DeliverEntry(ts=5, id=None, to="FRA-GW1", seq=7),  # type: ignore[arg-type]
    DeliverEntry(ts=5, id=b"\x01" * 16, to="FRA-GW1", seq=1 << 64),
], ids=["float-ttl", "nil-topic", "bool-prec", "int-permit", "int-sealed", "bytes-node",
        "int-via", "bytes-reason", "str-subclass-sender", "bytearray-bundle", "float-ts", "nil-id",
        "huge-seq"])
def test_direct_entry_encoders_refuse_or_encode_exactly_as_the_generic_path(entry: Entry) -> None:
    try:
        fast: bytes | str = entry.to_bytes()
    except ProtocolError as exc:
        fast = exc.code
    assert fast == _generic_outcome(entry)


def test_an_int_permit_does_not_poison_the_decision_cache() -> None:
    # Decision(permit=1) == Decision(permit=True): if the first reached the cache, every later
    # PERMIT would be encoded with an int and no longer parse.
    _decision_value.cache_clear()  # as in a fresh broker: the odd one comes first
    same = Decision(permit=1, reasons=(), via="CORE@1/inner")  # type: ignore[arg-type]
    assert same == ROUTE.decisions["FRA-GW1"]
    dataclasses.replace(ROUTE, decisions={"FRA-GW1": same}).to_bytes()
    assert entry_from_bytes(ROUTE.to_bytes()) == ROUTE
    assert ROUTE.to_bytes() == _Entry.to_bytes(ROUTE)


def test_interned_labels_and_decisions_are_the_ones_in_the_bytes() -> None:
    """Parsed labels and decisions are reused by their bytes: entries that differ in one
    reason or one label field each parse as what they say, and a bad one is refused every
    time (only what parsed is kept)."""
    other = dataclasses.replace(
        ROUTE, label=label("NATO", "SECRET", "GBR", ["FRA", "GBR"]),
        decisions={**ROUTE.decisions, "USA-GW1": Decision.deny("ceiling")})
    for entry in (ROUTE, other, ROUTE, other):
        assert entry_from_bytes(entry.to_bytes()) == entry
    first, second = (entry_from_bytes(ROUTE.to_bytes()) for _ in range(2))
    assert isinstance(first, RouteEntry) and isinstance(second, RouteEntry)
    assert first.label is second.label  # parsed once
    bad = _mutated(ROUTE, decisions={"FRA-GW1": {"permit": True, "reasons": ["ceiling"]}})
    for _ in range(2):
        with pytest.raises(ProtocolError, match="PERMIT has no reasons"):
            entry_from_bytes(bad)
    label_map = canonical.decode(ROUTE.to_bytes())["label"]
    del label_map["cats"]
    for _ in range(2):
        with pytest.raises(ProtocolError, match="exactly policy, class, cats, rel and orig"):
            entry_from_bytes(_mutated(ROUTE, label=label_map))


def test_a_large_label_is_parsed_every_time_not_kept() -> None:
    """A hostile export's large labels must not pile up in the intern cache."""
    from broker.audit.leaves import _LABELS

    big = dataclasses.replace(ROUTE, label=label("NATO", "SECRET", "GBR",
                                                 [f"N{i:04d}" for i in range(1000)]))
    first, second = (entry_from_bytes(big.to_bytes()) for _ in range(2))
    assert first == second == big
    assert isinstance(first, RouteEntry) and isinstance(second, RouteEntry)
    assert first.label is not second.label and first.label == second.label
    assert all(len(key) <= _LABELS.MAX_KEY for key in _LABELS._parsed)
