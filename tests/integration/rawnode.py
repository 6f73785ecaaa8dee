"""A raw WebSocket node for attack tests: sends exactly the bytes a test chooses."""

from __future__ import annotations

import time
from types import TracebackType

import aiohttp

from broker import wire
from broker.session import make_hello
from clients.identity import KeyFile


class RawNode:
    """``async with RawNode(url) as raw``: the challenge is read on entry."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.challenge: wire.Challenge | None = None

    async def __aenter__(self) -> RawNode:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.url, max_msg_size=8 << 20)
        frame = await self.recv()
        assert isinstance(frame, wire.Challenge)
        self.challenge = frame
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.http is not None and self.ws is not None
        await self.ws.close()
        await self.http.close()

    async def send(self, frame: wire.Frame) -> None:
        await self.send_bytes(wire.encode_frame(frame))

    async def send_bytes(self, data: bytes) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(data)

    async def recv(self, timeout: float = 5, *, skip_checkpoints: bool = True) -> wire.Frame:
        """The next frame. ``checkpoint`` offers are skipped unless asked for: the broker pushes
        them to every authenticated node at any moment (after its own login entry is committed,
        say), so they are never the answer to what a test just sent."""
        assert self.ws is not None
        while True:
            msg = await self.ws.receive(timeout=timeout)
            assert msg.type is aiohttp.WSMsgType.BINARY, f"expected a frame, got {msg.type!r}"
            frame = wire.decode_frame(msg.data, max_bytes=8 << 20)
            if not (skip_checkpoints and isinstance(frame, wire.Checkpoint)):
                return frame

    async def closed(self, timeout: float = 5) -> int | None:
        """Wait for the broker to close; return the WebSocket close code. Checkpoints the
        broker pushes meanwhile (it does so to every authenticated node) are skipped."""
        assert self.ws is not None
        msg = await self.ws.receive(timeout=timeout)
        while msg.type is aiohttp.WSMsgType.BINARY and isinstance(
                wire.decode_frame(msg.data, max_bytes=8 << 20), wire.Checkpoint):
            msg = await self.ws.receive(timeout=timeout)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING), f"expected close, got {msg.type!r}"
        return self.ws.close_code

    async def login(self, key: KeyFile) -> wire.Frame:
        """Answer the challenge as ``key``'s node; returns the broker's answer."""
        assert self.challenge is not None
        await self.send(make_hello(self.challenge, key.name, key.signing_key,
                                   time.time_ns() // 1_000_000))
        return await self.recv()
