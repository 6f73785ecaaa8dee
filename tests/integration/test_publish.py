"""Publishing through a real broker: delivery, release decisions, and hostile envelopes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest

from broker import canonical, crypto, wire
from broker.coalition import Coalition
from broker.envelope import Envelope, build_envelope
from broker.server import BrokerServer
from clients.gateway import GatewayClient, Message, RequestRejected, label
from clients.identity import KeyFile
from policies.model import Label
from tests.integration.rawnode import RawNode

Gateways = Callable[[str], GatewayClient]

#: Every test twice: signatures checked on the event loop, and by a worker process.
pytestmark = pytest.mark.parametrize("server", [0, 1], indirect=True,
                                     ids=["verify-on-loop", "verify-workers"])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def next_message(gw: GatewayClient, timeout: float = 5) -> Message:
    stream = gw.messages()
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout)
    finally:
        await stream.aclose()


def envelope_for(key: KeyFile, recipients: dict[str, bytes], lab: Label, *,
                 topic: str = "maritime.tracks", ts: int | None = None) -> bytes:
    return build_envelope(signing_key=key.signing_key, sender=key.name, topic=topic,
                          payload=b"secret track", label=lab, prec=0, ttl=60,
                          recipient_keys=recipients, now_ms=ts if ts is not None else now_ms())


async def test_message_is_delivered_end_to_end_and_decrypted(gateway: Gateways) -> None:
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        lab = label("NATO", "SECRET", "USA", ["GBR"])
        receipt = await usa.publish("maritime.tracks", b"contact 51N 003W", lab,
                                    precedence="FLASH")
        assert receipt.recipients == {"GBR-GW1": "delivered"}
        message = await next_message(gbr)
        assert message.payload == b"contact 51N 003W"
        assert (message.sender, message.nation, message.precedence) == ("USA-GW1", "USA", 3)
        assert message.label == lab and message.id == receipt.id


async def test_recipient_outside_the_audience_is_denied_with_reason(gateway: Gateways) -> None:
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr, \
            gateway("FRA-GW1") as fra:
        await gbr.subscribe("maritime.>")
        await fra.subscribe("maritime.*")
        receipt = await usa.publish("maritime.tracks", b"x", label("NATO", "SECRET", "USA",
                                                                   ["GBR"]))
        assert receipt.recipients["FRA-GW1"] == "denied:not_in_audience"
        assert receipt.denied == {"FRA-GW1": ["not_in_audience"]}
        assert receipt.delivered == ["GBR-GW1"]


async def test_community_in_rel_expands_to_its_nations(gateway: Gateways) -> None:
    async with gateway("GBR-GW1") as gbr, gateway("USA-GW1") as usa, \
            gateway("FRA-GW1") as fra:
        for gw in (usa, fra):
            await gw.subscribe("intel.>")
        receipt = await gbr.publish("intel.reports", b"x", label("NATO", "SECRET", "GBR",
                                                                 ["FVEY"]))
        assert receipt.recipients == {"FRA-GW1": "denied:not_in_audience",
                                      "USA-GW1": "delivered"}


async def test_same_nation_needs_no_release(gateway: Gateways) -> None:
    async with gateway("USA-GW1") as usa, gateway("USA-GW2") as usa2:
        await usa2.subscribe("logistics.>")
        receipt = await usa.publish("logistics.fuel", b"x", label("NATO", "SECRET", "USA", []))
        assert receipt.recipients == {"USA-GW2": "delivered"}


async def test_offline_subscriber_gets_its_queue_on_reconnect_in_precedence_order(
    gateway: Gateways,
) -> None:
    async with gateway("GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
    lab = label("NATO", "SECRET", "USA", ["GBR"])
    async with gateway("USA-GW1") as usa:
        for prec, text in [(0, b"routine-1"), (1, b"priority"), (0, b"routine-2"), (3, b"flash")]:
            receipt = await usa.publish("maritime.tracks", text, lab, precedence=prec)
            assert receipt.recipients == {"GBR-GW1": "queued"}
    async with gateway("GBR-GW1") as gbr:
        stream = gbr.messages()
        got = [(await asyncio.wait_for(stream.__anext__(), 5)).payload for _ in range(4)]
        await stream.aclose()
    assert got == [b"flash", b"priority", b"routine-1", b"routine-2"]


async def test_unacked_delivery_is_redelivered_after_reconnect(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    async with RawNode(server.url) as raw:
        await raw.login(coalition.nodes["GBR-GW1"])
        await raw.send(wire.Sub(topic="maritime.>"))
        await raw.send(wire.Ping())
        assert await raw.recv() == wire.Pong()
        async with gateway("USA-GW1") as usa:
            receipt = await usa.publish("maritime.tracks", b"once",
                                        label("NATO", "SECRET", "USA", ["GBR"]))
        first = await raw.recv()
        assert isinstance(first, wire.Deliver)  # never acked: the raw node just leaves
    async with gateway("GBR-GW1") as gbr:
        message = await next_message(gbr)
    assert message.id == receipt.id and message.payload == b"once"


@contextlib.asynccontextmanager
async def usa_with_two_subscribers(gateway: Gateways) -> AsyncIterator[GatewayClient]:
    """USA-GW1 connected, with GBR-GW1 and FRA-GW1 connected and subscribed to maritime.>."""
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr, \
            gateway("FRA-GW1") as fra:
        await gbr.subscribe("maritime.>")
        await fra.subscribe("maritime.>")
        yield usa


async def test_recipient_without_a_sealed_key_is_denied(
    coalition: Coalition, gateway: Gateways
) -> None:
    async with usa_with_two_subscribers(gateway) as usa:
        certs = await usa.directory()
        env = envelope_for(coalition.nodes["USA-GW1"], {"GBR-GW1": certs["GBR-GW1"].enc_key},
                           label("NATO", "SECRET", "USA", ["FRA", "GBR"]))
        receipt = await usa.publish_envelope(env)
        assert receipt.recipients == {"FRA-GW1": "denied:no_key_for_recipient",
                                      "GBR-GW1": "delivered"}


async def test_route_dry_run_reports_decisions_and_keys(
    coalition: Coalition, gateway: Gateways
) -> None:
    async with usa_with_two_subscribers(gateway) as usa:
        plan = await usa.route("maritime.tracks", label("NATO", "SECRET", "USA", ["GBR"]),
                               to=("USA-GW2",))
        assert plan.recipients == {"FRA-GW1": "deny:not_in_audience", "GBR-GW1": "permit",
                                   "USA-GW2": "permit"}
        assert set(plan.keys) == {"GBR-GW1", "USA-GW2"}
        assert plan.keys["GBR-GW1"] == coalition.nodes["GBR-GW1"].enc_public


async def test_route_can_return_the_label_catalogue_per_destination_nation(
    gateway: Gateways
) -> None:
    async with usa_with_two_subscribers(gateway) as usa:
        plain = await usa.route("maritime.tracks", label("NATO", "SECRET", "USA", ["GBR"]))
        assert plain.catalogue is None  # only when asked: the contract frame stays as it is
        plan = await usa.route("maritime.tracks", label("NATO", "SECRET", "USA", ["GBR"]),
                               catalogue=True)
    assert plan.catalogue is not None and set(plan.catalogue) == {"FRA", "GBR"}
    best = plan.catalogue["GBR"]["best"]
    assert best["level"] == "TOP SECRET"  # COALITION-DEFAULT: one tier up to the top level
    assert plan.catalogue["GBR"]["origin"] == "USA"


async def test_directory_certificates_verify_against_the_trust_root(gateway: Gateways) -> None:
    async with gateway("USA-GW1") as usa:
        certs = await usa.directory()
    # FRA-OLD's certificate expired: the client does not trust it for keys or signatures.
    assert set(certs) == {"FRA-GW1", "GBR-GW1", "USA-GW1", "USA-GW2"}
    assert certs["GBR-GW1"].nation == "GBR"


async def test_client_seals_to_certified_keys_even_if_the_broker_lies(
    server: BrokerServer, gateway: Gateways
) -> None:
    # A compromised broker answers the dry run with its own key for GBR-GW1, hoping to read
    # the payload. The client takes keys from signed certificates, so GBR can still open it.
    evil_key = KeyFile.generate("node", "EVIL").enc_public
    honest_route = server.hub.route

    def lying_route(sender, frame):  # type: ignore[no-untyped-def]
        answer = honest_route(sender, frame)
        return wire.Routes(recipients=answer.recipients,
                           keys={node: evil_key for node in answer.keys})

    server.hub.route = lying_route  # type: ignore[method-assign]
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        await usa.publish("maritime.tracks", b"for GBR only",
                          label("NATO", "SECRET", "USA", ["GBR"]))
        assert (await next_message(gbr)).payload == b"for GBR only"


# --- hostile envelopes: rejected with a code, nothing routed, connection survives -----------


async def publish_rejected(gw: GatewayClient, env: bytes) -> RequestRejected:
    with pytest.raises(RequestRejected) as caught:
        await gw.publish_envelope(env)
    return caught.value


async def assert_nothing_delivered_and_alive(usa: GatewayClient, gbr: GatewayClient) -> None:
    """The publisher's connection still works, and the subscriber got nothing."""
    receipt = await usa.publish("maritime.tracks", b"after", label("NATO", "SECRET", "USA",
                                                                   ["GBR"]))
    assert receipt.delivered == ["GBR-GW1"]
    assert (await next_message(gbr)).payload == b"after"


