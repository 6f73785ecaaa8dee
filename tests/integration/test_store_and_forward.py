"""Store-and-forward through a real broker: TTL expiry and notices, queue and store limits,
precedence over a large backlog, and a stalled recipient (DESIGN §9)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker import wire
from broker.audit.leaves import ExpireEntry, RouteEntry, entry_from_bytes
from broker.capacity import StoreLimits
from broker.coalition import Coalition
from broker.envelope import build_envelope
from broker.errors import StorageError
from broker.server import BrokerServer, Limits
from clients.gateway import GatewayClient, Message, RequestRejected, label
from tests.integration.conftest import FAST_COMMIT
from tests.integration.rawnode import RawNode

TO_GBR = label("NATO", "SECRET", "USA", ["GBR"])
TO_GBR_FRA = label("NATO", "SECRET", "USA", ["GBR", "FRA"])


class Clock:
    """Wall-clock milliseconds plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset


def _broker(coalition: Coalition, clock: Clock, limits: Limits) -> BrokerServer:
    return BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                        key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                        limits=limits, commit=FAST_COMMIT, clock_ms=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def broker(coalition: Coalition, clock: Clock) -> AsyncIterator[BrokerServer]:
    # The sweeper is left slow: tests call expire_due() after moving the clock.
    limits = Limits(max_frame_bytes=64 * 1024, expiry_interval_s=3600)
    async with _broker(coalition, clock, limits) as running:
        yield running


@pytest.fixture
def gateway(coalition: Coalition) -> Callable[[BrokerServer, str], GatewayClient]:
    def make(server: BrokerServer, node: str) -> GatewayClient:
        return GatewayClient(server.url, coalition.nodes[node], coalition.trust_root,
                             broker_name=coalition.broker_name, timeout=10,
                             max_frame=64 * 1024)
    return make


Gateway = Callable[[BrokerServer, str], GatewayClient]


async def _until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def _entries(server: BrokerServer) -> list[object]:
    store = server.audit.store
    return [entry_from_bytes(data) for _, data in store.iter_entries()]


async def _first(gw: GatewayClient, timeout: float = 10) -> Message:
    stream = gw.messages()
    try:
        return await asyncio.wait_for(anext(stream), timeout)
    finally:
        await stream.aclose()


# --- TTL ------------------------------------------------------------------------------------


async def test_expired_message_is_dropped_logged_and_the_connected_sender_told(
        broker: BrokerServer, clock: Clock, gateway: Gateway, coalition: Coalition) -> None:
    async with gateway(broker, "GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")  # then offline
    async with gateway(broker, "USA-GW1") as usa:
        old = await usa.publish("maritime.tracks", b"stale soon", TO_GBR, ttl=2)
        fresh = await usa.publish("maritime.tracks", b"still good", TO_GBR, ttl=600)
        assert old.recipients == fresh.recipients == {"GBR-GW1": "queued"}
    async with RawNode(broker.url) as sender:
        assert isinstance(await sender.login(coalition.nodes["USA-GW1"]), wire.Welcome)
        clock.offset += 3_000
        assert broker.hub.expire_due() == 1
        notice = await _next_of(sender, wire.Expired)
        assert notice == wire.Expired(id=old.id, recipient="GBR-GW1")
    expired = [e for e in _entries(broker) if isinstance(e, ExpireEntry)]
    assert [(e.id, e.to, e.sender) for e in expired] == [(old.id, "GBR-GW1", "USA-GW1")]
    assert [row.id for row in broker.audit.store.queue_rows()] == [fresh.id]
    async with gateway(broker, "GBR-GW1") as gbr:
        assert (await _first(gbr)).id == fresh.id  # the expired one is never delivered


