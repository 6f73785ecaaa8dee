"""The node-protocol frame codec (DESIGN §7): round trips and every rejection path."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest

from broker import canonical, wire
from broker.errors import ProtocolError

NONCE = bytes(range(32))
SIG = bytes(range(64))
MID = bytes(range(16))
MAX_INT = (1 << 63) - 1

#: One full example of every frame type (optional fields set).
FULL: dict[str, wire.Frame] = {
    "challenge": wire.Challenge(v=1, broker="broker.example", nonce=NONCE),
    "hello": wire.Hello(v=1, node="GBR-GW1", nonce=NONCE, ts=1_800_000_000_000, sig=SIG),
    "welcome": wire.Welcome(node="GBR-GW1", checkpoint="origin\n1\nAAAA\n"),
    "sub": wire.Sub(topic="maritime.>"),
    "unsub": wire.Unsub(topic="maritime.*.tracks"),
    "pub": wire.Pub(env=b"\x92\xc4\x00\xc4\x00"),
    "receipt": wire.Receipt(
        id=MID, audit=7, recipients={"FRA-GW1": "denied:no_agreement", "USA-GW1": "queued"}
    ),
    "deliver": wire.Deliver(env=b"envelope bytes", seq=MAX_INT),
    "ack": wire.Ack(seqs=(1, 2, 3)),
    "route": wire.Route(
        topic="maritime.tracks",
        label={"policy": "GBR", "class": "SECRET", "cats": {}, "rel": ["FVEY"], "orig": "GBR"},
        to=("USA-GW1",),
        catalogue=True,
    ),
    "routes": wire.Routes(recipients={"USA-GW1": "permit"}, keys={"USA-GW1": b"\x01" * 32},
                          catalogue={"USA": {"best": {"level": "SECRET"}}}),
    "directory": wire.Directory(certs=(b"cert one", b"cert two")),
    "checkpoint": wire.Checkpoint(note="note text", proof=(b"\x00" * 32, b"\x01" * 32), old=3),
    "cosign": wire.Cosign(line="— witness AAAA"),
    "prove": wire.Prove(index=12),
    "proof": wire.Proof(index=12, size=40, entry=b"entry bytes", proof=(b"\x02" * 32,),
                        checkpoint="origin\n40\nAAAA\n"),
    "expired": wire.Expired(id=MID, recipient="USA-GW1"),
    "ping": wire.Ping(),
    "pong": wire.Pong(),
    "error": wire.Error(code="bad_frame", reason="nope", ref=MID),
}

#: Frames with their optional fields left out.
MINIMAL: dict[str, tuple[wire.Frame, str]] = {
    "welcome": (wire.Welcome(node="GBR-GW1"), "checkpoint"),
    "route": (wire.Route(topic="a", label={}), "to"),
    "route.catalogue": (wire.Route(topic="a", label={}), "catalogue"),
    "routes.catalogue": (wire.Routes(recipients={}, keys={}), "catalogue"),
    "directory": (wire.Directory(), "certs"),
    "error": (wire.Error(code="internal", reason="x"), "ref"),
}


def _raw(obj: Any) -> bytes:
    """Canonical bytes of an arbitrary map (bypassing the frame classes)."""
    return canonical.encode(obj)


def _rejected(data: bytes, code: str = "bad_frame", **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        wire.decode_frame(data, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def test_examples_cover_every_frame_type() -> None:
    assert set(FULL) == set(wire.FRAME_TYPES)
    for tag, frame in FULL.items():
        assert type(frame) is wire.FRAME_TYPES[tag]
        assert tag == frame.T


@pytest.mark.parametrize("tag", sorted(FULL))
def test_every_frame_type_round_trips(tag: str) -> None:
    frame = FULL[tag]
    data = wire.encode_frame(frame)
    back = wire.decode_frame(data)
    assert type(back) is type(frame)
    assert back == frame
    assert wire.encode_frame(back) == data


@pytest.mark.parametrize("tag", sorted(FULL))
def test_encoded_frame_is_a_canonical_map_with_its_tag(tag: str) -> None:
    data = wire.encode_frame(FULL[tag])
    assert canonical.encode(canonical.decode(data)) == data
    raw = msgpack.unpackb(data, raw=False)
    assert raw["t"] == tag
    expected_fields = {f for f, v in vars(FULL[tag]).items() if v is not None}
    assert set(raw) == {"t"} | expected_fields


@pytest.mark.parametrize("tag", sorted(MINIMAL))
def test_absent_optional_field_is_omitted_never_nil(tag: str) -> None:
    frame, optional = MINIMAL[tag]
    data = wire.encode_frame(frame)
    raw = msgpack.unpackb(data, raw=False)
    assert optional not in raw
    assert None not in raw.values()
    back = wire.decode_frame(data)
    assert back == frame
    assert getattr(back, optional) is None


@pytest.mark.parametrize("tag", sorted(MINIMAL))
def test_explicit_nil_for_an_optional_field_is_rejected(tag: str) -> None:
    frame, optional = MINIMAL[tag]
    raw = msgpack.unpackb(wire.encode_frame(frame), raw=False)
    raw[optional] = None
    items = sorted(raw.items(), key=lambda kv: kv[0].encode())
    data = msgpack.packb(dict(items), use_bin_type=True)
    _rejected(data, "non_canonical")


def test_arrays_decode_as_tuples_and_frames_are_hashable_where_fields_allow() -> None:
    ack = wire.decode_frame(_raw({"t": "ack", "seqs": [3, 1]}))
    assert ack == wire.Ack(seqs=(3, 1))
    assert isinstance(ack.seqs, tuple)  # type: ignore[attr-defined]
    hash(ack)


REQUIRED = sorted(
    (tag, field.name)
    for tag, cls in wire.FRAME_TYPES.items()
    for field in dataclasses.fields(cls)
    if field.default is dataclasses.MISSING
)


def test_optional_fields_are_exactly_the_documented_ones() -> None:
    optional = {
        (tag, field.name)
        for tag, cls in wire.FRAME_TYPES.items()
        for field in dataclasses.fields(cls)
        if field.default is not dataclasses.MISSING
    }
    assert optional == {(frame.T, name) for frame, name in MINIMAL.values()}


@pytest.mark.parametrize(("tag", "name"), REQUIRED)
def test_missing_required_field_is_rejected(tag: str, name: str) -> None:
    raw = msgpack.unpackb(wire.encode_frame(FULL[tag]), raw=False)
    assert name in raw
    del raw[name]
    error = _rejected(_raw(raw))
    assert name in error.reason


@pytest.mark.parametrize("tag", sorted(FULL))
def test_unknown_field_is_rejected(tag: str) -> None:
    raw = msgpack.unpackb(wire.encode_frame(FULL[tag]), raw=False)
    raw["zz_extra"] = 1
    error = _rejected(_raw(raw))
    assert "zz_extra" in error.reason


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ({"t": "deliver", "env": b"e", "seq": True}, "bool for int"),
        ({"t": "deliver", "env": b"e", "seq": False}, "bool false for int"),
        ({"t": "deliver", "env": b"e", "seq": -1}, "negative int"),
        ({"t": "deliver", "env": b"e", "seq": MAX_INT + 1}, "int above int64"),
        ({"t": "deliver", "env": b"e", "seq": (1 << 64) - 1}, "uint64 max"),
        ({"t": "deliver", "env": "e", "seq": 1}, "str for bin"),
        ({"t": "deliver", "env": [1], "seq": 1}, "array for bin"),
        ({"t": "deliver", "env": b"e", "seq": "1"}, "str for int"),
        ({"t": "pub", "env": "not bytes"}, "str for bin"),
        ({"t": "sub", "topic": b"maritime"}, "bin for str"),
        ({"t": "sub", "topic": 1}, "int for str"),
        ({"t": "hello", "v": 1, "node": "n", "nonce": NONCE, "ts": -5, "sig": SIG}, "neg ts"),
        ({"t": "hello", "v": True, "node": "n", "nonce": NONCE, "ts": 1, "sig": SIG}, "bool v"),
        ({"t": "ack", "seqs": 1}, "int for array"),
        ({"t": "ack", "seqs": [1, "2"]}, "str in int array"),
        ({"t": "ack", "seqs": [1, -2]}, "negative in int array"),
        ({"t": "ack", "seqs": [True]}, "bool in int array"),
        ({"t": "ack", "seqs": {"a": 1}}, "map for array"),
        ({"t": "directory", "certs": ["c"]}, "str in bin array"),
        ({"t": "receipt", "id": MID, "audit": 1, "recipients": ["a"]}, "array for map"),
        ({"t": "receipt", "id": MID, "audit": 1, "recipients": {"a": 1}}, "int map value"),
        ({"t": "routes", "recipients": {}, "keys": {"a": "k"}}, "str for bin map value"),
        ({"t": "route", "topic": "a", "label": [1]}, "array for label map"),
        ({"t": "route", "topic": "a", "label": {}, "to": "a"}, "str for to array"),
        ({"t": "checkpoint", "note": "n", "proof": [b"x"], "old": 1.5}, "float for int"),
        ({"t": "error", "code": "x", "reason": "y", "ref": "id"}, "str for optional bin"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_field_of_the_wrong_type_is_rejected(frame: dict[str, Any], why: str) -> None:
    if why == "float for int":
        # floats never get past the canonical codec
        data = msgpack.packb(frame, use_bin_type=True)
        _rejected(data, "non_canonical")
        return
    _rejected(_raw(frame))


def test_largest_int64_is_accepted() -> None:
    frame = wire.decode_frame(_raw({"t": "deliver", "env": b"", "seq": MAX_INT}))
    assert frame == wire.Deliver(env=b"", seq=MAX_INT)


def test_route_label_map_is_passed_through_as_is() -> None:
    label = {"anything": [1, {"nested": b"x"}]}
    frame = wire.decode_frame(_raw({"t": "route", "topic": "a", "label": label}))
    assert frame == wire.Route(topic="a", label=label)


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "bogus"},
        {"t": "Ping"},
        {"t": ""},
        {"t": "ping "},
        {"t": 1},
        {"t": b"ping"},
        {"t": ["ping"]},
        {},
        {"type": "ping"},
    ],
)
def test_unknown_or_missing_frame_tag_is_rejected(obj: dict[str, Any]) -> None:
    _rejected(_raw(obj))


@pytest.mark.parametrize("obj", [[], ["ping"], [{"t": "ping"}], "ping", b"ping", 0, True])
def test_frame_that_is_not_a_map_is_rejected(obj: Any) -> None:
    _rejected(_raw(obj))


def test_non_canonical_frame_is_rejected() -> None:
    # {"t": "sub", "topic": "a"} with its keys in the wrong order
    data = b"\x82\xa5topic\xa1a\xa1t\xa3sub"
    _rejected(data, "non_canonical")
    assert wire.decode_frame(b"\x82\xa1t\xa3sub\xa5topic\xa1a") == wire.Sub(topic="a")


def test_frame_with_trailing_bytes_is_rejected() -> None:
    _rejected(wire.encode_frame(wire.Ping()) + b"\x00")


def test_frame_over_the_limit_is_too_large() -> None:
    data = wire.encode_frame(wire.Pub(env=b"x" * 1000))
    assert wire.decode_frame(data, max_bytes=len(data)) == wire.Pub(env=b"x" * 1000)
    _rejected(data, "too_large", max_bytes=len(data) - 1)


def test_encoding_a_frame_with_nil_inside_a_field_fails() -> None:
    with pytest.raises(ProtocolError):
        wire.encode_frame(wire.Route(topic="a", label={"x": None}))


def test_node_frames_are_the_node_to_broker_types() -> None:
    assert set(wire.FRAME_TYPES) >= wire.NODE_FRAMES
    for broker_only in ("challenge", "welcome", "receipt", "deliver", "routes", "checkpoint",
                        "expired", "error"):
        assert broker_only not in wire.NODE_FRAMES
    for node_sent in ("hello", "sub", "unsub", "pub", "ack", "route", "directory", "cosign",
                      "ping"):
        assert node_sent in wire.NODE_FRAMES
