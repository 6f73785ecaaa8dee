"""The hot paths that bypass :func:`broker.canonical.encode` give the very same bytes (hypothesis).

For speed, audit entries (``RouteEntry``/``DeliverEntry.to_bytes``), frames
(``wire.encode_frame``), labels (``Label.canonical_map``/``digest``/``from_canonical_map``) and
envelopes (``Envelope.label_bytes``) are packed with :func:`broker.canonical.encode_ordered`
from values normalised once. Their contract is byte identity with the generic, checked
encoding; these properties compare the two on generated values (non-ASCII text, keys whose code
point order differs from other orders, maps built in unsorted insertion order, integers up to
the 64-bit limits), check the decoders read the bytes back, that what the contract forbids is
refused the same way, and that encoder and decoder agree on the nesting limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import typing
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import nacl.public
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import canonical, wire
from broker.audit.leaves import DeliverEntry, RouteEntry, _Entry, entry_from_bytes
from broker.envelope import Envelope, build_envelope
from broker.errors import ProtocolError
from policies.decide import Decision
from policies.model import Label
from tests.property.strategies import leaves

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CRYPTO = settings(FAST, max_examples=30)
ENTRIES = settings(FAST, max_examples=40)

MAX_INT = (1 << 63) - 1
#: The contract's nesting limit (``canonical._MAX_DEPTH``), written out: a change must show here.
MAX_DEPTH = 16

# --- strategies ----------------------------------------------------------------------------------

#: Characters whose code point order differs from other plausible orders: case (``B`` < ``a``),
#: Latin-1 vs ASCII, combining marks, and BMP characters above the surrogates (U+FF01) that sort
#: *before* astral ones by code point / UTF-8 but *after* them in UTF-16.
TRICKY = ["a", "B", "Z", "_", "-", "0", "é", "É", "ß", "\u0301", "\uff01", "\ufffd",
          "\U00010000", "\U0001f600", "中", "\u00a0"]
chars = st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8"))
#: Non-empty strings (labels, node ids, tags refuse empty ones).
names = st.text(chars, min_size=1, max_size=6)
any_text = st.text(chars, max_size=8)
u64_ints = st.integers(min_value=0, max_value=MAX_INT)
sorted_sets = st.sets(names, max_size=5).map(lambda s: tuple(canonical.canonical_set(list(s))))


def _shuffle(pair: tuple[dict[str, Any], random.Random]) -> dict[str, Any]:
    items = list(pair[0].items())
    pair[1].shuffle(items)
    return dict(items)


def _shuffled(mapping: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Maps whose insertion order is a random permutation (not the canonical one)."""
    return st.tuples(mapping, st.randoms(use_true_random=False)).map(_shuffle)


labels = st.builds(
    Label,
    policy=names, cls=names,
    cats=_shuffled(st.dictionaries(names, sorted_sets, max_size=5)),
    rel=sorted_sets, orig=names,
)

#: Labels as a careless caller might build them: value sets in any order (still encodable).
loose_labels = st.builds(
    Label,
    policy=names, cls=names,
    cats=_shuffled(st.dictionaries(names, st.lists(names, max_size=4).map(tuple), max_size=5)),
    rel=st.lists(names, max_size=4).map(tuple), orig=names,
)

permits = st.builds(Decision, permit=st.just(True), reasons=st.just(()),
                    via=st.one_of(st.none(), st.just("X@1/inner"), names))
denies = st.lists(any_text, min_size=1, max_size=4).map(lambda r: Decision.deny(*r))
decisions = st.one_of(permits, denies)


@st.composite
def route_entries(draw: st.DrawFn, *, valid: bool = True) -> RouteEntry:
    """Route entries; ``valid`` ones parse back (sealed sorted and unique, sets canonical)."""
    drawn = draw(st.lists(names, max_size=8))
    sealed = canonical.canonical_set(drawn) if valid else draw(st.permutations(drawn))
    return RouteEntry(
        ts=draw(u64_ints), id=draw(st.binary(max_size=16)), env=draw(st.binary(max_size=32)),
        sender=draw(any_text), topic=draw(any_text),
        label=draw(labels if valid else st.one_of(labels, loose_labels)),
        prec=draw(u64_ints), ttl=draw(u64_ints), bundle=draw(st.binary(max_size=32)),
        sealed=tuple(sealed),
        decisions=draw(_shuffled(st.dictionaries(names, decisions, max_size=12))),
    )


