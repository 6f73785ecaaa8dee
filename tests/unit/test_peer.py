"""broker.peer.WsPeer's writer, against a recording transport: frames queued together leave in
one write, in order with pongs and the close; a full transport buffer holds the queue (and a
peer that never drains is cut off instead of buffering without bound); nothing is written once
the connection is closing."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from broker import peer as peer_module
from broker import wire
from broker.guard import Ticket
from broker.peer import WsPeer
from broker.wsframe import binary_frames


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing


class FakeWs:
    """The part of aiohttp's WebSocketResponse the peer uses besides the transport."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.closed = False
        self.closes: list[tuple[int, bytes]] = []
        self.request: FakeRequest

    async def pong(self, data: bytes) -> None:
        self.transport.write(b"PONG:" + data)

    async def close(self, *, code: int, message: bytes, drain: bool = True) -> bool:
        self.closed = True
        self.closes.append((code, message))
        if drain:  # as aiohttp's: the close waits for the protocol's drain too
            await self.request.drain()
        return True


class FakeRequest:
    """Flow control as aiohttp's protocol does it: while paused, every ``drain`` awaits one
    shared future (cancelling a task waiting on it cancels it for every waiter)."""

    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport
        self.writer = self
        self.waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()

    def resume(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        if self.waiter is not None:
            await self.waiter


def make_peer(max_outbound: int = 1000) -> tuple[WsPeer, FakeTransport, FakeWs, FakeRequest]:
    transport = FakeTransport()
    ws, request = FakeWs(transport), FakeRequest(transport)
    ws.request = request
    fake: Any = (ws, request)
    return WsPeer(fake[0], fake[1], "c0", max_outbound, Ticket("k")), transport, ws, request


def frames(n: int, start: int = 0) -> list[wire.Frame]:
    return [frame(i) for i in range(start, start + n)]


def frame(n: int) -> wire.Frame:
    return wire.Error(code="test", reason=f"frame {n}")


def encoded(items: list[wire.Frame]) -> bytes:
    return binary_frames([wire.encode_frame(f) for f in items])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def queue_behind_a_full_buffer(peer: WsPeer, request: FakeRequest, count: int) -> None:
    """Frame 0 is written and fills the transport's buffer; frames 1..count are queued."""
    request.pause()
    peer.send(frame(0))
    await settle()
    for each in frames(count, start=1):
        peer.send(each)
    await settle()


async def test_frames_queued_in_one_turn_leave_in_one_write_in_order() -> None:
    peer, transport, _, _ = make_peer()
    for each in frames(5):
        peer.send(each)
    await settle()
    assert transport.writes == [encoded(frames(5))]
    peer.send(frame(9))
    await settle()
    assert transport.writes[1:] == [encoded([frame(9)])]
    await peer.aclose()


async def test_pongs_and_the_close_keep_their_place_among_the_frames() -> None:
    peer, transport, ws, _ = make_peer()
    peer.send(frame(1))
    peer.pong(b"x")
    peer.send(frame(2))
    peer.close("normal", "bye")
    peer.send(frame(3))  # after close: dropped
    await settle()
    assert transport.writes == [encoded([frame(1)]), b"PONG:x",
                                encoded([frame(2)])]
    assert ws.closes and ws.closes[0][1] == b"normal"


async def test_a_full_transport_buffer_holds_the_queue_and_a_peer_that_never_drains_is_cut_off(
) -> None:
    peer, transport, ws, request = make_peer(max_outbound=8)
    request.pause()  # the transport's buffer is full: drain() waits
    peer.send(frame(0))
    await settle()
    assert len(transport.writes) == 1
    for each in frames(7, start=1):
        peer.send(each)
        await settle()
    # Written nothing more while the buffer is full: the frames wait in the bounded queue.
    assert len(transport.writes) == 1 and not peer.closing
    with structlog.testing.capture_logs() as logs:
        for each in frames(2, start=8):
            peer.send(each)
        await settle()
    assert peer.closing
    assert [line["event"] for line in logs] == ["peer_not_reading"]
    assert ws.closes and ws.closes[0][1] == b"rate_limited"
    assert len(transport.writes) == 1


async def test_once_the_buffer_drains_the_waiting_frames_leave_together() -> None:
    peer, transport, _, request = make_peer()
    await queue_behind_a_full_buffer(peer, request, 4)
    request.resume()
    await settle()
    assert transport.writes == [encoded([frame(0)]), encoded(frames(4, start=1))]
    await peer.aclose()


async def test_a_long_queue_is_written_in_pieces_of_bounded_size(monkeypatch: Any) -> None:
    size = len(wire.encode_frame(frame(0)))
    monkeypatch.setattr(peer_module, "MAX_WRITE_BYTES", 3 * size)
    peer, transport, _, _ = make_peer()
    for each in frames(7):
        peer.send(each)
    await settle()
    assert transport.writes == [encoded(frames(3)), encoded(frames(3, start=3)),
                                encoded(frames(1, start=6))]
    await peer.aclose()


async def test_nothing_is_written_once_the_websocket_or_the_transport_is_closing() -> None:
    for closing in ("ws", "transport"):
        peer, transport, ws, _ = make_peer()
        if closing == "ws":
            ws.closed = True
        else:
            transport.closing = True
        peer.send(frame(1))
        await settle()
        assert transport.writes == [] and peer.closing, closing


async def test_a_peer_cut_off_while_its_writer_waits_for_drain_closes_without_cancelling(
) -> None:
    # The writer waits on the protocol's drain future when the peer is cut off: cancelling
    # the writer would cancel that future, and the close awaiting it would end in
    # CancelledError (out of the connection handler). Neither is cancelled now.
    peer, transport, ws, request = make_peer(max_outbound=2)
    await queue_behind_a_full_buffer(peer, request, 3)
    assert peer.closing and ws.closes == [(1008, b"rate_limited")]
    assert request.waiter is not None and not request.waiter.cancelled()
    await asyncio.wait_for(peer.aclose(), 5)  # the writer is cancelled only now, at the end
    assert len(transport.writes) == 1