async def test_offline_sender_is_told_at_its_next_connect_even_after_a_restart(
        coalition: Coalition, clock: Clock, gateway: Gateway) -> None:
    limits = Limits(max_frame_bytes=64 * 1024, expiry_interval_s=0.02)
    async with _broker(coalition, clock, limits) as server:
        async with gateway(server, "GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
        async with gateway(server, "USA-GW1") as usa:
            receipt = await usa.publish("maritime.tracks", b"x", TO_GBR, ttl=1)
        clock.offset += 2_000  # the sweeper expires it while USA is offline
        await _until(lambda: bool(server.audit.store.notices()))
    async with _broker(coalition, clock, limits) as server:
        assert server.hub.expiry.notices  # restored from the store
        async with RawNode(server.url) as sender:
            await sender.login(coalition.nodes["USA-GW1"])
            notice = await _next_of(sender, wire.Expired)
            assert notice == wire.Expired(id=receipt.id, recipient="GBR-GW1")
            await _until(lambda: not server.audit.store.notices())  # told once, then forgotten
        async with RawNode(server.url) as sender:
            await sender.login(coalition.nodes["USA-GW1"])
            with pytest.raises(TimeoutError):
                await _next_of(sender, wire.Expired, timeout=0.3)


async def _next_of(node: RawNode, kind: type[wire.Frame], timeout: float = 5) -> wire.Frame:
    """The next frame of ``kind`` (checkpoints and other frames are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await node.recv(timeout=timeout)
            if isinstance(frame, kind):
                return frame


# --- limits ---------------------------------------------------------------------------------


async def test_full_recipient_queue_refuses_the_publish_naming_the_node(
        coalition: Coalition, clock: Clock, gateway: Gateway) -> None:
    limits = Limits(max_frame_bytes=64 * 1024, max_queued_bytes_per_node=20_000)
    async with _broker(coalition, clock, limits) as server:
        async with gateway(server, "GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
        accepted = []
        async with gateway(server, "USA-GW1") as usa:
            with pytest.raises(RequestRejected) as refused:
                for i in range(100):
                    accepted.append(await usa.publish("maritime.tracks", b"%04d" % i + b"x" * 1000,
                                                      TO_GBR))
            assert refused.value.code == "unavailable"
            assert "GBR-GW1" in refused.value.reason and "max_queued_bytes" in refused.value.reason
            assert 10 <= len(accepted) < 20  # ~1.5 KiB envelopes under a 20 kB limit
            routed = [e for e in _entries(server) if isinstance(e, RouteEntry)]
            assert [e.id for e in routed] == [r.id for r in accepted]  # nothing half-written
            async with gateway(server, "GBR-GW1") as gbr:  # GBR drains its queue...
                stream = gbr.messages()
                got = [(await anext(stream)).id for _ in accepted]
                await stream.aclose()
                assert got == [r.id for r in accepted]
                await _until(lambda: server.hub.queues["GBR-GW1"].bytes == 0)
            # ...and the publisher is served again.
            assert (await usa.publish("maritime.tracks", b"again", TO_GBR)).queued == ["GBR-GW1"]


async def test_full_store_refuses_every_publish_and_writes_nothing(
        coalition: Coalition, clock: Clock, gateway: Gateway) -> None:
    limits = Limits(max_frame_bytes=64 * 1024, store=StoreLimits(max_store_bytes=1))
    async with _broker(coalition, clock, limits) as server, gateway(server, "USA-GW1") as usa:
        before = server.audit.size
        with pytest.raises(RequestRejected) as refused:
            await usa.publish("maritime.tracks", b"x", TO_GBR)
        assert refused.value.code == "unavailable"
        assert "store is full" in refused.value.reason
        assert not [e for e in _entries(server) if isinstance(e, RouteEntry)]
        assert server.audit.size - before <= 1  # at most USA's own session entry


# --- precedence and flow control ------------------------------------------------------------


async def test_flash_overtakes_ten_thousand_queued_routine(
        broker: BrokerServer, gateway: Gateway, coalition: Coalition) -> None:
    async with gateway(broker, "GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
    usa_key = coalition.nodes["USA-GW1"]
    gbr_key = coalition.nodes["GBR-GW1"].enc_public

    def envelope(i: int, prec: int) -> bytes:
        return build_envelope(signing_key=usa_key.signing_key, sender="USA-GW1",
                              topic="maritime.tracks", payload=b"%d" % i, label=TO_GBR,
                              prec=prec, ttl=3600, recipient_keys={"GBR-GW1": gbr_key},
                              now_ms=time.time_ns() // 1_000_000)

    async with gateway(broker, "USA-GW1") as usa:
        for start in range(0, 10_000, 500):
            receipts = await asyncio.gather(*(usa.publish_envelope(envelope(i, 0))
                                              for i in range(start, start + 500)))
            assert all(r.queued == ["GBR-GW1"] for r in receipts)
        flash = await usa.publish_envelope(envelope(10_000, 3))
    assert broker.hub.queues["GBR-GW1"].depth == 10_001
    async with gateway(broker, "GBR-GW1") as gbr:
        stream = gbr.messages()
        first = [await anext(stream) for _ in range(3)]
        await stream.aclose()
    assert first[0].id == flash.id and first[0].precedence == 3
    assert [m.payload for m in first[1:]] == [b"0", b"1"]  # then FIFO within ROUTINE


async def test_stalled_recipient_slows_neither_others_nor_the_publisher(
        broker: BrokerServer, gateway: Gateway) -> None:
    """GBR is connected and never acknowledges; FRA consumes. Numbers: every publish is
    receipted, FRA gets all of them, GBR holds exactly one window in flight and the rest stays
    queued for it (not in broker memory as unsent frames)."""
    count, window = 1_000, broker.limits.delivery_window
    async with gateway(broker, "GBR-GW1") as stalled, gateway(broker, "FRA-GW1") as fra, \
            gateway(broker, "USA-GW1") as usa:
        await stalled.subscribe("maritime.>")  # and never reads messages(): no ack, ever
        await fra.subscribe("maritime.>")
        received: list[bytes] = []

        async def consume() -> None:
            async for message in fra.messages():
                received.append(message.id)
                if len(received) == count:
                    return

        consumer = asyncio.create_task(consume())
        started = time.perf_counter()
        receipts = []
        for start in range(0, count, 100):
            receipts += await asyncio.gather(*(
                usa.publish("maritime.tracks", b"%d" % i, TO_GBR_FRA)
                for i in range(start, start + 100)))
        publish_s = time.perf_counter() - started
        async with asyncio.timeout(30):
            await consumer
        gbr_queue = broker.hub.queues["GBR-GW1"]
        assert len(receipts) == count
        assert received == [r.id for r in receipts]  # FRA: everything, in order
        assert gbr_queue.in_flight == window and gbr_queue.depth == count
        statuses = [r.recipients["GBR-GW1"] for r in receipts]
        assert statuses.count("delivered") == window  # the rest was "queued"
        print(f"\n{count} publishes with a stalled recipient: {publish_s:.2f} s "
              f"({count / publish_s:.0f}/s); FRA got {len(received)}, GBR holds {window} "
              f"in flight and {count - window} queued")


# --- envelopes of a backlog stay on disk ----------------------------------------------------


async def test_a_backlog_beyond_the_queue_memory_is_delivered_from_the_store(
        coalition: Coalition, clock: Clock, gateway: Gateway) -> None:
    """Only the first copies' envelopes are kept in memory (4 KiB here); the rest are read
    back from the store when they are sent, in precedence order, byte for byte (the gateway
    verifies each signature and decrypts each payload)."""
    limits = Limits(max_frame_bytes=64 * 1024, queue_memory_bytes_per_node=4096)
    async with _broker(coalition, clock, limits) as server:
        async with gateway(server, "GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
        async with gateway(server, "USA-GW1") as usa:
            sent = [await usa.publish("maritime.tracks", b"%03d" % i + b"x" * 500, TO_GBR,
                                      precedence=3 if i == 39 else 0) for i in range(40)]
        queue = server.hub.queues["GBR-GW1"]
        assert queue.depth == 40 and 0 < queue.hot_bytes <= 4096 < queue.bytes
        async with gateway(server, "GBR-GW1") as gbr:
            stream = gbr.messages()
            got = [await asyncio.wait_for(anext(stream), 10) for _ in sent]
            await stream.aclose()
            await _until(lambda: queue.depth == 0)
    assert [m.id for m in got] == [sent[39].id] + [r.id for r in sent[:39]]  # FLASH first
    assert [m.payload[:3] for m in got] == [b"039"] + [b"%03d" % i for i in range(39)]
    assert queue.bytes == 0 and queue.hot_bytes == 0


async def test_a_failed_read_of_queued_envelopes_is_tried_again_and_delivers_everything(
        coalition: Coalition, clock: Clock, gateway: Gateway,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that fails (a busy or failing disk) must not leave the copies it was for in
    flight unsent: they would fill the window, and nothing would be sent to that node again
    until it reconnected. They go back to pending, and the read is tried again shortly."""
    limits = Limits(max_frame_bytes=64 * 1024, delivery_window=4, queue_memory_bytes_per_node=0)
    async with _broker(coalition, clock, limits) as server:
        async with gateway(server, "GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
        async with gateway(server, "USA-GW1") as usa:
            sent = [await usa.publish("maritime.tracks", b"%d" % i, TO_GBR) for i in range(6)]
        store = server.audit.store
        read, failures = store.queued_envelopes, [StorageError("disk I/O error")]

        def failing_once(node: str, seqs: list[int]) -> dict[int, bytes]:
            if failures:
                raise failures.pop()
            return read(node, seqs)

        monkeypatch.setattr(store, "queued_envelopes", failing_once)
        with capture_logs() as logs:
            async with gateway(server, "GBR-GW1") as gbr:
                stream = gbr.messages()
                got = [await asyncio.wait_for(anext(stream), 10) for _ in sent]
                await stream.aclose()
    assert [m.id for m in got] == [r.id for r in sent]
    assert [e["event"] for e in logs].count("queued_envelopes_unreadable") == 1


async def test_a_queued_copy_missing_from_the_store_is_logged_and_stays_owed(
        coalition: Coalition, clock: Clock, gateway: Gateway) -> None:
    """Damage behind the broker's back: the copies that can be read are delivered; the one
    whose envelope is gone is logged, never silently dropped: it stays owed."""
    limits = Limits(max_frame_bytes=64 * 1024, queue_memory_bytes_per_node=0)
    async with _broker(coalition, clock, limits) as server:
        async with gateway(server, "GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
        async with gateway(server, "USA-GW1") as usa:
            sent = [await usa.publish("maritime.tracks", b"%d" % i, TO_GBR) for i in range(3)]
        conn = sqlite3.connect(server.audit.store.path)
        with conn:
            conn.execute("DELETE FROM messages WHERE id = ?", (sent[1].id,))
        conn.close()
        with capture_logs() as logs:
            async with gateway(server, "GBR-GW1") as gbr:
                stream = gbr.messages()
                got = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]
                await stream.aclose()
                queue = server.hub.queues["GBR-GW1"]
                await _until(lambda: queue.depth == 1)
                await asyncio.sleep(0.2)
                assert queue.depth == 1 and queue.in_flight == 1
    assert [m.id for m in got] == [sent[0].id, sent[2].id]
    (missing,) = [e for e in logs if e["event"] == "queued_envelopes_missing"]
    assert missing["node"] == "GBR-GW1" and missing["count"] == 1


async def test_broker_restart_redelivers_unacked_in_precedence_order(
        coalition: Coalition, clock: Clock, gateway: Gateway, tmp_path: Path) -> None:
    limits = Limits(max_frame_bytes=64 * 1024)
    async with _broker(coalition, clock, limits) as server:
        async with gateway(server, "GBR-GW1") as gbr:
            await gbr.subscribe("maritime.>")
        async with gateway(server, "USA-GW1") as usa:
            sent = [await usa.publish("maritime.tracks", b"%d" % prec, TO_GBR, precedence=prec)
                    for prec in (0, 1, 2, 3, 0)]
    async with _broker(coalition, clock, limits) as server, gateway(server, "GBR-GW1") as gbr:
        stream = gbr.messages()
        got = [await anext(stream) for _ in sent]
        await stream.aclose()
    assert [m.precedence for m in got] == [3, 2, 1, 0, 0]
    assert [m.id for m in got][-2:] == [sent[0].id, sent[4].id]


async def test_sequence_numbers_never_repeat_across_a_restart(
        coalition: Coalition, clock: Clock, gateway: Gateway) -> None:
    """With its queue empty at restart, a recipient must not get seq 1 again: a late ack of an
    old delivery would then acknowledge a different message."""
    limits = Limits(max_frame_bytes=64 * 1024)
    seqs = []
    for _ in range(2):
        async with _broker(coalition, clock, limits) as server, \
                gateway(server, "GBR-GW1") as gbr, gateway(server, "USA-GW1") as usa:
            await gbr.subscribe("maritime.>")
            await usa.publish("maritime.tracks", b"x", TO_GBR)
            seqs.append((await _first(gbr)).seq)
            await _until(lambda s=server: s.hub.queues["GBR-GW1"].depth == 0)
    assert seqs[1] > seqs[0]


async def test_an_envelope_accepted_before_a_restart_is_still_a_replay_after_it(
        coalition: Coalition, clock: Clock) -> None:
    """The replay guard is memory; the broker refills it from the audit log at start, or the
    same envelope could be routed (and logged) a second time after a restart."""
    usa = coalition.nodes["USA-GW1"]

    def envelope(payload: bytes) -> bytes:
        return build_envelope(signing_key=usa.signing_key, sender="USA-GW1",
                              topic="maritime.tracks", payload=payload, label=TO_GBR, prec=0,
                              ttl=60, recipient_keys={"GBR-GW1": coalition.nodes["GBR-GW1"]
                                                      .enc_public}, now_ms=clock())

    async def publish(server: BrokerServer, env: bytes) -> wire.Frame:
        async with RawNode(server.url) as raw:
            assert isinstance(await raw.login(usa), wire.Welcome)
            await raw.send(wire.Pub(env=env))
            return await raw.recv(skip_checkpoints=True)

    limits = Limits(max_frame_bytes=64 * 1024)
    first, later = envelope(b"before"), envelope(b"after")
    async with _broker(coalition, clock, limits) as server:
        assert isinstance(await publish(server, first), wire.Receipt)
    async with _broker(coalition, clock, limits) as server:
        replayed = await publish(server, first)
        assert isinstance(replayed, wire.Error) and replayed.code == "replay", replayed
        assert isinstance(await publish(server, later), wire.Receipt)  # fresh ones pass
        routes = [e for e in _entries(server) if isinstance(e, RouteEntry)]
    assert len(routes) == 2