def _generic(entry: _Entry) -> bytes:
    """The reference: what :meth:`_Entry.to_bytes` (the generic encoding) gives."""
    return _Entry.to_bytes(entry)


def _any_values(depth: int, *, tuples: bool) -> st.SearchStrategy[Any]:
    """Canonical values for ``Mapping[str, Any]`` fields; with ``tuples``, sequences may be
    tuples (which encode as arrays but decode as lists)."""
    if depth == 0:
        return leaves
    inner = _any_values(depth - 1, tuples=tuples)
    seqs = st.lists(inner, max_size=4)
    if tuples:
        seqs = st.one_of(seqs, seqs.map(tuple))
    return st.one_of(leaves, seqs, _shuffled(st.dictionaries(any_text, inner, max_size=4)))


def _for_hint(hint: Any, *, roundtrip: bool) -> st.SearchStrategy[Any]:
    """A strategy for one frame field annotation."""
    args = typing.get_args(hint)
    if type(None) in args:  # ``X | None``: absent or present
        (inner,) = [a for a in args if a is not type(None)]
        return st.one_of(st.none(), _for_hint(inner, roundtrip=roundtrip))
    if hint is bool:
        return st.booleans()
    if hint is int:
        # Decoders accept 0..2**63-1; the encoders take any 64-bit msgpack integer.
        return u64_ints if roundtrip else st.one_of(
            u64_ints, st.integers(-(1 << 63), (1 << 64) - 1))
    if hint is str:
        return any_text
    if hint is bytes:
        return st.binary(max_size=40)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return st.lists(_for_hint(args[0], roundtrip=roundtrip), max_size=40).map(tuple)
    if origin is Mapping:
        value: st.SearchStrategy[Any] = (
            _any_values(3, tuples=not roundtrip) if args[1] is Any
            else _for_hint(args[1], roundtrip=roundtrip))
        return _shuffled(st.dictionaries(any_text, value, max_size=30))
    raise AssertionError(f"no strategy for {hint!r}")


def _frames_of(cls: type[wire.Frame], *, roundtrip: bool) -> st.SearchStrategy[wire.Frame]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: _for_hint(hints[f.name], roundtrip=roundtrip)
              for f in dataclasses.fields(cls)}
    return st.fixed_dictionaries(fields).map(lambda kwargs: cls(**kwargs))


def frames(*, roundtrip: bool) -> st.SearchStrategy[wire.Frame]:
    """A frame of any type in ``wire.FRAME_TYPES``, built from its field annotations."""
    return st.one_of([_frames_of(cls, roundtrip=roundtrip)
                      for _, cls in sorted(wire.FRAME_TYPES.items())])


