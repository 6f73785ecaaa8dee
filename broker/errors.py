"""The error tree shared by the broker, the client library and the policy engine.

Every error carries a machine-readable ``code`` (one of :data:`ERROR_CODES`, the table that
``docs/protocol.md`` documents) and a human ``reason``. Errors are mapped to wire ``error`` frames,
HTTP responses or CLI messages at the edges; the pure core only raises them.

A policy *deny* is never an exception: it is a :class:`policies.decide.Decision`.
"""

from __future__ import annotations

#: Every code that can appear in an ``error`` frame, with what it means. Kept in one place so the
#: protocol document and a test can check that nothing else is ever sent.
ERROR_CODES: dict[str, str] = {
    "bad_frame": "the frame is not a msgpack map of the documented shape",
    "non_canonical": "the bytes do not re-encode identically as canonical msgpack",
    "too_large": "the frame or a field exceeds its configured size limit",
    "bad_signature": "a signature does not verify over the received bytes",
    "replay": "the envelope's ts is outside the allowed skew or its id was already seen",
    "sender_mismatch": "the envelope's from/label.orig do not match the authenticated node",
    "invalid_label": "the label is not structurally valid",
    "invalid_topic": "the topic or topic pattern is not valid",
    "not_authenticated": "a frame other than the handshake arrived before welcome",
    "unknown_node": "no valid certificate is known for the node",
    "node_inactive": "the node's certificate is outside its validity window, or it is suspended",
    "handshake_failed": "the hello does not answer the challenge",
    "unsupported_version": "the frame or envelope version is not supported",
    "unexpected_frame": "the frame type is not allowed in this state or direction",
    "bad_proof": "a Merkle inclusion or consistency proof does not verify",
    "rate_limited": "too many frames or bytes; slow down",
    "unavailable": "the broker cannot accept the request now (storage full, shutting down)",
    "internal": "the broker failed; the request was not processed",
}


class BrokerError(Exception):
    """Base of every error this project raises on purpose."""

    code: str = "internal"

    def __init__(self, reason: str, *, code: str | None = None, ref: bytes | None = None) -> None:
        super().__init__(reason)
        if code is not None:
            self.code = code
        self.reason = reason
        #: The message id the error is about, when there is one (``ref`` of the error frame).
        self.ref = ref

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


class ProtocolError(BrokerError):
    """Bytes or frames that break the wire protocol (malformed, oversized, out of order)."""

    code = "bad_frame"


class VerificationError(BrokerError):
    """A signature, proof, binding or certificate that does not verify."""

    code = "bad_signature"


class PolicyDocumentError(BrokerError):
    """A trust document that cannot be loaded: unsigned, badly signed, malformed, inconsistent."""

    code = "policy_document"

    def __init__(self, reason: str, *, document: str | None = None, code: str | None = None):
        text = f"{document}: {reason}" if document else reason
        super().__init__(text, code=code)
        self.document = document


class StorageError(BrokerError):
    """Durable storage failed; the broker stops accepting rather than lose data."""

    code = "unavailable"


class ConfigError(BrokerError):
    """A configuration file that is missing, malformed, or names a bad value."""

    code = "config"
