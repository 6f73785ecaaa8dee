"""Properties of the canonical codec, the frame codec, envelopes and labels (hypothesis).

- canonical encode/decode is an identity on everything the contract allows;
- arbitrary or mutated bytes never make a decoder raise anything but ``ProtocolError``;
- every single flipped bit of a valid envelope is caught: by parsing, or by the signature (every
  bit is either in the signed body or in the signature itself);
- labels survive ``to_map``/``from_map`` and canonical encoding.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import nacl.public
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import canonical, wire
from broker.envelope import Envelope, build_envelope
from broker.errors import ProtocolError, VerificationError
from policies.model import Label
from tests.property.strategies import leaves, nested, text

NOW = 1_800_000_000_000
SENDER = nacl.signing.SigningKey(b"\x11" * 32)
SENDER_PUB = bytes(SENDER.verify_key)
RECIPIENT = nacl.public.PrivateKey(b"\x22" * 32)
OTHER = nacl.public.PrivateKey(b"\x33" * 32)
PAYLOAD = b"secret payload"
LABEL = Label(policy="GBR", cls="SECRET", cats={"NTK": ("ALPHA",)}, rel=("FVEY",), orig="GBR")

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _envelope(payload: bytes = PAYLOAD, label: Label = LABEL,
              to: tuple[str, ...] = ("USA-GW1",)) -> bytes:
    return build_envelope(
        signing_key=SENDER, sender="GBR-GW1", topic="maritime.tracks", payload=payload,
        label=label, prec=1, ttl=60,
        recipient_keys={"USA-GW1": bytes(RECIPIENT.public_key),
                        "FRA-GW1": bytes(OTHER.public_key)},
        now_ms=NOW, to=to,
    )


ENVELOPE = _envelope()

# --- strategies ----------------------------------------------------------------------------------

values = nested(4)

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
name_sets = st.sets(names, max_size=4).map(canonical.canonical_set)
labels = st.builds(
    Label,
    policy=names,
    cls=names,
    cats=st.dictionaries(names, name_sets.map(tuple), max_size=3),
    rel=name_sets.map(tuple),
    orig=names,
)


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Bytes near ``data``: a replaced byte, a deleted range, inserted bytes, or truncation."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            if not out:
                break
            pos = draw(st.integers(0, len(out) - 1))
            kind = draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
            if kind == "replace":
                out[pos] = draw(st.integers(0, 255))
            elif kind == "delete":
                del out[pos:pos + draw(st.integers(1, 8))]
            elif kind == "insert":
                out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            else:
                del out[pos:]
        return bytes(out)

    return mutate()


# --- canonical codec -----------------------------------------------------------------------------


@FAST
@given(values)
def test_canonical_round_trip(value: Any) -> None:
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


@FAST
@given(st.dictionaries(text, leaves, min_size=2, max_size=8), st.randoms(use_true_random=False))
def test_map_encoding_ignores_insertion_order(value: dict[str, Any], rnd: Any) -> None:
    items = list(value.items())
    rnd.shuffle(items)
    assert canonical.encode(dict(items)) == canonical.encode(value)


@FAST
@given(st.dictionaries(text, leaves, min_size=2, max_size=8))
def test_map_keys_come_out_sorted_by_utf8_bytes(value: dict[str, Any]) -> None:
    keys = list(canonical.decode(canonical.encode(value)))
    assert [k.encode() for k in keys] == sorted(k.encode() for k in keys)


@FAST
@given(st.lists(names, max_size=8))
def test_canonical_set_is_sorted_unique(items: list[str]) -> None:
    out = canonical.canonical_set(items)
    assert canonical.is_sorted_unique(out)
    assert set(out) == set(items)
    assert canonical.is_sorted_unique(items) is (out == items)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    for parse in (canonical.decode, wire.decode_frame, Envelope.from_bytes):
        with contextlib.suppress(ProtocolError):
            parse(data)


def _loose(depth: int) -> st.SearchStrategy[Any]:
    """Values msgpack can pack but the contract may forbid: nil, floats, any key order."""
    leaf = st.one_of(leaves, st.none(), st.floats(allow_nan=False))
    if depth == 0:
        return leaf
    inner = _loose(depth - 1)
    return st.one_of(
        leaf,
        st.lists(inner, max_size=3),
        st.lists(st.tuples(text, inner), max_size=3).map(dict),
    )


@FAST
@given(_loose(3))
def test_decode_accepts_only_bytes_that_re_encode_identically(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    try:
        decoded = canonical.decode(data)
    except ProtocolError:
        return
    assert canonical.encode(decoded) == data


FRAME = wire.encode_frame(wire.Route(topic="maritime.tracks", label=LABEL.to_map(),
                                     to=("FRA-GW1", "USA-GW1")))


@settings(max_examples=300, deadline=None)
@given(st.one_of(_mutations(ENVELOPE), _mutations(FRAME)))
def test_mutated_frames_and_envelopes_only_ever_raise_protocol_error(data: bytes) -> None:
    for parse in (canonical.decode, wire.decode_frame, Envelope.from_bytes):
        with contextlib.suppress(ProtocolError):
            parse(data)


@FAST
@given(values)
def test_re_encoding_is_stable_for_anything_decoded(value: Any) -> None:
    # whatever decode accepts, it returns a value that encodes to the very same bytes
    data = canonical.encode(value)
    for cut in range(len(data)):
        try:
            decoded = canonical.decode(data[:cut])
        except ProtocolError:
            continue
        assert canonical.encode(decoded) == data[:cut]


# --- envelopes -----------------------------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _outcome(data: bytes) -> str:
    """How a (possibly tampered) envelope is caught: 'parse', 'verify', or 'accepted'."""
    try:
        env = Envelope.from_bytes(data)
    except ProtocolError:
        return "parse"
    try:
        env.verify(SENDER_PUB)
    except VerificationError:
        return "verify"
    return "accepted"


def test_every_single_bit_flip_of_an_envelope_is_caught() -> None:
    # Exhaustive over one envelope: every bit is in the outer framing, the signed body or the
    # signature, so a flip must fail parsing or fail the signature. None is accepted.
    assert _outcome(ENVELOPE) == "accepted"
    outcomes: dict[str, int] = {}
    for bit in range(len(ENVELOPE) * 8):
        outcome = _outcome(_flip(ENVELOPE, bit))
        assert outcome != "accepted", f"flipping bit {bit} went unnoticed"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # both defences are exercised: many flips still parse and only the signature catches them
    assert outcomes["parse"] > 0
    assert outcomes["verify"] > 0


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64), labels, st.data())
def test_any_bit_flip_of_any_envelope_is_caught(payload: bytes, label: Label,
                                                data: st.DataObject) -> None:
    envelope = _envelope(payload, label)
    env = Envelope.from_bytes(envelope)
    env.verify(SENDER_PUB)
    assert env.open("USA-GW1", RECIPIENT) == payload
    assert env.label == label
    bit = data.draw(st.integers(0, len(envelope) * 8 - 1))
    assert _outcome(_flip(envelope, bit)) != "accepted"


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_flipped_bit_in_the_ciphertext_area_never_opens_to_the_payload(data: st.DataObject) -> None:
    # Even ignoring the signature, the AEAD catches changes to the sealed parts.
    env = Envelope.from_bytes(ENVELOPE)
    start = ENVELOPE.index(env.ct)
    bit = data.draw(st.integers(start * 8, (start + len(env.ct)) * 8 - 1))
    tampered = Envelope.from_bytes(_flip(ENVELOPE, bit))
    with pytest.raises(VerificationError):
        tampered.verify(SENDER_PUB)
    with pytest.raises(VerificationError):
        tampered.open("USA-GW1", RECIPIENT)


# --- labels --------------------------------------------------------------------------------------


@FAST
@given(labels)
def test_label_round_trips_through_its_map_and_canonical_bytes(label: Label) -> None:
    as_map = label.to_map()
    assert Label.from_map(as_map) == label
    data = canonical.encode(as_map)
    assert Label.from_map(canonical.decode(data)) == label
    assert canonical.encode(Label.from_map(canonical.decode(data)).to_map()) == data


@FAST
@given(labels, st.sampled_from(["rel", "cats"]))
def test_label_with_an_unsorted_or_duplicated_set_is_rejected(label: Label, field: str) -> None:
    as_map = label.to_map()
    if field == "rel":
        if not as_map["rel"]:
            as_map["rel"] = ["X"]
        as_map["rel"] = [*as_map["rel"][::-1], as_map["rel"][0]]
    else:
        as_map["cats"] = {"TAG": ["B", "A"]}
    with pytest.raises(ProtocolError) as info:
        Label.from_map(as_map)
    assert info.value.code == "invalid_label"
