"""Authentication against signed certificates, with a real broker on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
import pytest

from broker import wire
from broker.coalition import Coalition
from broker.server import BrokerServer
from clients.gateway import AuthenticationError, GatewayClient
from clients.identity import KeyFile
from tests.integration.rawnode import RawNode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_valid_node_is_welcomed(server: BrokerServer, coalition: Coalition) -> None:
    async with RawNode(server.url) as raw:
        assert raw.challenge is not None and raw.challenge.broker == coalition.broker_name
        assert len(raw.challenge.nonce) == 32
        answer = await raw.login(coalition.nodes["USA-GW1"])
        assert answer == wire.Welcome(node="USA-GW1")


async def test_frames_before_hello_are_refused_and_close(server: BrokerServer) -> None:
    async with RawNode(server.url) as raw:
        await raw.send(wire.Sub(topic="maritime.>"))
        answer = await raw.recv()
        assert isinstance(answer, wire.Error) and answer.code == "not_authenticated"
        await raw.closed()


async def test_unknown_node_is_refused(server: BrokerServer) -> None:
    stranger = KeyFile.generate("node", "XYZ-GW1")
    async with RawNode(server.url) as raw:
        answer = await raw.login(stranger)
        assert isinstance(answer, wire.Error) and answer.code == "unknown_node"
        await raw.closed()


async def test_bad_hello_signature_is_refused(server: BrokerServer) -> None:
    # Right node id, wrong key: an impostor who knows the name but not the key.
    impostor = KeyFile.generate("node", "USA-GW1")
    async with RawNode(server.url) as raw:
        answer = await raw.login(impostor)
        assert isinstance(answer, wire.Error) and answer.code == "bad_signature"
        await raw.closed()


async def test_hello_with_another_connections_nonce_is_refused(
    server: BrokerServer, coalition: Coalition
) -> None:
    key = coalition.nodes["USA-GW1"]
    async with RawNode(server.url) as first, RawNode(server.url) as second:
        assert first.challenge is not None
        from broker.session import make_hello

        stolen = make_hello(first.challenge, key.name, key.signing_key, now_ms())
        await second.send(stolen)
        answer = await second.recv()
        assert isinstance(answer, wire.Error) and answer.code == "handshake_failed"


async def test_expired_certificate_is_refused_at_handshake(
    gateway: Callable[[str], GatewayClient]
) -> None:
    with pytest.raises(AuthenticationError) as caught:
        async with gateway("FRA-OLD"):
            pass
    assert caught.value.code == "node_inactive"


async def test_silent_connection_is_closed_after_handshake_timeout(server: BrokerServer) -> None:
    async with RawNode(server.url) as raw:
        answer = await raw.recv(timeout=server.limits.handshake_timeout_s + 3)
        assert isinstance(answer, wire.Error) and answer.code == "not_authenticated"
        await raw.closed()


async def test_client_refuses_unexpected_broker_name(
    server: BrokerServer, coalition: Coalition
) -> None:
    client = GatewayClient(server.url, coalition.nodes["USA-GW1"], coalition.trust_root,
                           broker_name="evil.example", timeout=5)
    with pytest.raises(AuthenticationError) as caught:
        await client.connect()
    assert caught.value.code == "wrong_broker"


async def test_newer_connection_replaces_older_one(
    server: BrokerServer, coalition: Coalition
) -> None:
    async with RawNode(server.url) as old, RawNode(server.url) as new:
        assert isinstance(await old.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        assert isinstance(await new.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        await old.closed()
        await new.send(wire.Ping())
        assert await new.recv(skip_checkpoints=True) == wire.Pong()


async def test_the_broker_does_not_negotiate_websocket_compression(
    server: BrokerServer, coalition: Coalition
) -> None:
    # A client offering permessage-deflate gets plain frames (the broker writes its own frames,
    # uncompressed, and compressing what several senders wrote in one context leaks).
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url, compress=15) as ws:
        assert ws.compress == 0
        assert "Sec-WebSocket-Extensions" not in ws._response.headers
        challenge = wire.decode_frame((await ws.receive(timeout=5)).data, max_bytes=1 << 20)
        assert isinstance(challenge, wire.Challenge)
