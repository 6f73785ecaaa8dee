"""Envelopes (DESIGN §6): build, parse, verify, and seal/open the payload. Pure: no I/O.

``envelope = msgpack [body: bin, sig: bin(64)]`` where ``body`` is a canonical msgpack map and
``sig = Ed25519(sender key, "coalition/v1/envelope\\n" + body)``. The payload is encrypted once
with a random content key (XChaCha20-Poly1305 IETF, AAD = ``"coalition/v1/payload\\n" + id +
canonical(label)``), and the content key is sealed to each recipient's X25519 key. The label is
therefore bound to the ciphertext twice: by the signature and by the AEAD.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from broker import canonical, crypto
from broker.errors import ProtocolError, VerificationError
from broker.router import validate_topic
from policies.model import Label

VERSION = 1
ALG = "xchacha20poly1305+sealedbox"
PRECEDENCES = {0: "ROUTINE", 1: "PRIORITY", 2: "IMMEDIATE", 3: "FLASH"}
PRECEDENCE_BY_NAME = {name: value for value, name in PRECEDENCES.items()}
NONCE_BYTES = 24
CONTENT_KEY_BYTES = 32
MAX_RECIPIENTS = 1024

#: The longest a broker may be asked to hold a message.
MAX_TTL_SECONDS = 366 * 24 * 3600

_BODY_KEYS = {"v", "id", "from", "ts", "topic", "prec", "ttl", "label", "enc"}
_OPTIONAL_BODY_KEYS = {"to"}
_ENC_KEYS = {"alg", "nonce", "ct", "keys"}


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A parsed envelope. ``raw`` is the exact bytes received; ``body`` the signed bytes."""

    raw: bytes
    body: bytes
    sig: bytes
    id: bytes
    sender: str
    ts: int
    topic: str
    prec: int
    ttl: int
    to: tuple[str, ...]
    label: Label
    label_bytes: bytes
    nonce: bytes
    ct: bytes
    keys: Mapping[str, bytes]

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = canonical.DEFAULT_MAX_BYTES) -> Envelope:
        """Parse and structurally validate; raise :class:`ProtocolError` with a code."""
        outer = canonical.decode(data, max_bytes=max_bytes)
        if (
            not isinstance(outer, list)
            or len(outer) != 2
            or not isinstance(outer[0], bytes)
            or not isinstance(outer[1], bytes)
        ):
            raise ProtocolError("envelope must be [body: bin, sig: bin]", code="bad_frame")
        body_bytes, sig = outer
        if len(sig) != crypto.SIG_BYTES:
            raise ProtocolError("envelope signature must be 64 bytes", code="bad_frame")
        body = canonical.decode(body_bytes, max_bytes=max_bytes)
        return _from_body(data, body_bytes, sig, body)

    def verify(self, sender_key: bytes) -> None:
        """Raise :class:`VerificationError` unless ``sig`` is the sender's over the body."""
        crypto.verify_signature(
            sender_key, crypto.DOMAIN_ENVELOPE, self.body, self.sig, what="envelope"
        )

    def open(self, node: str, enc_key: nacl.public.PrivateKey) -> bytes:
        """Decrypt the payload as ``node``; raise :class:`VerificationError` when impossible."""
        sealed = self.keys.get(node)
        if sealed is None:
            raise VerificationError(f"no sealed key for {node}", code="no_key_for_recipient")
        try:
            content_key = nacl.public.SealedBox(enc_key).decrypt(sealed)
            return bytes(
                nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    self.ct, payload_aad(self.id, self.label_bytes), self.nonce, content_key
                )
            )
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise VerificationError("payload does not decrypt or authenticate",
                                    code="bad_ciphertext") from exc


def payload_aad(message_id: bytes, label_bytes: bytes) -> bytes:
    """Associated data binding the ciphertext to the message id and its label."""
    return crypto.DOMAIN_PAYLOAD + message_id + label_bytes


def new_message_id(now_ms: int) -> bytes:
    """A UUIDv7: 48-bit Unix milliseconds, version 7, variant 10, 74 random bits."""
    rand = os.urandom(10)
    return (
        (now_ms & ((1 << 48) - 1)).to_bytes(6, "big")
        + bytes([0x70 | (rand[0] & 0x0F), rand[1], 0x80 | (rand[2] & 0x3F)])
        + rand[3:]
    )