async def test_forged_signature_is_rejected_and_connection_survives(
    coalition: Coalition, gateway: Gateways
) -> None:
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        forger = KeyFile.generate("node", "USA-GW1")  # same name, wrong key
        env = envelope_for(forger, {"GBR-GW1": coalition.nodes["GBR-GW1"].enc_public},
                           label("NATO", "SECRET", "USA", ["GBR"]))
        error = await publish_rejected(usa, env)
        assert error.code == "bad_signature" and error.ref == Envelope.from_bytes(env).id
        await assert_nothing_delivered_and_alive(usa, gbr)


async def test_envelope_of_another_node_is_rejected_as_sender_mismatch(
    coalition: Coalition, gateway: Gateways
) -> None:
    async with gateway("FRA-GW1") as fra, gateway("GBR-GW1") as gbr, \
            gateway("USA-GW1") as usa:
        await gbr.subscribe("maritime.>")
        stolen = envelope_for(coalition.nodes["USA-GW1"],
                              {"GBR-GW1": coalition.nodes["GBR-GW1"].enc_public},
                              label("NATO", "SECRET", "USA", ["GBR"]))
        assert (await publish_rejected(fra, stolen)).code == "sender_mismatch"
        await assert_nothing_delivered_and_alive(usa, gbr)


async def test_label_claiming_another_nation_is_rejected_as_sender_mismatch(
    coalition: Coalition, gateway: Gateways
) -> None:
    async with gateway("USA-GW1") as usa:
        env = envelope_for(coalition.nodes["USA-GW1"], {},
                           label("NATO", "SECRET", "GBR", ["FRA"]))
        assert (await publish_rejected(usa, env)).code == "sender_mismatch"


