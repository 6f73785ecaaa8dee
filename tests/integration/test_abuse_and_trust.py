"""Regressions from review: abuse of the listener, and a client that trusts no broker answer."""

from __future__ import annotations

import time
from collections.abc import Callable

import aiohttp
import pytest

from broker import wire
from broker.coalition import Coalition
from broker.envelope import Envelope
from broker.errors import ProtocolError
from broker.server import BrokerServer, Limits
from broker.store.base import Batch
from clients.gateway import GatewayClient, label

Gateways = Callable[[str], GatewayClient]


async def test_websocket_pings_do_not_extend_the_handshake_timeout(server: BrokerServer) -> None:
    timeout = server.limits.handshake_timeout_s
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url) as ws:
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < timeout + 4:
            await ws.ping()  # keeps the socket busy, but is no hello
            try:
                msg = await ws.receive(timeout=0.3)
            except TimeoutError:
                continue
            closed = msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.CLOSING)
        assert closed, "a pinging, never-authenticating connection was kept open"


async def test_client_seals_only_inside_the_label_audience_whatever_the_broker_says(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    honest_route = server.hub.route
    sent: list[bytes] = []
    honest_publish = server.hub.publish

    def lying_route(sender, frame):  # type: ignore[no-untyped-def]
        answer = honest_route(sender, frame)
        recipients = {**answer.recipients, "FRA-GW1": "permit"}
        keys = {**answer.keys, "FRA-GW1": coalition.nodes["FRA-GW1"].enc_public}
        return wire.Routes(recipients=recipients, keys=keys)

    def recording_publish(sender, env, reply):  # type: ignore[no-untyped-def]
        sent.append(env)
        return honest_publish(sender, env, reply)

    server.hub.route = lying_route  # type: ignore[method-assign]
    server.hub.publish = recording_publish  # type: ignore[method-assign]
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        await usa.publish("maritime.tracks", b"GBR eyes only",
                          label("NATO", "SECRET", "USA", ["GBR"]))
    assert set(Envelope.from_bytes(sent[0]).keys) == {"GBR-GW1"}


async def test_breaking_out_of_messages_still_acks_so_the_window_is_not_wedged(
    coalition: Coalition,
) -> None:
    limits = Limits(delivery_window=1)
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                            limits=limits) as server:
        def client(node: str) -> GatewayClient:
            return GatewayClient(server.url, coalition.nodes[node], coalition.trust_root,
                                 broker_name=coalition.broker_name, timeout=5)

        async with client("USA-GW1") as usa, client("GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
            lab = label("NATO", "SECRET", "USA", ["GBR"])
            for text in (b"first", b"second", b"third"):
                await usa.publish("maritime.tracks", text, lab)
            got = []
            for _ in range(3):
                async for message in gbr.messages():
                    got.append(message.payload)
                    break  # the consumer leaves after each message
            assert got == [b"first", b"second", b"third"]


async def test_subscriptions_per_node_are_bounded_and_durable(server: BrokerServer) -> None:
    hub = server.hub
    hub.subscribe("USA-GW1", "a.>", limit=2)
    hub.subscribe("USA-GW1", "b.>", limit=2)
    hub.subscribe("USA-GW1", "a.>", limit=2)  # already held: not a new one
    with pytest.raises(ProtocolError) as caught:
        hub.subscribe("USA-GW1", "c.>", limit=2)
    assert caught.value.code == "rate_limited"
    assert hub.subscriptions["USA-GW1"] == {"a.>", "b.>"}
    await hub.audit.write(Batch())  # after the subscriptions' own writes
    assert set(hub.audit.store.subscriptions()) == {("USA-GW1", "a.>"), ("USA-GW1", "b.>")}