def _canonical_keys(value: Any) -> Any:
    """``value`` with every map rebuilt in canonical key order (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _canonical_keys(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical_keys(v) for v in value]
    return value


def _deepest(value: Any, depth: int = 0) -> int:
    """Where the deepest value sits (the top is at 0; a non-empty container's items one lower)."""
    if isinstance(value, (dict, list)) and value:
        items = value.values() if isinstance(value, dict) else value
        return max(_deepest(item, depth + 1) for item in items)
    return depth


@st.composite
def deep_values(draw: st.DrawFn) -> Any:
    """Values nested around the limit: a chain of 13–19 containers (lists and maps, some with a
    sibling before or after) around a scalar, an empty list or an empty map; keys in canonical
    order."""
    value: Any = draw(st.one_of(leaves, st.just([]), st.just({}), _any_values(1, tuples=False)))
    levels = draw(st.integers(13, 19))
    shape = st.tuples(st.booleans(), st.booleans(), st.one_of(st.none(), leaves),
                      st.sampled_from(TRICKY))
    for is_list, before, sibling, key in draw(st.lists(shape, min_size=levels,
                                                       max_size=levels)):
        if is_list:
            value = [value] if sibling is None else (
                [sibling, value] if before else [value, sibling])
        else:  # the chain's key "k" sorts after the ASCII sibling keys, before the others
            value = {"k": value} if sibling is None else {"k": value, key: sibling}
    return _canonical_keys(value)


def _nest(levels: int, innermost: Any, kind: str) -> Any:
    """``levels`` containers (``list`` or ``dict``) one inside the other around ``innermost``
    (an item of the innermost container, or ``None`` for an empty innermost container)."""
    value: Any = ([] if kind == "list" else {}) if innermost is None else (
        [innermost] if kind == "list" else {"k": innermost})
    for _ in range(levels - 1):
        value = [value] if kind == "list" else {"k": value}
    return value


def _accepts(step: Callable[[Any], object], value: Any) -> bool:
    """Whether ``step`` takes ``value``; a refusal must be ``bad_frame``."""
    try:
        step(value)
    except ProtocolError as exc:
        assert exc.code == "bad_frame", exc
        return False
    return True


def _encodes(value: Any) -> bool:
    return _accepts(canonical.encode, value)


def _decodes(data: bytes) -> bool:
    return _accepts(canonical.decode, data)


# --- 1, 2: audit entries -------------------------------------------------------------------------


@ENTRIES
@given(route_entries(valid=False))
def test_route_entry_bytes_equal_the_generic_encoding(entry: RouteEntry) -> None:
    assert entry.to_bytes() == _generic(entry)
    assert entry.to_bytes() == entry.to_bytes()  # cached parts are not mutated by packing


@ENTRIES
@given(route_entries())
def test_valid_route_entry_round_trips(entry: RouteEntry) -> None:
    data = entry.to_bytes()
    assert data == _generic(entry)
    back = entry_from_bytes(data)
    assert back == entry
    assert back.to_bytes() == data


@settings(FAST, max_examples=15)
@given(st.lists(route_entries(), min_size=2, max_size=3))
def test_route_entries_sharing_labels_and_decisions_encode_alike(
        entries: list[RouteEntry]) -> None:
    # The label's canonical map and the decisions' maps are cached and shared between
    # entries: encoding one entry must not change what another encodes to.
    shared = [dataclasses.replace(e, label=entries[0].label,
                                  decisions={**entries[0].decisions, **e.decisions})
              for e in entries]
    for entry in shared + shared[::-1]:
        assert entry.to_bytes() == _generic(entry)


def test_route_entry_with_many_unsorted_decisions_matches_generic() -> None:
    nodes = [*reversed([f"N{i:03d}-{chr(0x1F600 + i % 5)}" for i in range(200)]), "é", "B", "a"]
    entry = RouteEntry(
        ts=MAX_INT, id=b"\x00" * 16, env=b"\x01" * 32, sender="GBR-GW1", topic="t.é",
        label=Label(policy="GBR", cls="SECRET",
                    cats={"é": ("b",), "Z": ("a", "b"), "a": ("\U00010000",), "\uff01": ("x",)},
                    rel=("B", "a"), orig="GBR"),
        prec=MAX_INT, ttl=MAX_INT, bundle=b"\x02" * 32, sealed=tuple(reversed(nodes)),
        decisions={n: (Decision(True, (), "X@1/inner") if i % 3 else Decision.deny("r2", "r1"))
                   for i, n in enumerate(nodes)},
    )
    assert entry.to_bytes() == _generic(entry)


@FAST
@given(ts=u64_ints, id_=st.binary(max_size=16), to=any_text, seq=u64_ints)
def test_deliver_entry_bytes_equal_the_generic_encoding(ts: int, id_: bytes, to: str,
                                                        seq: int) -> None:
    entry = DeliverEntry(ts=ts, id=id_, to=to, seq=seq)
    data = entry.to_bytes()
    assert data == _generic(entry)
    assert entry_from_bytes(data) == entry


# --- 3, 4: frames --------------------------------------------------------------------------------


@FAST
@given(frames(roundtrip=False))
def test_encode_frame_equals_the_generic_encoding(frame: wire.Frame) -> None:
    assert wire.encode_frame(frame) == canonical.encode(frame.to_map())


@FAST
@given(frames(roundtrip=True))
def test_generated_frames_round_trip(frame: wire.Frame) -> None:
    data = wire.encode_frame(frame)
    assert data == canonical.encode(frame.to_map())
    back = wire.decode_frame(data)
    assert type(back) is type(frame)
    assert back == frame
    assert wire.encode_frame(back) == data


@pytest.mark.parametrize("tag", sorted(wire.FRAME_TYPES))
@settings(FAST, max_examples=5)
@given(data=st.data())
def test_every_frame_type_encodes_like_the_generic_encoding(tag: str, data: st.DataObject) -> None:
    # Each type on its own as well (``frames()`` mixes them), both strategies.
    cls = wire.FRAME_TYPES[tag]
    frame = data.draw(_frames_of(cls, roundtrip=False))
    assert wire.encode_frame(frame) == canonical.encode(frame.to_map())
    frame = data.draw(_frames_of(cls, roundtrip=True))
    assert wire.decode_frame(wire.encode_frame(frame)) == frame


@settings(FAST, max_examples=30)
@given(_shuffled(st.dictionaries(names, any_text, min_size=10, max_size=40)),
       st.lists(u64_ints, min_size=10, max_size=100))
def test_receipt_with_many_recipients_and_ack_with_many_seqs(recipients: dict[str, str],
                                                            seqs: list[int]) -> None:
    for frame in (wire.Receipt(id=b"\x07" * 16, audit=MAX_INT, recipients=recipients),
                  wire.Ack(seqs=tuple(seqs))):
        data = wire.encode_frame(frame)
        assert data == canonical.encode(frame.to_map())
        assert wire.decode_frame(data) == frame


POISON: list[tuple[str, Any]] = [
    ("float", 1.5), ("nil", None), ("float in a list", [1, 2.0]),
    ("nil in a map", {"a": None}), ("deep float", {"a": {"b": [{"c": 0.0}]}}),
]


def _poisoned_frames(bad: Any) -> list[wire.Frame]:
    return [
        wire.Routes(recipients={}, keys={}, catalogue={"USA": {"best": bad}}),
        wire.Routes(recipients={}, keys={}, catalogue={"z": 1, "USA": bad}),
        wire.Route(topic="a", label={"policy": "GBR", "cats": {"x": bad}}),
        wire.Receipt(id=b"", audit=1, recipients={"USA-GW1": bad}),
    ]


@pytest.mark.parametrize(("what", "bad"), POISON, ids=[p[0] for p in POISON])
def test_float_or_nil_inside_a_map_field_is_bad_frame(what: str, bad: Any) -> None:
    for frame in _poisoned_frames(bad):
        with pytest.raises(ProtocolError) as info:
            wire.encode_frame(frame)
        assert info.value.code == "bad_frame", (what, frame)
        with pytest.raises(ProtocolError) as generic:
            canonical.encode(frame.to_map())
        assert generic.value.code == "bad_frame"


@pytest.mark.parametrize("bad", [1.5, float("nan")])
def test_float_in_a_scalar_or_tuple_field_is_bad_frame(bad: Any) -> None:
    for frame in (wire.Prove(index=bad), wire.Ack(seqs=(1, bad)),
                  wire.Checkpoint(note="n", proof=(b"", bad), old=0)):
        with pytest.raises(ProtocolError) as info:
            wire.encode_frame(frame)
        assert info.value.code == "bad_frame"


@pytest.mark.parametrize("big", [1 << 64, (1 << 64) + 1, 1 << 200, -(1 << 63) - 1])
def test_out_of_range_int_is_bad_frame_not_overflow(big: int) -> None:
    cases: list[wire.Frame] = [
        wire.Prove(index=big),
        wire.Deliver(env=b"e", seq=big),
        wire.Ack(seqs=(1, big, 2)),
        wire.Routes(recipients={}, keys={}, catalogue={"USA": {"n": [big]}}),
        wire.Route(topic="a", label={"n": big}),
    ]
    for frame in cases:
        with pytest.raises(ProtocolError) as info:
            wire.encode_frame(frame)
        assert info.value.code == "bad_frame", frame
        with pytest.raises(ProtocolError):
            canonical.encode(frame.to_map())


def test_the_64_bit_limits_themselves_encode() -> None:
    for n in ((1 << 64) - 1, -(1 << 63)):
        frame = wire.Routes(recipients={}, keys={}, catalogue={"n": n})
        assert wire.encode_frame(frame) == canonical.encode(frame.to_map())


# --- 5: nesting ----------------------------------------------------------------------------------


@settings(FAST, max_examples=60)
@given(deep_values())
def test_encode_and_decode_accept_the_same_nesting(value: Any) -> None:
    expected = _deepest(value) <= MAX_DEPTH
    encodes = _encodes(value)
    decodes = _decodes(msgpack.packb(value, use_bin_type=True))
    assert encodes == decodes == expected, (_deepest(value), encodes, decodes)
    if encodes:
        assert canonical.encode(value) == msgpack.packb(value, use_bin_type=True)


def test_the_nesting_limit_is_16() -> None:
    assert canonical._MAX_DEPTH == MAX_DEPTH


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize(("innermost", "deepest_accepted"), [
    # Every value, scalars included, may sit at most _MAX_DEPTH (16) below the top (at 0):
    # 16 containers around a scalar (the scalar at depth 16), 17 around nothing (the empty
    # innermost container at depth 16).
    (7, MAX_DEPTH), ("s", MAX_DEPTH), (None, MAX_DEPTH + 1),
], ids=["int", "str", "empty"])
def test_nesting_limit_is_the_same_for_encode_and_decode(kind: str, innermost: Any,
                                                         deepest_accepted: int) -> None:
    for levels in range(1, deepest_accepted + 3):
        value = _nest(levels, innermost, kind)
        accepted = levels <= deepest_accepted
        assert _encodes(value) is accepted, (levels, "encode")
        assert _decodes(msgpack.packb(value, use_bin_type=True)) is accepted, (levels, "decode")
        if kind == "list":  # tuples nest like lists
            assert _encodes(_tuples(value)) is accepted, (levels, "encode tuples")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def test_nesting_limit_holds_below_a_frame_field() -> None:
    # A frame's fields sit at depth 1, so a nested field value gets one level less; the fast
    # path (``normalised(value, depth=1)``) must count the same way as the generic encoding.
    for levels in range(MAX_DEPTH - 2, MAX_DEPTH + 2):
        frame = wire.Route(topic="a", label={"k": _nest(levels, 1, "list")})
        try:
            fast: bytes | None = wire.encode_frame(frame)
        except ProtocolError:
            fast = None
        try:
            generic: bytes | None = canonical.encode(frame.to_map())
        except ProtocolError:
            generic = None
        assert fast == generic, levels
        if generic is not None:
            assert wire.decode_frame(generic) == frame


# --- 6: labels -----------------------------------------------------------------------------------


@FAST
@given(labels)
def test_label_from_canonical_map_packs_to_the_generic_encoding(label: Label) -> None:
    expected = canonical.encode(label.to_map())
    decoded = canonical.decode(expected)
    back = Label.from_canonical_map(decoded)
    assert back == label
    assert canonical.encode_ordered(back.canonical_map) == expected
    assert back.digest == hashlib.sha256(expected).digest()
    # A label built directly gets the same canonical map and digest.
    assert canonical.encode_ordered(label.canonical_map) == expected
    assert label.digest == back.digest


@FAST
@given(labels)
def test_label_without_cats_still_has_cats_in_its_canonical_map(label: Label) -> None:
    four = {k: v for k, v in label.to_map().items() if k != "cats"}
    decoded = canonical.decode(canonical.encode(four))
    back = Label.from_canonical_map(decoded)
    expected_label = dataclasses.replace(label, cats={})
    assert back == expected_label
    assert back.canonical_map is not decoded
    assert back.canonical_map["cats"] == {}
    assert list(back.canonical_map) == sorted(["policy", "class", "cats", "rel", "orig"])
    expected = canonical.encode(expected_label.to_map())
    assert canonical.encode_ordered(back.canonical_map) == expected
    assert back.digest == hashlib.sha256(expected).digest()


# --- 7: envelopes --------------------------------------------------------------------------------

NOW = 1_800_000_000_000
SENDER = nacl.signing.SigningKey(b"\x44" * 32)
RECIPIENT = nacl.public.PrivateKey(b"\x55" * 32)
OTHER = nacl.public.PrivateKey(b"\x66" * 32)


@CRYPTO
@given(st.one_of(labels, labels.map(lambda label: dataclasses.replace(label, cats={}))),
       st.binary(max_size=64))
def test_envelope_label_bytes_equal_the_generic_encoding(label: Label, payload: bytes) -> None:
    data = build_envelope(
        signing_key=SENDER, sender="GBR-GW1", topic="maritime.tracks", payload=payload,
        label=label, prec=1, ttl=60,
        recipient_keys={"USA-GW1": bytes(RECIPIENT.public_key),
                        "FRA-GW1": bytes(OTHER.public_key)},
        now_ms=NOW,
    )
    envelope = Envelope.from_bytes(data)
    expected = canonical.encode(label.to_map())
    assert envelope.label_bytes == expected
    assert envelope.label == label
    assert canonical.encode_ordered(envelope.label.canonical_map) == expected
    assert envelope.label.digest == hashlib.sha256(expected).digest()
    # label_bytes is the AAD's label part: the payload opens for each recipient.
    assert envelope.open("USA-GW1", RECIPIENT) == payload
    assert envelope.open("FRA-GW1", OTHER) == payload