def build_envelope(
    *,
    signing_key: nacl.signing.SigningKey,
    sender: str,
    topic: str,
    payload: bytes,
    label: Label,
    prec: int,
    ttl: int,
    recipient_keys: Mapping[str, bytes],
    now_ms: int,
    to: tuple[str, ...] = (),
    message_id: bytes | None = None,
) -> bytes:
    """Encrypt ``payload`` once, seal its key to every recipient, sign, and return the bytes."""
    validate_topic(topic)
    if prec not in PRECEDENCES:
        raise ProtocolError(f"precedence must be one of {sorted(PRECEDENCES)}", code="bad_frame")
    _check_ttl(ttl)
    msg_id = message_id if message_id is not None else new_message_id(now_ms)
    label_map = label.to_map()
    label_bytes = canonical.encode(label_map)
    content_key = os.urandom(CONTENT_KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ct = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        payload, payload_aad(msg_id, label_bytes), nonce, content_key
    )
    keys = {
        node: bytes(nacl.public.SealedBox(nacl.public.PublicKey(key)).encrypt(content_key))
        for node, key in recipient_keys.items()
    }
    body: dict[str, Any] = {
        "v": VERSION, "id": msg_id, "from": sender, "ts": now_ms, "topic": topic,
        "prec": prec, "ttl": ttl, "label": label_map,
        "enc": {"alg": ALG, "nonce": nonce, "ct": bytes(ct), "keys": keys},
    }
    if to:
        body["to"] = canonical.canonical_set(list(to))
    body_bytes = canonical.encode(body)
    sig = crypto.sign(signing_key, crypto.DOMAIN_ENVELOPE, body_bytes)
    return canonical.encode([body_bytes, sig])


def _from_body(raw: bytes, body_bytes: bytes, sig: bytes, body: Any) -> Envelope:
    if not isinstance(body, dict):
        raise ProtocolError("envelope body must be a map", code="bad_frame")
    missing = _BODY_KEYS - set(body)
    unknown = set(body) - _BODY_KEYS - _OPTIONAL_BODY_KEYS
    if missing or unknown:
        raise ProtocolError(
            f"envelope body: missing {sorted(missing)} unknown {sorted(unknown)}", code="bad_frame"
        )
    if type(body["v"]) is not int or body["v"] != VERSION:
        raise ProtocolError(f"envelope version {body['v']!r} is not supported",
                            code="unsupported_version")
    msg_id = _typed(body, "id", bytes)
    if len(msg_id) != 16:
        raise ProtocolError("envelope id must be 16 bytes", code="bad_frame")
    prec = _typed(body, "prec", int)
    if prec not in PRECEDENCES:
        raise ProtocolError(f"precedence {prec} is not 0..3", code="bad_frame")
    ttl = _typed(body, "ttl", int)
    _check_ttl(ttl)
    to = body.get("to", [])
    if "to" in body and to == []:
        raise ProtocolError("an empty 'to' must be omitted, not sent", code="non_canonical")
    if not isinstance(to, list) or not all(isinstance(n, str) and n for n in to):
        raise ProtocolError("envelope 'to' must be an array of node ids", code="bad_frame")
    if not canonical.is_sorted_unique(to) or len(to) > MAX_RECIPIENTS:
        raise ProtocolError("envelope 'to' must be sorted, unique and bounded", code="bad_frame")
    label_map = body["label"]
    label = Label.from_canonical_map(label_map)
    nonce, ct, keys = _parse_enc(body["enc"])
    return Envelope(
        raw=raw, body=body_bytes, sig=sig, id=msg_id,
        sender=_typed(body, "from", str), ts=_typed(body, "ts", int),
        topic=validate_topic(_typed(body, "topic", str)), prec=prec,
        ttl=ttl, to=tuple(to), label=label,
        # The body was checked canonical, so its label map packs back to its canonical bytes.
        label_bytes=canonical.encode_ordered(label_map), nonce=nonce, ct=ct, keys=keys,
    )


def _check_ttl(ttl: int) -> None:
    # Unbounded, a TTL overflows the store's 64-bit expiry time; a year is beyond any use.
    if not 0 <= ttl <= MAX_TTL_SECONDS:
        raise ProtocolError(f"ttl must be 0..{MAX_TTL_SECONDS} seconds (366 days)",
                            code="bad_frame")


def _parse_enc(enc: Any) -> tuple[bytes, bytes, dict[str, bytes]]:
    if not isinstance(enc, dict) or set(enc) != _ENC_KEYS:
        raise ProtocolError(f"envelope enc must have exactly {sorted(_ENC_KEYS)}", code="bad_frame")
    if enc["alg"] != ALG:
        raise ProtocolError(f"enc.alg {enc['alg']!r} is not supported", code="unsupported_version")
    nonce = _typed(enc, "nonce", bytes)
    if len(nonce) != NONCE_BYTES:
        raise ProtocolError("enc.nonce must be 24 bytes", code="bad_frame")
    keys = enc["keys"]
    if (
        not isinstance(keys, dict)
        or len(keys) > MAX_RECIPIENTS
        or not all(isinstance(k, str) and k and isinstance(v, bytes) for k, v in keys.items())
    ):
        raise ProtocolError("enc.keys must map node ids to sealed keys", code="bad_frame")
    return nonce, _typed(enc, "ct", bytes), keys


def _typed(table: dict[str, Any], key: str, kind: type) -> Any:
    value = table[key]
    if type(value) is not kind or (isinstance(value, int) and value < 0):
        raise ProtocolError(f"envelope field {key!r} must be {kind.__name__}", code="bad_frame")
    return value