async def test_replayed_envelope_is_rejected(coalition: Coalition, gateway: Gateways) -> None:
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        env = envelope_for(coalition.nodes["USA-GW1"],
                           {"GBR-GW1": coalition.nodes["GBR-GW1"].enc_public},
                           label("NATO", "SECRET", "USA", ["GBR"]))
        assert (await usa.publish_envelope(env)).delivered == ["GBR-GW1"]
        assert (await publish_rejected(usa, env)).code == "replay"
        assert (await next_message(gbr)).id == Envelope.from_bytes(env).id


async def test_envelope_outside_clock_skew_is_rejected_as_replay(
    coalition: Coalition, gateway: Gateways
) -> None:
    async with gateway("USA-GW1") as usa:
        old = envelope_for(coalition.nodes["USA-GW1"], {}, label("NATO", "SECRET", "USA", []),
                           ts=now_ms() - 10 * 60 * 1000)
        assert (await publish_rejected(usa, old)).code == "replay"


async def test_non_canonical_body_is_rejected_even_when_signed(
    coalition: Coalition, gateway: Gateways
) -> None:
    key = coalition.nodes["USA-GW1"]
    env = Envelope.from_bytes(envelope_for(key, {}, label("NATO", "SECRET", "USA", [])))
    body = canonical.decode(env.body)
    # Same content, keys in reverse order: valid msgpack, validly signed, not canonical.
    reordered = msgpack.packb(dict(reversed(list(body.items()))), use_bin_type=True)
    sig = crypto.sign(key.signing_key, crypto.DOMAIN_ENVELOPE, reordered)
    async with gateway("USA-GW1") as usa, RawNode(usa.url) as raw:
        await raw.login(coalition.nodes["USA-GW2"])
        await raw.send(wire.Pub(env=canonical.encode([reordered, sig])))
        answer = await raw.recv()
        assert isinstance(answer, wire.Error) and answer.code == "non_canonical"


async def test_oversized_frame_closes_the_connection_with_too_large(
    server: BrokerServer, coalition: Coalition
) -> None:
    async with RawNode(server.url) as raw:
        await raw.login(coalition.nodes["USA-GW1"])
        await raw.send(wire.Pub(env=b"\x00" * (server.limits.max_frame_bytes + 1)))
        answer = await raw.recv()
        assert isinstance(answer, wire.Error) and answer.code == "too_large"
        assert await raw.closed() == 1009


async def test_garbage_after_welcome_gets_bad_frame_and_connection_survives(
    server: BrokerServer, coalition: Coalition
) -> None:
    async with RawNode(server.url) as raw:
        await raw.login(coalition.nodes["USA-GW1"])
        await raw.send_bytes(b"\xc1\xff not msgpack")
        answer = await raw.recv()
        assert isinstance(answer, wire.Error) and answer.code == "bad_frame"
        await raw.send(wire.Ping())
        assert await raw.recv() == wire.Pong()


async def test_invalid_subscription_pattern_is_rejected(
    server: BrokerServer, coalition: Coalition
) -> None:
    async with RawNode(server.url) as raw:
        await raw.login(coalition.nodes["USA-GW1"])
        await raw.send(wire.Sub(topic="Maritime.>.x"))
        answer = await raw.recv()
        assert isinstance(answer, wire.Error) and answer.code == "invalid_topic"
