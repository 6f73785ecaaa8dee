"""broker.wsframe: the broker's own WebSocket framing, checked against RFC 6455's examples and
byte for byte against aiohttp's writer (what the broker wrote before it framed by itself)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.writer import WebSocketWriter
from aiohttp.base_protocol import BaseProtocol

from broker.wsframe import MAX_PAYLOAD, binary_frame_header, binary_frames

LENGTHS = [0, 1, 125, 126, 127, 1024, 65535, 65536, 70_000]


def test_rfc6455_section_5_7_examples() -> None:
    # "256 bytes binary message in a single unmasked frame": 0x82 0x7E 0x0100 [payload]
    assert binary_frame_header(256) == bytes.fromhex("827e0100")
    # "64KiB binary message in a single unmasked frame": 0x82 0x7F 0x0000000000010000
    assert binary_frame_header(65536) == bytes.fromhex("827f0000000000010000")
    assert binary_frame_header(5) == bytes.fromhex("8205")


class _Capture:
    """The part of a transport aiohttp's writer uses."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


async def aiohttp_frames(payloads: list[bytes]) -> bytes:
    transport = _Capture()
    writer = WebSocketWriter(BaseProtocol(asyncio.get_running_loop()), transport)  # type: ignore[arg-type]
    for payload in payloads:
        await writer.send_frame(payload, WSMsgType.BINARY)
    return bytes(transport.data)


@pytest.mark.parametrize("length", LENGTHS)
async def test_one_frame_is_what_aiohttp_writes(length: int) -> None:
    payload = bytes(i % 251 for i in range(length))
    assert binary_frames([payload]) == await aiohttp_frames([payload])


async def test_frames_are_concatenated_in_order() -> None:
    payloads = [bytes([n]) * length for n, length in enumerate(LENGTHS)]
    assert binary_frames(payloads) == await aiohttp_frames(payloads)
    assert binary_frames([]) == b""


@pytest.mark.parametrize("length", [-1, MAX_PAYLOAD + 1])
def test_a_length_the_header_cannot_carry_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="2\\*\\*63"):
        binary_frame_header(length)
