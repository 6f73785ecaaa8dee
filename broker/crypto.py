"""Keys, key strings and domain-separated Ed25519 signatures (pure, no I/O).

Every signature in the system is made over ``DOMAIN + bytes`` so that a signature made for one
purpose (a hello, an envelope, a document) can never be replayed as another.

Public keys travel as ``"ed25519:BASE64"`` / ``"x25519:BASE64"``; a key id is the first 8 bytes of
SHA-256 of the raw public key, in hex (what ``.sig`` lines name).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib

import nacl.exceptions
import nacl.public
import nacl.signing

from broker.errors import VerificationError

DOMAIN_DOCUMENT = b"coalition/v1/document\n"
DOMAIN_ENVELOPE = b"coalition/v1/envelope\n"
DOMAIN_HELLO = b"coalition/v1/hello\n"
DOMAIN_PAYLOAD = b"coalition/v1/payload\n"

KEY_BYTES = 32
SIG_BYTES = 64


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as text."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, what: str = "value") -> bytes:
    """Strict standard base64; raise ``ValueError`` naming ``what`` when it is not."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc


def format_key(kind: str, raw: bytes) -> str:
    """``"ed25519:BASE64"`` or ``"x25519:BASE64"``."""
    return f"{kind}:{b64encode(raw)}"


def parse_key(text: str, kind: str) -> bytes:
    """Parse a ``kind:BASE64`` key string into 32 raw bytes; ``ValueError`` when malformed."""
    prefix = f"{kind}:"
    if not isinstance(text, str) or not text.startswith(prefix):
        raise ValueError(f"key must look like '{prefix}BASE64'")
    raw = b64decode(text[len(prefix):], what=f"{kind} key")
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{kind} key must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def key_id(public_key: bytes) -> str:
    """Short, stable identifier of a public key: hex of the first 8 bytes of its SHA-256."""
    return hashlib.sha256(public_key).digest()[:8].hex()


@functools.lru_cache(maxsize=65536)
def _verify_key(public_key: bytes) -> nacl.signing.VerifyKey:
    # Building a VerifyKey is cheap but not free; the hot path verifies with cached objects.
    return nacl.signing.VerifyKey(public_key)


def sign(signing_key: nacl.signing.SigningKey, domain: bytes, message: bytes) -> bytes:
    """Ed25519 signature over ``domain + message``."""
    return bytes(signing_key.sign(domain + message).signature)


def check_signature(public_key: bytes, domain: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature by ``public_key`` over the
    domain-separated message."""
    if len(signature) != SIG_BYTES or len(public_key) != KEY_BYTES:
        return False
    try:
        _verify_key(public_key).verify(domain + message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def bad_signature_reason(what: str) -> str:
    """The reason a ``bad_signature`` error gives for ``what``."""
    return f"{what}: signature does not verify"


def verify_signature(
    public_key: bytes, domain: bytes, message: bytes, signature: bytes, *, what: str
) -> None:
    """Raise :class:`VerificationError` unless the signature verifies."""
    if not check_signature(public_key, domain, message, signature):
        raise VerificationError(bad_signature_reason(what), code="bad_signature")


def signing_key_from_seed(seed: bytes) -> nacl.signing.SigningKey:
    """Ed25519 signing key from its 32-byte seed."""
    return nacl.signing.SigningKey(seed)


def public_bytes(key: nacl.signing.SigningKey | nacl.public.PrivateKey) -> bytes:
    """Raw 32-byte public key of an Ed25519 signing key or an X25519 private key."""
    if isinstance(key, nacl.signing.SigningKey):
        return bytes(key.verify_key)
    return bytes(key.public_key)
