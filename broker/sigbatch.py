"""What a signature worker computes, and the shape of its messages (pure, no I/O).

A request is the msgpack array ``[batch number, [key, body, signature, key, body, ...]]``;
its reply ``[batch number, verdicts]``, one byte per triple: 1 when the Ed25519 signature over
the envelope domain and the body verifies with the key, else 0 (:mod:`broker.verifier`).
"""

from __future__ import annotations

from broker.crypto import DOMAIN_ENVELOPE, check_signature


def verify_items(items: list[bytes]) -> bytes:
    """One byte per ``(key, body, signature)`` triple of the flat list ``items``: 1 when the
    signature over the domain-separated body verifies, else 0. Pure; what a worker computes."""
    return bytes(check_signature(items[i], DOMAIN_ENVELOPE, items[i + 1], items[i + 2])
                 for i in range(0, len(items) - 2, 3))


def check_request(message: object) -> tuple[int, list[bytes]] | None:
    """``(batch number, items)`` of a well-formed request, else ``None``."""
    if not (isinstance(message, list) and len(message) == 2 and isinstance(message[0], int)
            and isinstance(message[1], list) and len(message[1]) % 3 == 0
            and all(isinstance(item, bytes) for item in message[1])):
        return None
    return message[0], message[1]


def check_reply(message: object, batch: int, count: int) -> bytes | None:
    """The verdict bytes of ``message`` if it answers batch ``batch`` of ``count`` envelopes
    with a 0 or 1 for each, else ``None``."""
    if not (isinstance(message, list) and len(message) == 2 and message[0] == batch
            and isinstance(message[1], bytes) and len(message[1]) == count
            and not message[1].strip(b"\x00\x01")):
        return None
    return message[1]
