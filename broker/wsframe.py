"""WebSocket binary frames as a server writes them (RFC 6455 §5.2): bytes out, no sockets.

The broker writes several queued node-protocol frames to a connection with one transport write
(:class:`broker.peer.WsPeer`) instead of one write, and one ``send`` system call, per frame:
a subscriber's deliveries and a publisher's receipts leave a group commit together. aiohttp
writes one frame per call, so the broker frames them itself. Only what a server sends to a
client is built here: final (``FIN``) binary frames, unmasked (§5.1: a server must not mask),
uncompressed (the broker does not negotiate ``permessage-deflate``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

#: FIN bit set, opcode 0x2 (binary): a whole message in one frame.
_FIN_BINARY = 0x82
#: The largest payload length §5.2 can express (the 64-bit length's top bit must be 0).
MAX_PAYLOAD = (1 << 63) - 1

_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, final binary frame carrying ``length`` bytes."""
    if length < 0 or length > MAX_PAYLOAD:
        raise ValueError(f"a WebSocket payload has 0 to 2**63 - 1 bytes, not {length}")
    if length < 126:
        return bytes((_FIN_BINARY, length))
    if length < 1 << 16:
        return _LEN16.pack(_FIN_BINARY, 126, length)
    return _LEN64.pack(_FIN_BINARY, 127, length)


def binary_frames(payloads: Iterable[bytes]) -> bytes:
    """Each payload as one final binary frame, concatenated in order."""
    parts: list[bytes] = []
    for payload in payloads:
        parts.append(binary_frame_header(len(payload)))
        parts.append(payload)
    return b"".join(parts)
