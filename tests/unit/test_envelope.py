"""Envelopes (DESIGN §6): build, parse, verify, open — and every structural rejection."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgpack
import nacl.public
import nacl.signing
import pytest

from broker import canonical, crypto
from broker.envelope import (
    ALG,
    MAX_RECIPIENTS,
    Envelope,
    build_envelope,
    new_message_id,
    payload_aad,
)
from broker.errors import ProtocolError, VerificationError
from policies.model import Label

NOW = 1_800_000_000_000
SENDER_SIGN = nacl.signing.SigningKey(b"\x01" * 32)
OTHER_SIGN = nacl.signing.SigningKey(b"\x02" * 32)
ENC = {name: nacl.public.PrivateKey(bytes([10 + i]) * 32)
       for i, name in enumerate(["USA-GW1", "FRA-GW1", "POL-GW1", "CAN-GW1"])}
LABEL = Label(policy="GBR", cls="SECRET", cats={"NTK": ("ALPHA", "BRAVO")},
              rel=("FRA", "FVEY"), orig="GBR")
PAYLOAD = b"contact bearing 270, 12 knots"


def _pub(name: str) -> bytes:
    return bytes(ENC[name].public_key)


def _build(recipients: tuple[str, ...] = ("USA-GW1",), **overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "signing_key": SENDER_SIGN, "sender": "GBR-GW1", "topic": "maritime.tracks",
        "payload": PAYLOAD, "label": LABEL, "prec": 2, "ttl": 3600,
        "recipient_keys": {name: _pub(name) for name in recipients}, "now_ms": NOW,
    }
    args.update(overrides)
    return build_envelope(**args)


VALID = _build(("USA-GW1", "FRA-GW1"), to=("USA-GW1", "CAN-GW1"))


def _body(data: bytes = VALID) -> dict[str, Any]:
    body_bytes, _ = canonical.decode(data)
    body: dict[str, Any] = canonical.decode(body_bytes)
    return body


def _resign(body: dict[str, Any], key: nacl.signing.SigningKey = SENDER_SIGN) -> bytes:
    body_bytes = canonical.encode(body)
    return canonical.encode([body_bytes, crypto.sign(key, crypto.DOMAIN_ENVELOPE, body_bytes)])


def _parse_error(data: bytes, code: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        Envelope.from_bytes(data)
    assert info.value.code == code, info.value
    return info.value


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipients",
    [("USA-GW1",), ("USA-GW1", "FRA-GW1"), ("CAN-GW1", "FRA-GW1", "POL-GW1", "USA-GW1")],
)
def test_build_parse_verify_open_round_trip(recipients: tuple[str, ...]) -> None:
    data = _build(recipients)
    env = Envelope.from_bytes(data)
    env.verify(bytes(SENDER_SIGN.verify_key))
    assert env.raw == data
    assert env.sender == "GBR-GW1"
    assert env.ts == NOW
    assert env.topic == "maritime.tracks"
    assert env.prec == 2
    assert env.ttl == 3600
    assert env.to == ()
    assert env.label == LABEL
    assert env.label_bytes == canonical.encode(LABEL.to_map())
    assert sorted(env.keys) == sorted(recipients)
    assert len(env.nonce) == 24
    for name in recipients:
        assert env.open(name, ENC[name]) == PAYLOAD


def test_body_has_exactly_the_contract_fields() -> None:
    body = _body()
    assert set(body) == {"v", "id", "from", "ts", "topic", "prec", "ttl", "to", "label", "enc"}
    assert body["v"] == 1
    assert set(body["enc"]) == {"alg", "nonce", "ct", "keys"}
    assert body["enc"]["alg"] == ALG == "xchacha20poly1305+sealedbox"
    assert body["label"] == {"policy": "GBR", "class": "SECRET",
                             "cats": {"NTK": ["ALPHA", "BRAVO"]}, "rel": ["FRA", "FVEY"],
                             "orig": "GBR"}


def test_empty_to_is_omitted_from_the_body() -> None:
    assert "to" not in _body(_build())


def test_to_is_written_as_a_sorted_unique_set() -> None:
    data = _build(to=("USA-GW1", "CAN-GW1", "USA-GW1"))
    assert _body(data)["to"] == ["CAN-GW1", "USA-GW1"]
    assert Envelope.from_bytes(data).to == ("CAN-GW1", "USA-GW1")


def test_signature_covers_the_body_with_the_envelope_domain() -> None:
    env = Envelope.from_bytes(VALID)
    assert crypto.check_signature(bytes(SENDER_SIGN.verify_key), crypto.DOMAIN_ENVELOPE,
                                  env.body, env.sig)
    assert not crypto.check_signature(bytes(SENDER_SIGN.verify_key), crypto.DOMAIN_HELLO,
                                      env.body, env.sig)


def test_explicit_message_id_is_used() -> None:
    mid = bytes(range(16))
    env = Envelope.from_bytes(_build(message_id=mid))
    assert env.id == mid


def test_aad_binds_the_id_and_the_label_bytes() -> None:
    assert payload_aad(b"I" * 16, b"L") == b"coalition/v1/payload\n" + b"I" * 16 + b"L"


def test_message_is_encrypted_once_with_fresh_randomness() -> None:
    one, two = Envelope.from_bytes(_build()), Envelope.from_bytes(_build())
    assert one.nonce != two.nonce
    assert one.ct != two.ct
    assert one.id != two.id
    assert PAYLOAD not in VALID


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"topic": "Maritime"}, "invalid_topic"),
        ({"topic": ""}, "invalid_topic"),
        ({"prec": 4}, "bad_frame"),
        ({"prec": -1}, "bad_frame"),
    ],
)
def test_builder_refuses_invalid_topic_and_precedence(kwargs: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _build(**kwargs)
    assert info.value.code == code


# --- verify / open failures ----------------------------------------------------------------------


def test_verify_with_the_wrong_key_fails() -> None:
    env = Envelope.from_bytes(VALID)
    with pytest.raises(VerificationError) as info:
        env.verify(bytes(OTHER_SIGN.verify_key))
    assert info.value.code == "bad_signature"


def test_envelope_signed_by_another_key_fails_verify_with_the_sender_key() -> None:
    env = Envelope.from_bytes(_resign(_body(), OTHER_SIGN))
    with pytest.raises(VerificationError):
        env.verify(bytes(SENDER_SIGN.verify_key))
    env.verify(bytes(OTHER_SIGN.verify_key))


def test_signature_from_one_envelope_does_not_verify_another() -> None:
    other = _build()
    body_bytes, _ = canonical.decode(other)
    _, sig = canonical.decode(VALID)
    env = Envelope.from_bytes(canonical.encode([body_bytes, sig]))
    with pytest.raises(VerificationError):
        env.verify(bytes(SENDER_SIGN.verify_key))


def test_node_without_a_sealed_key_cannot_open() -> None:
    env = Envelope.from_bytes(VALID)
    with pytest.raises(VerificationError) as info:
        env.open("POL-GW1", ENC["POL-GW1"])
    assert info.value.code == "no_key_for_recipient"


def test_recipient_cannot_open_with_another_recipients_private_key() -> None:
    env = Envelope.from_bytes(VALID)
    with pytest.raises(VerificationError) as info:
        env.open("USA-GW1", ENC["FRA-GW1"])
    assert info.value.code == "bad_ciphertext"
    with pytest.raises(VerificationError):
        env.open("USA-GW1", ENC["POL-GW1"])


def test_sealed_key_moved_to_another_recipient_entry_does_not_open() -> None:
    body = _body()
    body["enc"]["keys"]["POL-GW1"] = body["enc"]["keys"]["USA-GW1"]
    env = Envelope.from_bytes(_resign(body))
    with pytest.raises(VerificationError):
        env.open("POL-GW1", ENC["POL-GW1"])


def _rebound(mutate: Callable[[dict[str, Any]], None]) -> Envelope:
    """Change the signed body around the same ``enc`` block and re-sign with the sender key."""
    body = _body()
    enc = copy.deepcopy(body["enc"])
    mutate(body)
    body["enc"] = enc
    env = Envelope.from_bytes(_resign(body))
    env.verify(bytes(SENDER_SIGN.verify_key))  # the signature is fine: only the AEAD can catch it
    return env


@pytest.mark.parametrize(
    ("what", "mutate"),
    [
        ("rel widened", lambda b: b["label"].update(rel=["FRA", "FVEY", "POL"])),
        ("class lowered", lambda b: b["label"].update({"class": "OFFICIAL"})),
        ("category dropped", lambda b: b["label"].update(cats={})),
        ("cats omitted", lambda b: b["label"].pop("cats")),
        ("orig changed", lambda b: b["label"].update(orig="USA")),
        ("id changed", lambda b: b.update(id=bytes(16))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_ciphertext_moved_under_another_label_or_id_does_not_open(
    what: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    env = _rebound(mutate)
    with pytest.raises(VerificationError) as info:
        env.open("USA-GW1", ENC["USA-GW1"])
    assert info.value.code == "bad_ciphertext", what


def test_unchanged_label_and_id_with_a_new_topic_still_open() -> None:
    # The AAD is id + label only: the control case for the test above.
    env = _rebound(lambda b: b.update(topic="maritime.other"))
    assert env.open("USA-GW1", ENC["USA-GW1"]) == PAYLOAD


def test_label_bytes_are_the_received_bytes_not_a_rebuilt_map() -> None:
    # A sender may omit the optional `cats`; the AAD must use what was signed.
    body = _body(_build())
    label_map = {k: v for k, v in body["label"].items() if k != "cats"}
    env = Envelope.from_bytes(_resign({**body, "label": label_map}))
    assert env.label_bytes == canonical.encode(label_map)
    assert env.label.cats == {}


def test_flipped_ciphertext_byte_fails_to_open() -> None:
    body = _body()
    ct = bytearray(body["enc"]["ct"])
    ct[0] ^= 1
    body["enc"]["ct"] = bytes(ct)
    with pytest.raises(VerificationError):
        Envelope.from_bytes(_resign(body)).open("USA-GW1", ENC["USA-GW1"])


def test_flipped_nonce_fails_to_open() -> None:
    body = _body()
    body["enc"]["nonce"] = bytes(b ^ 0xFF for b in body["enc"]["nonce"])
    with pytest.raises(VerificationError):
        Envelope.from_bytes(_resign(body)).open("USA-GW1", ENC["USA-GW1"])


# --- message id ----------------------------------------------------------------------------------


@pytest.mark.parametrize("now_ms", [0, 1, NOW, (1 << 48) - 1])
def test_new_message_id_is_a_uuidv7(now_ms: int) -> None:
    for _ in range(32):
        mid = new_message_id(now_ms)
        assert len(mid) == 16
        assert int.from_bytes(mid[:6], "big") == now_ms
        assert mid[6] >> 4 == 7  # version nibble
        assert mid[8] >> 6 == 0b10  # RFC 4122/9562 variant


def test_new_message_ids_are_random_beyond_the_timestamp() -> None:
    ids = {new_message_id(NOW) for _ in range(64)}
    assert len(ids) == 64


def test_new_message_ids_sort_by_time() -> None:
    assert new_message_id(NOW) < new_message_id(NOW + 1)


# --- parse: outer structure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "why"),
    [
        ({"body": b"", "sig": b""}, "map"),
        ([], "empty"),
        ([b"body"], "one element"),
        ([b"body", b"\x00" * 64, b"x"], "three elements"),
        (["body", b"\x00" * 64], "str body"),
        ([b"body", "sig"], "str sig"),
        ([canonical.encode({"v": 1}), b"\x00" * 63], "short sig"),
        ([canonical.encode({"v": 1}), b"\x00" * 65], "long sig"),
        (b"bytes", "bin"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_outer_structure_other_than_body_and_64_byte_sig_is_rejected(outer: Any, why: str) -> None:
    _parse_error(canonical.encode(outer), "bad_frame")


def test_non_canonical_outer_array_is_rejected() -> None:
    body_bytes, sig = canonical.decode(VALID)
    assert msgpack.packb([body_bytes, sig], use_bin_type=True) == VALID
    # the body behind a bin32 header instead of the shortest one
    longer = b"\x92\xc6" + len(body_bytes).to_bytes(4, "big") + body_bytes + b"\xc4\x40" + sig
    _parse_error(longer, "non_canonical")


def test_non_canonical_body_is_rejected_even_with_a_valid_signature_over_it() -> None:
    body = _body()
    # a body whose keys are in insertion (not canonical) order, signed as is
    body_bytes = msgpack.packb(dict(reversed(list(body.items()))), use_bin_type=True)
    assert body_bytes != canonical.encode(body)
    sig = crypto.sign(SENDER_SIGN, crypto.DOMAIN_ENVELOPE, body_bytes)
    _parse_error(canonical.encode([body_bytes, sig]), "non_canonical")


def test_envelope_over_the_size_limit_is_too_large() -> None:
    with pytest.raises(ProtocolError) as info:
        Envelope.from_bytes(VALID, max_bytes=len(VALID) - 1)
    assert info.value.code == "too_large"
    assert Envelope.from_bytes(VALID, max_bytes=len(VALID)).raw == VALID


def test_body_that_is_not_a_map_is_rejected() -> None:
    for body in ([1, 2], "body", 7):
        body_bytes = canonical.encode(body)
        _parse_error(canonical.encode([body_bytes, b"\x00" * 64]), "bad_frame")


# --- parse: body fields --------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for part in parents:
            target = target[part]
        target[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target = body
        for part in parents:
            target = target[part]
        del target[last]
    return mutate


BODY_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # version
    ("v=2", _set("v", 2), "unsupported_version"),
    ("v=0", _set("v", 0), "unsupported_version"),
    ("v='1'", _set("v", "1"), "unsupported_version"),
    # presence
    *[(f"missing {k}", _drop(k), "bad_frame")
      for k in ("v", "id", "from", "ts", "topic", "prec", "ttl", "label", "enc")],
    ("unknown field", _set("extra", 1), "bad_frame"),
    ("unknown field 'sig' in body", _set("sig", b"\x00" * 64), "bad_frame"),
    # id
    ("id 15 bytes", _set("id", b"\x00" * 15), "bad_frame"),
    ("id 17 bytes", _set("id", b"\x00" * 17), "bad_frame"),
    ("id empty", _set("id", b""), "bad_frame"),
    ("id as str", _set("id", "0123456789abcdef"), "bad_frame"),
    ("id as int", _set("id", 1), "bad_frame"),
    # from / ts / ttl
    ("from as bin", _set("from", b"GBR-GW1"), "bad_frame"),
    ("from as int", _set("from", 1), "bad_frame"),
    ("ts negative", _set("ts", -1), "bad_frame"),
    ("ts as str", _set("ts", "1800000000000"), "bad_frame"),
    ("ts as bool", _set("ts", True), "bad_frame"),
    ("ttl negative", _set("ttl", -1), "bad_frame"),
    ("ttl above a year", _set("ttl", 366 * 24 * 3600 + 1), "bad_frame"),
    ("ttl overflowing the store", _set("ttl", 2**62), "bad_frame"),
    ("ttl as bool", _set("ttl", True), "bad_frame"),
    # prec
    ("prec 4", _set("prec", 4), "bad_frame"),
    ("prec 255", _set("prec", 255), "bad_frame"),
    ("prec -1", _set("prec", -1), "bad_frame"),
    ("prec as bool", _set("prec", True), "bad_frame"),
    ("prec as str", _set("prec", "FLASH"), "bad_frame"),
    # to
    ("to unsorted", _set("to", ["USA-GW1", "CAN-GW1"]), "bad_frame"),
    ("to duplicate", _set("to", ["CAN-GW1", "CAN-GW1"]), "bad_frame"),
    ("to with empty id", _set("to", ["", "CAN-GW1"]), "bad_frame"),
    ("to with int", _set("to", [1]), "bad_frame"),
    ("to with bin", _set("to", [b"CAN-GW1"]), "bad_frame"),
    ("to as str", _set("to", "CAN-GW1"), "bad_frame"),
    ("to as map", _set("to", {"CAN-GW1": 1}), "bad_frame"),
    ("to too long", _set("to", [f"N{i:05d}" for i in range(MAX_RECIPIENTS + 1)]), "bad_frame"),
    # topic
    ("topic uppercase", _set("topic", "Maritime.tracks"), "invalid_topic"),
    ("topic empty", _set("topic", ""), "invalid_topic"),
    ("topic empty segment", _set("topic", "maritime..tracks"), "invalid_topic"),
    ("topic wildcard", _set("topic", "maritime.*"), "invalid_topic"),
    ("topic tail wildcard", _set("topic", "maritime.>"), "invalid_topic"),
    ("topic 256 bytes", _set("topic", "a" * 256), "invalid_topic"),
    ("topic as bin", _set("topic", b"maritime"), "bad_frame"),
    # label
    ("label as array", _set("label", ["GBR"]), "invalid_label"),
    ("label as str", _set("label", "SECRET"), "invalid_label"),
    ("label missing rel", _drop("label.rel"), "invalid_label"),
    ("label missing class", _drop("label.class"), "invalid_label"),
    ("label missing policy", _drop("label.policy"), "invalid_label"),
    ("label missing orig", _drop("label.orig"), "invalid_label"),
    ("label empty class", _set("label.class", ""), "invalid_label"),
    ("label class as bin", _set("label.class", b"SECRET"), "invalid_label"),
    ("label unknown field", _set("label.caveat", "x"), "invalid_label"),
    ("label rel unsorted", _set("label.rel", ["FVEY", "FRA"]), "invalid_label"),
    ("label rel duplicate", _set("label.rel", ["FRA", "FRA"]), "invalid_label"),
    ("label rel as str", _set("label.rel", "FRA"), "invalid_label"),
    ("label rel with empty", _set("label.rel", ["", "FRA"]), "invalid_label"),
    ("label cats as array", _set("label.cats", ["NTK"]), "invalid_label"),
    ("label cats empty tag", _set("label.cats", {"": ["ALPHA"]}), "invalid_label"),
    ("label cat values unsorted", _set("label.cats", {"NTK": ["BRAVO", "ALPHA"]}),
     "invalid_label"),
    ("label cat values as str", _set("label.cats", {"NTK": "ALPHA"}), "invalid_label"),
    # enc
    ("enc as array", _set("enc", []), "bad_frame"),
    ("enc missing keys", _drop("enc.keys"), "bad_frame"),
    ("enc missing nonce", _drop("enc.nonce"), "bad_frame"),
    ("enc missing ct", _drop("enc.ct"), "bad_frame"),
    ("enc missing alg", _drop("enc.alg"), "bad_frame"),
    ("enc extra field", _set("enc.tag", b"x"), "bad_frame"),
    ("enc bad alg", _set("enc.alg", "aes256gcm+sealedbox"), "unsupported_version"),
    ("enc alg as bin", _set("enc.alg", ALG.encode()), "unsupported_version"),
    ("nonce 23 bytes", _set("enc.nonce", b"\x00" * 23), "bad_frame"),
    ("nonce 25 bytes", _set("enc.nonce", b"\x00" * 25), "bad_frame"),
    ("nonce 12 bytes (IETF chacha)", _set("enc.nonce", b"\x00" * 12), "bad_frame"),
    ("nonce as str", _set("enc.nonce", "0" * 24), "bad_frame"),
    ("ct as str", _set("enc.ct", "ciphertext"), "bad_frame"),
    ("keys as array", _set("enc.keys", [b"k"]), "bad_frame"),
    ("keys as bin", _set("enc.keys", b"k"), "bad_frame"),
    ("keys value as str", _set("enc.keys", {"USA-GW1": "sealed"}), "bad_frame"),
    ("keys value as int", _set("enc.keys", {"USA-GW1": 1}), "bad_frame"),
    ("keys too many", _set("enc.keys", {f"N{i:05d}": b"k" for i in range(MAX_RECIPIENTS + 1)}),
     "bad_frame"),
]


@pytest.mark.parametrize(
    ("why", "mutate", "code"), BODY_CASES, ids=[case[0] for case in BODY_CASES]
)
def test_malformed_body_field_is_rejected(
    why: str, mutate: Callable[[dict[str, Any]], None], code: str
) -> None:
    body = _body()
    mutate(body)
    _parse_error(_resign(body), code)


def test_version_true_is_not_version_1() -> None:
    # `True == 1` in Python; the contract says `v` is the int 1.
    body = _body()
    body["v"] = True
    with pytest.raises(ProtocolError) as info:
        Envelope.from_bytes(_resign(body))
    assert info.value.code in {"bad_frame", "unsupported_version"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", ["A", "B", "a", "b", "é"]),
        ("prec", 0),
        ("prec", 3),
        ("ttl", 0),
        ("topic", "a" * 255),
        ("topic", "x"),
    ],
)
def test_boundary_values_are_accepted(field: str, value: Any) -> None:
    body = _body()
    body[field] = value
    env = Envelope.from_bytes(_resign(body))
    env.verify(bytes(SENDER_SIGN.verify_key))


def test_maximum_recipient_count_is_accepted() -> None:
    body = _body()
    body["to"] = [f"N{i:05d}" for i in range(MAX_RECIPIENTS)]
    assert len(Envelope.from_bytes(_resign(body)).to) == MAX_RECIPIENTS


def test_explicit_empty_to_is_non_canonical() -> None:
    body = _body()
    body["to"] = []
    _parse_error(_resign(body), "non_canonical")


def test_sealed_key_for_an_empty_node_id_is_rejected() -> None:
    body = _body()
    body["enc"]["keys"][""] = b"\x00" * 80
    _parse_error(_resign(body), "bad_frame")
