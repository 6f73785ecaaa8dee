"""Abuse limits of both listeners, against real brokers on loopback with small limits: rates,
timeouts, connection counts, handshake back-off, slow clients, and envelope part sizes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import structlog.testing

from broker import wire
from broker.admin.app import AdminContext, AdminServer
from broker.admin.auth import TokenTable
from broker.audit.leaves import RouteEntry, SessionEntry, entry_from_bytes
from broker.coalition import Coalition
from broker.envelope import build_envelope
from broker.guard import ConnectionLimits
from broker.limits import EnvelopeLimits
from broker.ratelimit import RateLimits
from broker.server import BrokerServer, Limits
from broker.session import make_hello
from broker.store.base import Batch
from clients.gateway import GatewayClient, label
from clients.identity import KeyFile
from tests.integration.conftest import FAST_COMMIT
from tests.integration.rawnode import RawNode

FRAME = 64 * 1024


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextlib.asynccontextmanager
async def broker(coalition: Coalition, **limits: Any) -> AsyncIterator[BrokerServer]:
    """A broker with ``limits`` (fields of :class:`Limits`) over small frames."""
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                            limits=Limits(max_frame_bytes=FRAME, **limits),
                            commit=FAST_COMMIT) as server:
        yield server


def http_url(server: BrokerServer) -> str:
    return server.url.replace("ws://", "http://", 1)


async def sessions(server: BrokerServer) -> list[SessionEntry]:
    """The session entries of the audit log, once everything appended so far is durable."""
    await server.audit.write(Batch())  # commits are ordered: a barrier
    entries = [entry_from_bytes(e) for e in server.audit.store.entries(0, server.audit.size)]
    return [e for e in entries if isinstance(e, SessionEntry)]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds (a liveness bound, not a timing assertion)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def frames_until_close(raw: RawNode, timeout: float = 5.0) -> list[wire.Frame]:
    """Every frame the broker sends until it closes the connection."""
    assert raw.ws is not None
    frames: list[wire.Frame] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await raw.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                frames.append(wire.decode_frame(msg.data, max_bytes=1 << 20))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED):
                return frames


def errors(frames: list[wire.Frame]) -> list[str]:
    return [f.code for f in frames if isinstance(f, wire.Error)]


async def answer(raw: RawNode) -> wire.Frame:
    """The next frame that is not a checkpoint (offered to every gateway at any time)."""
    return await raw.recv(skip_checkpoints=True)


# --- 1. frames and bytes per second ---------------------------------------------------------


async def test_a_frame_flood_is_throttled_and_every_frame_still_answered(
    coalition: Coalition,
) -> None:
    rate, burst, count = 50, 10, 40
    async with broker(coalition, rate=RateLimits(frames_per_second=rate, frames_burst=burst,
                                                 max_throttle_s=4.0)) as server, \
            RawNode(server.url) as raw:
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        started = time.monotonic()
        for _ in range(count):
            await raw.send(wire.Ping())
        pongs = 0
        while pongs < count:
            pongs += isinstance(await raw.recv(), wire.Pong)
        elapsed = time.monotonic() - started
        # The hello took one token; the rest of the burst went at once, then `rate` per second.
        assert elapsed >= (count - burst - 1) / rate
        assert "USA-GW1" in server.hub.peers


async def test_a_connection_that_stays_over_its_frame_rate_is_closed_rate_limited(
    coalition: Coalition,
) -> None:
    async with broker(coalition, rate=RateLimits(frames_per_second=20, frames_burst=5,
                                                 max_throttle_s=0.5)) as server, \
            RawNode(server.url) as raw:
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        started = time.monotonic()
        for _ in range(100):
            await raw.send(wire.Ping())
        frames = await frames_until_close(raw)
        assert time.monotonic() - started >= 0.45
        assert errors(frames) == ["rate_limited"]
        assert 0 < sum(isinstance(f, wire.Pong) for f in frames) < 100
        assert raw.ws is not None and raw.ws.close_code == 1008
        await eventually(lambda: "USA-GW1" not in server.hub.peers)
        assert [e.event for e in await sessions(server)] == ["connect", "disconnect"]


async def test_a_node_with_rates_of_its_own_is_held_to_them_once_authenticated(
    coalition: Coalition,
) -> None:
    """A busy gateway gets its own rates (limits.node_rates); every other node, and every
    connection before its hello, the listener's."""
    tight = RateLimits(frames_per_second=20, frames_burst=5, max_throttle_s=0.5)
    busy = RateLimits(frames_per_second=100_000, frames_burst=1000, max_throttle_s=0.5)
    async with broker(coalition, rate=tight, node_rates={"USA-GW1": busy}) as server, \
            RawNode(server.url) as fast, RawNode(server.url) as other:
        assert isinstance(await fast.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        assert isinstance(await other.login(coalition.nodes["GBR-GW1"]), wire.Welcome)
        for _ in range(200):
            await fast.send(wire.Ping())
        for _ in range(200):
            assert isinstance(await answer(fast), wire.Pong)
        assert "USA-GW1" in server.hub.peers
        for _ in range(100):
            await other.send(wire.Ping())
        assert errors(await frames_until_close(other)) == ["rate_limited"]
        assert "USA-GW1" in server.hub.peers


async def test_rates_for_a_node_the_bundle_does_not_know_are_reported_at_start(
    coalition: Coalition,
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with broker(coalition, node_rates={"USA-GW9": RateLimits(), "USA-GW1": RateLimits()}):
            pass
    warned = [e for e in logs if e["event"] == "node_rates_for_unknown_nodes"]
    assert [e["nodes"] for e in warned] == [["USA-GW9"]]


async def test_a_message_too_big_for_the_byte_rate_is_refused_at_once(
    coalition: Coalition,
) -> None:
    limits = RateLimits(bytes_per_second=1024, bytes_burst=2048, max_throttle_s=1.0)
    async with broker(coalition, rate=limits) as server, RawNode(server.url) as raw:
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        await raw.send_bytes(os.urandom(4000))  # never parsed: refused on its size alone
        frames = await frames_until_close(raw)
        error = next(f for f in frames if isinstance(f, wire.Error))
        assert error.code == "rate_limited" and "4000-byte message" in error.reason


async def test_websocket_pings_count_against_the_rate_limit(coalition: Coalition) -> None:
    async with broker(coalition, rate=RateLimits(frames_per_second=20, frames_burst=5,
                                                 max_throttle_s=0.3)) as server, \
            RawNode(server.url) as raw:
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        assert raw.ws is not None
        for _ in range(100):
            await raw.ws.ping()
        assert errors(await frames_until_close(raw)) == ["rate_limited"]
        assert raw.ws.close_code == 1008


# --- 2. handshake and idle timeouts ---------------------------------------------------------


async def test_a_connection_that_never_sends_a_hello_is_closed_after_the_handshake_timeout(
    coalition: Coalition,
) -> None:
    async with broker(coalition, handshake_timeout_s=0.5) as server:
        started = time.monotonic()  # before the broker's deadline starts
        async with RawNode(server.url) as raw:
            assert errors(await frames_until_close(raw)) == ["not_authenticated"]
        assert time.monotonic() - started >= 0.5
        (failed,) = await sessions(server)
        assert failed.event == "auth_failed" and failed.reason.startswith("not_authenticated")


async def test_an_idle_authenticated_connection_is_closed_with_idle_timeout(
    coalition: Coalition,
) -> None:
    async with broker(coalition, idle_timeout_s=0.5) as server, RawNode(server.url) as raw:
        started = time.monotonic()  # before the hello, the last frame the broker receives
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        assert errors(await frames_until_close(raw)) == []  # no error frame, a close reason
        assert time.monotonic() - started >= 0.5
        assert raw.ws is not None and raw.ws.close_code == 1001
        await eventually(lambda: "USA-GW1" not in server.hub.peers)
        assert [e.event for e in await sessions(server)] == ["connect", "disconnect"]


async def test_the_gateway_heartbeat_keeps_an_idle_connection_open(
    coalition: Coalition,
) -> None:
    async with broker(coalition, idle_timeout_s=0.5) as server:
        client = GatewayClient(server.url, coalition.nodes["USA-GW1"], coalition.trust_root,
                               broker_name=coalition.broker_name, timeout=5, max_frame=FRAME,
                               heartbeat=0.1)
        async with client:
            peer = server.hub.peers["USA-GW1"]
            await asyncio.sleep(1.5)  # three idle timeouts without a single frame
            assert server.hub.peers.get("USA-GW1") is peer
            assert client.reconnections == 0


# --- 3. connection counts -------------------------------------------------------------------


async def test_connections_over_the_total_limit_get_503_before_the_upgrade(
    coalition: Coalition,
) -> None:
    async with broker(coalition, connections=ConnectionLimits(max_connections=2)) as server, \
            aiohttp.ClientSession() as http:
        async with RawNode(server.url) as first, RawNode(server.url):
            assert isinstance(await first.login(coalition.nodes["USA-GW1"]), wire.Welcome)
            async with http.get(http_url(server)) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"] == "unavailable"
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                await http.ws_connect(server.url)
            assert caught.value.status == 503
        await eventually(lambda: server.guard.open == 0)
        async with RawNode(server.url) as again:
            assert isinstance(await again.login(coalition.nodes["USA-GW1"]), wire.Welcome)


async def test_unauthenticated_connections_per_address_are_limited_with_429(
    coalition: Coalition,
) -> None:
    limits = ConnectionLimits(max_unauthenticated_per_address=2)
    async with broker(coalition, connections=limits) as server, \
            aiohttp.ClientSession() as http, RawNode(server.url) as first, RawNode(server.url):
        async with http.get(http_url(server)) as refused:
            assert refused.status == 429
            assert (await refused.json())["error"] == "rate_limited"
        assert isinstance(await first.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        async with RawNode(server.url) as third:  # the authenticated one left the count
            assert isinstance(await third.login(coalition.nodes["GBR-GW1"]), wire.Welcome)


async def test_a_node_that_reconnects_too_often_is_refused_and_keeps_its_connection(
    coalition: Coalition,
) -> None:
    usa = coalition.nodes["USA-GW1"]
    limits = ConnectionLimits(node_connects_per_minute=2)
    async with broker(coalition, connections=limits) as server, \
            RawNode(server.url) as first, RawNode(server.url) as second, \
            RawNode(server.url) as third:
        assert isinstance(await first.login(usa), wire.Welcome)
        assert isinstance(await second.login(usa), wire.Welcome)  # replaces the first
        await frames_until_close(first)
        refused = await third.login(usa)
        assert isinstance(refused, wire.Error) and refused.code == "rate_limited"
        await third.closed()
        await second.send(wire.Ping())  # the connection in place is untouched
        assert await answer(second) == wire.Pong()
        audited = [(e.event, e.reason.split(":")[0]) for e in await sessions(server)]
        assert ("auth_failed", "rate_limited") in audited


# --- 4. back-off after failed handshakes ----------------------------------------------------


async def test_failed_handshakes_back_off_the_address_without_flooding_the_audit_log(
    coalition: Coalition,
) -> None:
    limits = ConnectionLimits(auth_backoff_free_failures=1, auth_backoff_initial_s=2.0,
                              auth_backoff_max_s=8.0)
    impostor = KeyFile.generate("node", "USA-GW1")
    async with broker(coalition, connections=limits) as server, \
            aiohttp.ClientSession() as http:
        for _ in range(2):  # one free failure, then a 2 s back-off
            async with RawNode(server.url) as raw:
                refused = await raw.login(impostor)
                assert isinstance(refused, wire.Error) and refused.code == "bad_signature"
                await raw.closed()
        with structlog.testing.capture_logs() as logs:
            for _ in range(10):
                async with http.get(http_url(server)) as refused:
                    assert refused.status == 429
                    assert (await refused.json())["error"] == "rate_limited"
                    retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 2  # whole seconds, rounded up
        lines = [line for line in logs if line["event"] == "upgrade_refused"]
        assert len(lines) == 1 and lines[0]["limit"] == "backoff"  # aggregated
        failures = [e for e in await sessions(server) if e.event == "auth_failed"]
        assert len(failures) == 2  # refusals are not audited
        await asyncio.sleep(retry_after)
        async with RawNode(server.url) as raw:  # the back-off is over; a success resets it
            assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        async with RawNode(server.url) as raw:
            assert isinstance(await raw.login(impostor), wire.Error)  # free again
        async with RawNode(server.url) as raw:
            assert raw.challenge is not None


# --- 5. slow clients on both listeners ------------------------------------------------------


async def trickle(port: int, data: bytes, *, every: float = 0.05,
                  timeout: float = 5.0) -> tuple[bytes, float, bool]:
    """Send ``data`` one byte every ``every`` seconds; return what the server sent until it
    closed, when it closed, and whether ``data`` was all sent by then."""
    started = time.monotonic()  # before the broker accepts the connection
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await trickle_into(reader, writer, data, every, timeout=timeout, started=started)


UPGRADE = (b"GET /v1/node HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


async def test_a_slowloris_upgrade_request_is_cut_off(coalition: Coalition) -> None:
    async with broker(coalition, request_timeout_s=0.5) as server:
        received, elapsed, finished = await trickle(server.port, UPGRADE)
        assert received == b"" and not finished and elapsed >= 0.5
        assert server.guard.open == 0  # never reached the WebSocket endpoint


async def test_a_tcp_connection_that_sends_nothing_at_all_is_closed(
    coalition: Coalition,
) -> None:
    async with broker(coalition, request_timeout_s=0.5) as server:
        received, elapsed, _ = await trickle(server.port, b"")
        assert received == b"" and elapsed >= 0.5


@contextlib.asynccontextmanager
async def admin(server: BrokerServer, **timeouts: float) -> AsyncIterator[AdminServer]:
    async with AdminServer(AdminContext(server, None), TokenTable(()), port=0,
                           **timeouts) as running:
        yield running


async def test_a_slowloris_admin_request_head_is_cut_off(server: BrokerServer) -> None:
    async with admin(server, request_timeout_s=0.5) as api:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 100 + b"\r\n\r\n"
        received, elapsed, finished = await trickle(api.port, head)
        assert received == b"" and not finished and elapsed >= 0.5


async def test_a_slowloris_admin_request_body_gets_408(server: BrokerServer) -> None:
    async with admin(server, request_timeout_s=0.5) as api:
        head = (b"POST /v1/policy/decide HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        try:
            writer.write(head)
            received, _, finished = await trickle_into(reader, writer, b"{" + b" " * 199)
        finally:
            writer.close()
        assert received.startswith(b"HTTP/1.1 408") and b"request_timeout" in received
        assert not finished


async def trickle_into(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       data: bytes, every: float = 0.05, *, timeout: float = 5.0,
                       started: float | None = None) -> tuple[bytes, float, bool]:
    """As :func:`trickle`, on an open connection (``started``: when the clock started)."""
    started = time.monotonic() if started is None else started

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in data:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(every)

    dripping = asyncio.create_task(drip())
    try:
        try:
            received = await asyncio.wait_for(reader.read(), timeout)
        except ConnectionResetError:
            received = b""
        return received, time.monotonic() - started, dripping.done()
    finally:
        dripping.cancel()


async def small_window(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that advertises a tiny receive window and buffers little: once the test
    stops reading, the server's writes stall after a few kilobytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=4096)


async def drain_until_closed(reader: asyncio.StreamReader) -> int:
    """Read what is left until the server closes (or resets); return the byte count."""
    total = 0
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                total += len(chunk)
    return total


async def test_an_admin_client_that_never_reads_is_cut_off(server: BrokerServer) -> None:
    async with admin(server, write_stall_timeout_s=0.5) as api:
        reader, writer = await small_window(api.port)
        try:
            with structlog.testing.capture_logs() as logs:
                # Pipelined requests, never read, until the kernel's buffers are full.
                async with asyncio.timeout(5):
                    while not any(line["event"] == "write_stalled" for line in logs):
                        with contextlib.suppress(ConnectionError):
                            writer.write(b"GET /v1/openapi.json HTTP/1.1\r\n"
                                         b"Host: 127.0.0.1\r\n\r\n" * 50)
                            await writer.drain()
                        await asyncio.sleep(0.05)
            stalled = next(line for line in logs if line["event"] == "write_stalled")
            assert stalled["listener"] == "admin"
            assert await drain_until_closed(reader) > 0  # cut off, answers left unsent
        finally:
            writer.close()


class SlowNode:
    """A node on a raw socket with a tiny receive window: it reads only its handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def login(cls, server: BrokerServer, key: KeyFile) -> SlowNode:
        reader, writer = await small_window(server.port)
        nonce = base64.b64encode(os.urandom(16))
        writer.write(b"GET /v1/node HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: " + nonce + b"\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        node = cls(reader, writer)
        challenge = await node.recv()
        assert isinstance(challenge, wire.Challenge)
        node.send(make_hello(challenge, key.name, key.signing_key, now_ms()))
        assert isinstance(await node.recv(), wire.Welcome)
        return node

    def send(self, frame: wire.Frame) -> None:
        payload, mask = wire.encode_frame(frame), os.urandom(4)
        size = len(payload)
        head = bytes([0x82]) + (bytes([0x80 | size]) if size < 126 else
                                bytes([0x80 | 126]) + size.to_bytes(2, "big"))
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def recv(self) -> wire.Frame:
        first, second = await self.reader.readexactly(2)
        assert first & 0x0F == 0x2, "expected a binary frame"
        size = second & 0x7F
        if size >= 126:
            size = int.from_bytes(await self.reader.readexactly(2 if size == 126 else 8), "big")
        return wire.decode_frame(await self.reader.readexactly(size), max_bytes=1 << 20)


async def test_a_node_that_never_reads_is_cut_off_by_the_stall_watchdog(
    coalition: Coalition,
) -> None:
    fast = RateLimits(frames_per_second=1_000_000, frames_burst=1_000_000)
    async with broker(coalition, write_stall_timeout_s=0.5, max_outbound_frames=1_000_000,
                      rate=fast) as server:
        node = await SlowNode.login(server, coalition.nodes["USA-GW1"])
        try:
            with structlog.testing.capture_logs() as logs:
                # Each answer holds every certificate (a few KB): ask until the kernel's
                # buffers (several MB on loopback) are full and the broker's writes stall.
                async with asyncio.timeout(5):
                    while "USA-GW1" in server.hub.peers:
                        for _ in range(500):
                            node.send(wire.Directory())
                        with contextlib.suppress(ConnectionError):
                            await node.writer.drain()
                        await asyncio.sleep(0.05)
            assert any(line["event"] == "write_stalled" and line["listener"] == "node"
                       for line in logs)
        finally:
            node.writer.close()


async def test_a_node_that_floods_requests_without_reading_hits_max_outbound_frames(
    coalition: Coalition,
) -> None:
    async with broker(coalition, max_outbound_frames=16, write_stall_timeout_s=60) as server:
        node = await SlowNode.login(server, coalition.nodes["USA-GW1"])
        try:
            with structlog.testing.capture_logs() as logs:
                for _ in range(1000):
                    node.send(wire.Directory())
                await node.writer.drain()
                await eventually(lambda: "USA-GW1" not in server.hub.peers)
            assert any(line["event"] == "peer_not_reading" for line in logs)
            assert not any(line["event"] == "write_stalled" for line in logs)
        finally:
            node.writer.close()


# --- 6. sizes of envelope parts -------------------------------------------------------------


def envelope(coalition: Coalition, *, to: tuple[str, ...] = (),
             recipients: tuple[str, ...] = ("GBR-GW1",)) -> bytes:
    usa = coalition.nodes["USA-GW1"]
    return build_envelope(signing_key=usa.signing_key, sender="USA-GW1",
                          topic="maritime.tracks", payload=b"bearing 270",
                          label=label("NATO", "SECRET", "USA", ["GBR"]), prec=0, ttl=60,
                          recipient_keys={n: coalition.nodes[n].enc_public for n in recipients},
                          now_ms=now_ms(), to=to)


Build = Callable[[Coalition], bytes]


@pytest.mark.parametrize(("limits", "build", "names"), [
    (EnvelopeLimits(max_topic_bytes=10), envelope, "limits.max_topic_bytes"),
    (EnvelopeLimits(max_label_bytes=32), envelope, "limits.max_label_bytes"),
    (EnvelopeLimits(max_to=1), lambda c: envelope(c, to=("FRA-GW1", "GBR-GW1")),
     "limits.max_to_entries"),
    (EnvelopeLimits(max_keys=1), lambda c: envelope(c, recipients=("FRA-GW1", "GBR-GW1")),
     "limits.max_keys_entries"),
])
async def test_an_envelope_part_over_its_limit_is_too_large_and_nothing_is_routed(
    coalition: Coalition, limits: EnvelopeLimits, build: Build, names: str,
) -> None:
    async with broker(coalition, envelope=limits) as server, RawNode(server.url) as raw:
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        await raw.send(wire.Pub(env=build(coalition)))
        error = await answer(raw)
        assert isinstance(error, wire.Error) and error.code == "too_large"
        assert names in error.reason and error.ref is not None
        await raw.send(wire.Ping())  # the connection survives
        assert await answer(raw) == wire.Pong()
        await server.audit.write(Batch())
        entries = [entry_from_bytes(e) for e in server.audit.store.entries(0, server.audit.size)]
        assert not any(isinstance(e, RouteEntry) for e in entries)


async def test_a_route_frame_over_its_limits_is_too_large_and_the_connection_survives(
    coalition: Coalition,
) -> None:
    limits = EnvelopeLimits(max_to=1)
    async with broker(coalition, envelope=limits) as server, RawNode(server.url) as raw:
        assert isinstance(await raw.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        lab = label("NATO", "SECRET", "USA", ["GBR"]).to_map()
        await raw.send(wire.Route(topic="maritime.tracks", label=lab, to=("FRA-GW1", "GBR-GW1")))
        error = await answer(raw)
        assert isinstance(error, wire.Error) and error.code == "too_large"
        assert "limits.max_to_entries" in error.reason
        await raw.send(wire.Route(topic="maritime.tracks", label=lab, to=("GBR-GW1",)))
        assert isinstance(await answer(raw), wire.Routes)

