"""The gateway client's side of reliable store-and-forward: it reconnects by itself after a
broker restart, never hands the application a finished message twice (also across its own
restarts), stops for good when replaced or refused, and reports expired messages."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
from aiohttp import WSMsgType, web
from structlog.testing import capture_logs

from broker import wire
from broker.audit.leaves import DeliverEntry, entry_from_bytes
from broker.coalition import Coalition
from broker.server import BrokerServer, Limits
from clients.dedup import SeenIds
from clients.gateway import (
    AuthenticationError,
    ConnectionClosed,
    Expired,
    GatewayClient,
    Message,
    RequestRejected,
    RequestTimeout,
    label,
)
from clients.link import Backoff, Link
from tests.integration.conftest import FAST_COMMIT
from tests.integration.process import free_port

TO_GBR = label("NATO", "SECRET", "USA", ["GBR"])
#: Reconnect at once in tests: the backoff itself is unit-tested.
FAST = Backoff(initial=0.01, maximum=0.05)
F = TypeVar("F", bound=wire.Frame)


def broker_at(coalition: Coalition, port: int) -> BrokerServer:
    """A broker on a fixed port and data directory, so that it can be restarted as the same."""
    return BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                        key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                        port=port, limits=Limits(max_frame_bytes=64 * 1024),
                        commit=FAST_COMMIT)


def client(url: str, coalition: Coalition, node: str, state: Path | None = None,
           cls: type[GatewayClient] = GatewayClient, **kwargs: Any) -> GatewayClient:
    options: dict[str, Any] = {"timeout": 5, "reconnect": FAST, **kwargs}
    return cls(url, coalition.nodes[node], coalition.trust_root,
               broker_name=coalition.broker_name, max_frame=64 * 1024, state_dir=state,
               **options)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def acked(server: BrokerServer, message_id: bytes, node: str) -> bool:
    """The broker logged ``node``'s ack of ``message_id``."""
    entries = (entry_from_bytes(e) for e in server.audit.store.entries(0, server.audit.size))
    return any(isinstance(e, DeliverEntry) and e.id == message_id and e.to == node
               for e in entries)


@pytest.fixture
async def restartable(coalition: Coalition) -> AsyncIterator[list[BrokerServer]]:
    """A running broker on a fixed port; the test may replace it (the last one is stopped)."""
    servers = [broker_at(coalition, free_port())]
    await servers[0].start()
    try:
        yield servers
    finally:
        await servers[-1].stop()


async def restart(servers: list[BrokerServer], coalition: Coalition) -> BrokerServer:
    await servers[-1].stop()
    servers.append(broker_at(coalition, servers[-1].port))
    await servers[-1].start()
    return servers[-1]


# --- against the real broker ------------------------------------------------------------


async def test_client_reconnects_after_a_broker_restart_and_its_messages_continue(
        restartable: list[BrokerServer], coalition: Coalition) -> None:
    url = restartable[0].url
    with capture_logs() as logs:
        async with client(url, coalition, "GBR-GW1") as gbr, \
                client(url, coalition, "USA-GW1") as usa:
            await gbr.subscribe("maritime.>")
            stream = gbr.messages()
            await usa.publish("maritime.tracks", b"before", TO_GBR)
            assert (await asyncio.wait_for(anext(stream), 5)).payload == b"before"
            await restart(restartable, coalition)
            await until(lambda: gbr.reconnections == 1 and usa.reconnections == 1)
            receipt = await usa.publish("maritime.tracks", b"after", TO_GBR)
            assert receipt.recipients == {"GBR-GW1": "delivered"}  # online and subscribed
            assert (await asyncio.wait_for(anext(stream), 5)).payload == b"after"
            await stream.aclose()
    reconnected = [e for e in logs if e["event"] == "gateway_reconnected"]
    assert {e["node"] for e in reconnected} == {"GBR-GW1", "USA-GW1"}
    assert all(e["attempt"] >= 1 for e in reconnected)


async def test_requests_while_disconnected_wait_for_the_reconnection_or_time_out(
        restartable: list[BrokerServer], coalition: Coalition) -> None:
    async with client(restartable[0].url, coalition, "GBR-GW1", timeout=1) as gbr:
        await restartable[0].stop()
        await until(lambda: not gbr.connected)
        with pytest.raises(RequestTimeout):
            await gbr.directory()
        # Without waiting, this would fail at once: there is no broker to send it to.
        pending = asyncio.create_task(gbr.subscribe("maritime.>"))
        restartable.append(broker_at(coalition, restartable[0].port))
        await restartable[-1].start()
        await asyncio.wait_for(pending, 5)
        assert gbr.connected and gbr.failure is None


class AcksLost(GatewayClient):
    """A gateway whose acks never reach the broker: as if it crashed just after making a
    finished message's id durable, before the ack left."""

    async def ack(self, seqs: list[int]) -> None:
        return None


async def test_unfinished_message_is_redelivered_after_a_crash_and_a_finished_one_is_not(
        server: BrokerServer, coalition: Coalition, tmp_path: Path) -> None:
    state = tmp_path / "gbr-state"
    async with client(server.url, coalition, "USA-GW1") as usa:
        first = client(server.url, coalition, "GBR-GW1", state)
        await first.connect()
        await first.subscribe("maritime.>")
        crashed = first.messages()
        one = await usa.publish("maritime.tracks", b"one", TO_GBR)
        assert (await asyncio.wait_for(anext(crashed), 5)).id == one.id
        await first.close()  # crashes while processing "one": not finished, not acked

        async with client(server.url, coalition, "GBR-GW1", state, cls=AcksLost) as second:
            lost_acks = second.messages()
            # Not finished before the crash: handed out again.
            assert (await asyncio.wait_for(anext(lost_acks), 5)).id == one.id
            two = await usa.publish("maritime.tracks", b"two", TO_GBR)
            # Asking for the next one finishes "one": durable now, but its ack is lost.
            assert (await asyncio.wait_for(anext(lost_acks), 5)).id == two.id
        assert not acked(server, one.id, "GBR-GW1")  # so the broker will deliver it again

        async with client(server.url, coalition, "GBR-GW1", state) as third:
            stream = third.messages()
            # "one" comes first again (FIFO) but is only acknowledged; "two" was unfinished.
            assert (await asyncio.wait_for(anext(stream), 5)).id == two.id
            await until(lambda: acked(server, one.id, "GBR-GW1"))
            await stream.aclose()
        # The abandoned iterators are closed only now, after every check.
        await crashed.aclose()
        await lost_acks.aclose()


class AcksRecorded(GatewayClient):
    """A gateway that records every ack it sends, and which ids were on disk at that moment."""

    sent: list[list[int]]
    on_disk: list[set[bytes]]
    state: Path

    async def ack(self, seqs: list[int]) -> None:
        self.sent.append(list(seqs))
        self.on_disk.append(_ids_on_disk(self.state))
        await super().ack(seqs)

    def check_acked_after_durable(self, messages: list[Message]) -> None:
        """Every acked message's id was durable when its ack left."""
        ids = {m.seq: m.id for m in messages}
        for seqs, on_disk in zip(self.sent, self.on_disk, strict=True):
            assert {ids[seq] for seq in seqs if seq in ids} <= on_disk


def _ids_on_disk(state: Path) -> set[bytes]:
    """The ids in ``seen.bin``, read as raw records (without a second writer's SeenIds)."""
    data = (state / "seen.bin").read_bytes()
    return {data[i:i + 16] for i in range(0, len(data) - len(data) % 16, 16)}


async def _queued_for_gbr(server: BrokerServer, coalition: Coalition, state: Path,
                          count: int) -> list[bytes]:
    """``count`` messages queued for GBR-GW1 while it is offline; their ids."""
    async with client(server.url, coalition, "GBR-GW1", state) as gbr:
        await gbr.subscribe("maritime.>")
    async with client(server.url, coalition, "USA-GW1") as usa:
        return [(await usa.publish("maritime.tracks", b"%d" % i, TO_GBR)).id
                for i in range(count)]


async def _recording(server: BrokerServer, coalition: Coalition, state: Path, waiting: int,
                     **kwargs: Any) -> AcksRecorded:
    """GBR-GW1 connected, its acks recorded, once ``waiting`` deliveries wait in its queue."""
    gbr = client(server.url, coalition, "GBR-GW1", state, cls=AcksRecorded, **kwargs)
    assert isinstance(gbr, AcksRecorded)
    gbr.sent, gbr.on_disk, gbr.state = [], [], state
    await gbr.connect()
    await until(lambda: gbr._deliveries.qsize() >= waiting)
    return gbr


async def _ask_until_acked(stream: AsyncIterator[Message], gbr: AcksRecorded,
                           frames: int) -> None:
    """Ask for one more message when none waits, until ``frames`` acks have left; then stop
    asking."""
    waiting = asyncio.ensure_future(anext(stream))
    await until(lambda: len(gbr.sent) >= frames)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_each_finished_id_is_durable_before_the_next_message_and_acks_go_together(
        server: BrokerServer, coalition: Coalition, tmp_path: Path) -> None:
    state = tmp_path / "gbr-state"
    ids = await _queued_for_gbr(server, coalition, state, 5)
    gbr = await _recording(server, coalition, state, 5)
    try:
        stream = gbr.messages()
        got = []
        for count in range(5):
            got.append(await asyncio.wait_for(anext(stream), 5))
            # Every message finished so far is on disk (a new process reads it back)...
            assert set(SeenIds(state)) & set(ids) == set(ids[:count])
        # ... but the acks went together: the first four before the last waiting message
        # was handed over, the fifth when the consumer asked for more with none waiting.
        assert gbr.sent == [[m.seq for m in got[:4]]]
        await _ask_until_acked(stream, gbr, 2)
        assert gbr.sent == [[m.seq for m in got[:4]], [got[4].seq]]
        gbr.check_acked_after_durable(got)
        await until(lambda: all(acked(server, i, "GBR-GW1") for i in ids))
        await stream.aclose()
    finally:
        await gbr.close()


async def test_a_finish_batch_shares_one_write_and_a_crash_shows_it_again(
        server: BrokerServer, coalition: Coalition, tmp_path: Path) -> None:
    state = tmp_path / "gbr-state"
    ids = await _queued_for_gbr(server, coalition, state, 6)
    crashed = await _recording(server, coalition, state, 6, finish_batch=16)
    abandoned = crashed.messages()
    assert [(await anext(abandoned)).id for _ in range(3)] == ids[:3]
    await crashed.close()  # a crash: two finished, neither written yet
    assert crashed.sent == [] and not set(SeenIds(state)) & set(ids)
    await abandoned.aclose()  # after close(): nothing written (another client may own it)
    assert not set(SeenIds(state)) & set(ids)

    gbr = await _recording(server, coalition, state, 6, finish_batch=16)
    try:
        stream = gbr.messages()
        # Shown again from the first (at least once): the batch had not been written.
        got = [await anext(stream) for _ in range(4)]
        assert [m.id for m in got] == ids[:4] and not _ids_on_disk(state) & set(ids)
        await stream.aclose()  # leaving the loop finishes the four: one write, one ack
        assert _ids_on_disk(state) & set(ids) == set(ids[:4]) and len(gbr.sent) == 1
        assert len(gbr.sent[0]) == 4
        gbr.check_acked_after_durable(got)
    finally:
        await gbr.close()
    async with client(server.url, coalition, "GBR-GW1", state) as again:
        rest = again.messages()
        assert [(await asyncio.wait_for(anext(rest), 5)).id for _ in range(2)] == ids[4:]
        await rest.aclose()


async def test_a_copy_of_a_finished_id_not_yet_written_is_acked_only_after_the_write(
        server: BrokerServer, coalition: Coalition, tmp_path: Path) -> None:
    """After a reconnect the broker sends again what was not acked, finished ids included:
    their acks must still wait for the batch's write."""
    state = tmp_path / "gbr-state"
    ids = await _queued_for_gbr(server, coalition, state, 6)
    gbr = await _recording(server, coalition, state, 6, finish_batch=16)
    try:
        stream = gbr.messages()
        got = [await anext(stream) for _ in range(3)]  # two finished, not written
        await gbr._connection.recycle("test: a new link")
        # The old link's three left in the queue, and all six again on the new one.
        await until(lambda: gbr.reconnections == 1 and gbr._deliveries.qsize() >= 9)
        got.append(await asyncio.wait_for(anext(stream), 5))
        assert [m.id for m in got] == ids[:4]  # the copies of the first three: not shown
        assert gbr.sent == [] and not _ids_on_disk(state) & set(ids)
        got += [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
        await _ask_until_acked(stream, gbr, 1)  # none waits: the six written, then acked
        assert sorted(seq for frame in gbr.sent for seq in frame) == sorted(m.seq for m in got)
        gbr.check_acked_after_durable(got)
        await until(lambda: all(acked(server, i, "GBR-GW1") for i in ids))
        await stream.aclose()
    finally:
        await gbr.close()


async def test_connection_replaced_by_a_newer_one_of_the_same_node_is_not_reconnected(
        server: BrokerServer, coalition: Coalition) -> None:
    async with client(server.url, coalition, "GBR-GW1") as old:
        stream = old.messages()
        async with client(server.url, coalition, "GBR-GW1") as new:
            with pytest.raises(ConnectionClosed) as caught:
                await asyncio.wait_for(anext(stream), 5)
            assert caught.value.code == "replaced"
            assert old.failure is not None and old.failure.code == "replaced"
            with pytest.raises(ConnectionClosed):
                await old.directory()  # at once: nothing to wait for
            await new.subscribe("maritime.>")  # the newer connection is left alone
            assert new.connected and new.reconnections == 0 and old.reconnections == 0


async def test_refused_authentication_on_reconnect_ends_the_client_with_the_reason(
        restartable: list[BrokerServer], coalition: Coalition) -> None:
    async with client(restartable[0].url, coalition, "GBR-GW1") as gbr:
        stream = gbr.messages()
        await restartable[0].stop()
        restartable.append(broker_at(coalition, restartable[0].port))
        await restartable[-1].start()
        restartable[-1].hub.inactive.add("GBR-GW1")  # suspended while it was away
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(anext(stream), 10)
        assert caught.value.code == "node_inactive"
        assert isinstance(gbr.failure, AuthenticationError)
        assert not gbr.connected and gbr.reconnections == 0


# --- against a scripted broker -----------------------------------------------------------


class FakeConnection:
    """One node connection to :class:`FakeBroker`: what the node sent, in order."""

    def __init__(self, ws: web.WebSocketResponse, node: str) -> None:
        self.ws = ws
        self.node = node
        self.received: asyncio.Queue[wire.Frame] = asyncio.Queue()

    async def send(self, frame: wire.Frame) -> None:
        await self.ws.send_bytes(wire.encode_frame(frame))

    async def close(self, reason: bytes) -> None:
        await self.ws.close(message=reason)

    async def until(self, kind: type[F]) -> tuple[list[wire.Frame], F]:
        """The frames received before the next ``kind`` frame, and that frame."""
        before: list[wire.Frame] = []
        while True:
            frame = await asyncio.wait_for(self.received.get(), 5)
            if isinstance(frame, kind):
                return before, frame
            before.append(frame)


class FakeBroker:
    """A scripted broker on loopback: welcomes any hello (or refuses it with ``refuse``),
    answers pings, records the rest, and closes only when the test says so."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refuse: str | None = None
        self.autoping = True
        #: Answer a node's ``ping`` frames with ``pong`` (off: the test answers).
        self.answer_pings = True
        self.connections: asyncio.Queue[FakeConnection] = asyncio.Queue()
        self._open: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeBroker:
        app = web.Application()
        app.router.add_get("/v1/node", self._handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}/v1/node"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for ws in list(self._open):
            await ws.close()
        assert self._runner is not None
        await self._runner.cleanup()

    async def next_connection(self) -> FakeConnection:
        return await asyncio.wait_for(self.connections.get(), 5)

    async def _handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=self.autoping)
        await ws.prepare(request)
        self._open.add(ws)
        try:
            await ws.send_bytes(wire.encode_frame(wire.Challenge(
                v=wire.PROTOCOL_VERSION, broker=self.name, nonce=os.urandom(32))))
            msg = await ws.receive()
            if msg.type is not WSMsgType.BINARY:
                return ws
            hello = wire.decode_frame(msg.data)
            assert isinstance(hello, wire.Hello)
            if self.refuse is not None:
                await ws.send_bytes(wire.encode_frame(wire.Error(code=self.refuse,
                                                                 reason="refused")))
                await ws.close(message=self.refuse.encode())
                return ws
            await ws.send_bytes(wire.encode_frame(wire.Welcome(node=hello.node)))
            connection = FakeConnection(ws, hello.node)
            self.connections.put_nowait(connection)
            async for msg in ws:
                if msg.type is WSMsgType.BINARY:
                    frame = wire.decode_frame(msg.data)
                    if isinstance(frame, wire.Ping) and self.answer_pings:
                        await connection.send(wire.Pong())
                    connection.received.put_nowait(frame)
        finally:
            self._open.discard(ws)
        return ws


@pytest.fixture
async def fake(coalition: Coalition) -> AsyncIterator[FakeBroker]:
    async with FakeBroker(coalition.broker_name) as running:
        yield running


@pytest.mark.parametrize("given_up", ["cancelled", "timed out"])
async def test_a_late_answer_to_a_request_given_up_is_not_taken_by_the_next_one(
        fake: FakeBroker, coalition: Coalition, given_up: str) -> None:
    """Control answers carry no id: they answer requests in order. A request given up after it
    was sent (a consumer's timeout around ``directory()``, or the client's own) still gets its
    answer from the broker, later; the next control request must not take it for its own."""
    async with client(fake.url, coalition, "GBR-GW1",
                      timeout=0.3 if given_up == "timed out" else 5) as gbr:
        node = await fake.next_connection()
        connection = gbr._connection
        first = asyncio.ensure_future(connection.control(wire.Directory()))
        assert isinstance(await asyncio.wait_for(node.received.get(), 5), wire.Directory)
        if given_up == "cancelled":
            first.cancel()
        with pytest.raises(asyncio.CancelledError if given_up == "cancelled"
                           else RequestTimeout):
            await first
        second = asyncio.ensure_future(connection.control(wire.Directory()))
        assert isinstance(await asyncio.wait_for(node.received.get(), 5), wire.Directory)
        await node.send(wire.Directory(certs=[]))  # the first one's answer, late
        await node.send(wire.Error(code="internal", reason="the second one's answer"))
        with pytest.raises(RequestRejected, match="the second one's answer"):
            await second
        # The late answer was dropped: nothing more is owed.
        assert connection.link is not None and connection.link.answers.owed == 0


async def test_a_subscribe_given_up_drops_its_pong_and_a_late_publish_error_is_no_answer(
        fake: FakeBroker, coalition: Coalition) -> None:
    """``subscribe`` sends ``sub`` and ``ping`` (all or nothing) and waits for the pong: given
    up, its pong is dropped when it comes. An ``error`` naming a publish given up (``ref``) is
    never taken for a control answer."""
    fake.answer_pings = False
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        node = await fake.next_connection()
        asking = asyncio.ensure_future(gbr.subscribe("maritime.>"))
        assert isinstance(await asyncio.wait_for(node.received.get(), 5), wire.Sub)
        assert isinstance(await asyncio.wait_for(node.received.get(), 5), wire.Ping)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        connection = gbr._connection
        second = asyncio.ensure_future(connection.control(wire.Directory()))
        assert isinstance(await asyncio.wait_for(node.received.get(), 5), wire.Directory)
        await node.send(wire.Pong())  # the subscribe's, late
        await node.send(wire.Error(code="unavailable", reason="late", ref=b"\x01" * 16))
        await node.send(wire.Error(code="internal", reason="the directory's answer"))
        with pytest.raises(RequestRejected, match="the directory's answer"):
            await second
        assert gbr.reconnections == 0


@pytest.mark.parametrize("pong", ["with the error", "later"])
async def test_a_refused_subscribe_fails_at_once_and_its_pong_is_nobodys_answer(
        fake: FakeBroker, coalition: Coalition, pong: str) -> None:
    """The broker refuses a ``sub`` with an ``error`` and still answers its ``ping``: the
    refusal is raised at once (it waited out the whole timeout when the pong came with the
    error), and the pong, whenever it comes, is not the next control request's answer."""
    fake.answer_pings = False
    async with client(fake.url, coalition, "GBR-GW1", timeout=60) as gbr:
        node = await fake.next_connection()
        asking = asyncio.ensure_future(gbr.subscribe("maritime.>"))
        await node.until(wire.Ping)
        await node.send(wire.Error(code="bad_frame", reason="refused"))
        if pong == "with the error":
            await node.send(wire.Pong())
        with pytest.raises(RequestRejected, match="refused"):
            await asyncio.wait_for(asking, 10)  # not after the client's 60 s timeout
        second = asyncio.ensure_future(gbr._connection.control(wire.Directory()))
        await node.until(wire.Directory)
        if pong == "later":
            await node.send(wire.Pong())
        await node.send(wire.Error(code="internal", reason="the directory's answer"))
        with pytest.raises(RequestRejected, match="the directory's answer"):
            await second


async def test_answers_owed_to_two_requests_given_up_start_a_new_link(
        fake: FakeBroker, coalition: Coalition) -> None:
    """Two control requests given up in a row (the broker does not answer in time): the count
    of answers still owed cannot be trusted, so the client takes a new link, where answers are
    in step again (rather than dropping, forever, answers that are not the late ones)."""
    async with client(fake.url, coalition, "GBR-GW1", timeout=0.3) as gbr:
        first = await fake.next_connection()
        for _ in range(2):
            with pytest.raises(RequestTimeout):
                await gbr._connection.control(wire.Directory())
        second = await fake.next_connection()
        await until(lambda: gbr.reconnections == 1)
        asking = asyncio.ensure_future(gbr._connection.control(wire.Directory()))
        while not isinstance(await asyncio.wait_for(second.received.get(), 5), wire.Directory):
            pass  # the subscriptions re-sent first, if any
        await second.send(wire.Error(code="internal", reason="on the new link"))
        with pytest.raises(RequestRejected, match="on the new link"):
            await asking
        assert first is not second


async def test_subscriptions_are_sent_again_after_a_reconnect_and_unsubscribed_ones_not(
        fake: FakeBroker, coalition: Coalition) -> None:
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        first = await fake.next_connection()
        await gbr.subscribe("maritime.>")
        await gbr.subscribe("intel.*")
        await gbr.subscribe("logistics.>")
        await gbr.unsubscribe("intel.*")
        await first.close(b"unavailable")  # the broker goes away: not a final reason
        second = await fake.next_connection()
        await gbr.subscribe("reports.>")
        resent, _ = await second.until(wire.Ping)
        # The old subscriptions first, before any new request, and a ping whose pong ends
        # their answers (nobody waits for them); then the new request's.
        assert resent == [wire.Sub(topic="logistics.>"), wire.Sub(topic="maritime.>")]
        assert await second.until(wire.Ping) == ([wire.Sub(topic="reports.>")], wire.Ping())


async def test_request_in_flight_when_the_connection_drops_fails_and_the_client_reconnects(
        fake: FakeBroker, coalition: Coalition) -> None:
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        first = await fake.next_connection()
        request = asyncio.create_task(gbr.directory())
        await first.until(wire.Directory)  # sent; the fake never answers
        await first.close(b"internal")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(request, 5)
        await fake.next_connection()
        assert gbr.failure is None


async def test_retryable_refusal_is_retried_and_a_wrong_broker_ends_the_client(
        fake: FakeBroker, coalition: Coalition) -> None:
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        stream = gbr.messages()
        first = await fake.next_connection()
        fake.refuse = "unavailable"
        with capture_logs() as logs:
            await first.close(b"unavailable")
            await until(lambda: sum(e["event"] == "gateway_reconnect_failed" for e in logs) >= 2)
        fake.refuse = None
        second = await fake.next_connection()  # it kept trying
        fake.name = "impostor.example"
        await second.close(b"unavailable")
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(anext(stream), 5)
        assert caught.value.code == "wrong_broker"
        assert fake.connections.empty()


async def test_without_reconnect_the_first_drop_ends_the_client(
        fake: FakeBroker, coalition: Coalition) -> None:
    async with client(fake.url, coalition, "GBR-GW1", reconnect=None) as gbr:
        stream = gbr.messages()
        await (await fake.next_connection()).close(b"unavailable")
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(anext(stream), 5)
        assert caught.value.code == "closed" and gbr.failure is not None


async def test_silent_dead_link_is_noticed_by_the_heartbeat(
        fake: FakeBroker, coalition: Coalition) -> None:
    fake.autoping = False  # the first connection never answers WebSocket pings
    async with client(fake.url, coalition, "GBR-GW1", heartbeat=0.1) as gbr:
        await fake.next_connection()
        fake.autoping = True
        await fake.next_connection()  # the client gave up on the silent one by itself
        await until(lambda: gbr.reconnections == 1)


async def test_expired_notices_are_kept_logged_and_handed_to_the_callback(
        fake: FakeBroker, coalition: Coalition) -> None:
    told: asyncio.Queue[Expired] = asyncio.Queue()
    async with client(fake.url, coalition, "USA-GW1", on_expired=told.put_nowait) as usa:
        connection = await fake.next_connection()
        with capture_logs() as logs:
            await connection.send(wire.Expired(id=b"\x01" * 16, recipient="GBR-GW1"))
            notice = await asyncio.wait_for(told.get(), 5)
    assert notice == Expired(id=b"\x01" * 16, recipient="GBR-GW1")
    assert list(usa.expired) == [notice]
    assert [(e["id"], e["recipient"]) for e in logs if e["event"] == "message_expired"] == [
        ("01" * 16, "GBR-GW1")]


async def test_delivery_that_cannot_be_checked_is_sent_again_on_a_new_link(
        coalition: Coalition) -> None:
    """The sender's certificate cannot be fetched once (a slow directory answer): the delivery
    is not acked and not lost — the client takes a new link and the broker sends it again."""
    async with broker_at(coalition, free_port()) as server, \
            client(server.url, coalition, "USA-GW1") as usa, \
            client(server.url, coalition, "GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        real, calls = gbr.directory, []

        async def flaky() -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise RequestTimeout("no answer within 5 s")
            return await real()

        gbr.directory = flaky  # type: ignore[method-assign]
        first = await usa.publish("maritime.tracks", b"M1", TO_GBR)
        second = await usa.publish("maritime.tracks", b"M2", TO_GBR)
        stream = gbr.messages()
        got = [(await asyncio.wait_for(anext(stream), 5)).id for _ in range(2)]
        await stream.aclose()
        assert sorted(got) == sorted([first.id, second.id])
        assert gbr.reconnections == 1
        await until(lambda: server.hub.queues["GBR-GW1"].depth == 0)


async def test_a_consumer_cancelled_while_a_delivery_is_checked_gets_it_from_the_next_stream(
        coalition: Coalition) -> None:
    """``asyncio.wait_for(anext(stream), t)`` may cancel the stream while it checks a delivery
    (here: fetching the sender's certificate). The delivery was taken from the queue but not
    handed over; the next ``messages()`` hands it over, on the same link (dropped, it would
    stay in flight at the broker, unacked, until the link ended)."""
    async with broker_at(coalition, free_port()) as server, \
            client(server.url, coalition, "USA-GW1") as usa, \
            client(server.url, coalition, "GBR-GW1") as gbr:
        await gbr.subscribe("maritime.>")
        real, fetching, answer = gbr.directory, asyncio.Event(), asyncio.Event()

        async def slow() -> Any:
            fetching.set()
            await answer.wait()
            return await real()

        gbr.directory = slow  # type: ignore[method-assign]
        sent = await usa.publish("maritime.tracks", b"M1", TO_GBR)
        stream = gbr.messages()
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.wait_for(fetching.wait(), 5)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        answer.set()
        async with contextlib.aclosing(gbr.messages()) as again:
            got = await asyncio.wait_for(anext(again), 5)
        assert (got.id, got.payload) == (sent.id, b"M1")
        assert gbr.reconnections == 0  # the same link: nothing was sent again
        await until(lambda: acked(server, sent.id, "GBR-GW1"))


async def test_a_failing_handler_on_reconnect_ends_the_client_instead_of_hanging(
        coalition: Coalition) -> None:
    port = free_port()
    server = broker_at(coalition, port)
    await server.start()
    gbr = client(server.url, coalition, "GBR-GW1", timeout=1)
    await gbr.connect()
    try:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")  # say, the witness state

        gbr.log_witness.check = broken  # type: ignore[method-assign]
        await server.stop()
        server = broker_at(coalition, port)
        await server.start()
        await until(lambda: gbr.failure is not None, timeout=5)
        assert "No space left" in gbr.failure.reason
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(anext(gbr.messages()), 3)
    finally:
        await gbr.close()
        await server.stop()


async def _answered_in_step(gbr: GatewayClient, node: FakeConnection) -> None:
    """A ``directory`` request on ``node``'s link gets the answer sent for it."""
    asking = asyncio.ensure_future(gbr._connection.control(wire.Directory(),
                                                           expect=wire.Directory))
    await node.until(wire.Directory)
    await node.send(wire.Directory(certs=()))
    assert await asyncio.wait_for(asking, 5) == wire.Directory(certs=())


# --- control answers in step (a review of the control channel, session 18) ---------------


async def test_without_reconnect_answers_out_of_step_end_the_connection(
        fake: FakeBroker, coalition: Coalition) -> None:
    """Two control requests given up in a row and no reconnection to start clean: the
    connection ends (``out_of_step``) rather than hand the first one's late answer to the
    next request."""
    async with client(fake.url, coalition, "GBR-GW1", timeout=0.3, reconnect=None) as gbr:
        node = await fake.next_connection()
        connection = gbr._connection
        for _ in range(2):
            with pytest.raises(RequestTimeout):
                await connection.control(wire.Directory())
        assert gbr.failure is not None and gbr.failure.code == "out_of_step"
        await node.send(wire.Error(code="internal", reason="the first one's answer, late"))
        with pytest.raises(ConnectionClosed) as caught:
            await connection.control(wire.Directory())
        assert caught.value.code == "out_of_step"


async def test_a_request_waits_for_the_frames_of_one_given_up_while_they_were_sent(
        fake: FakeBroker, coalition: Coalition, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscribe given up while its frames were still going out (the transport paused: its
    ping written after the timeout): the next control request's frames go out after them, so
    the broker answers in the order the client counts."""
    real_send = Link.send
    stalled: list[wire.Frame] = []

    async def send(self: Link, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Ping) and not stalled:
            stalled.append(frame)
            await asyncio.sleep(0.6)  # past the request's timeout
        await real_send(self, frame)

    async with client(fake.url, coalition, "GBR-GW1", timeout=0.4) as gbr:
        node = await fake.next_connection()
        monkeypatch.setattr(Link, "send", send)
        with pytest.raises(RequestTimeout):
            await gbr.subscribe("maritime.>")
        asking = asyncio.ensure_future(gbr._connection.control(wire.Directory(),
                                                               expect=wire.Directory))
        before, _ = await node.until(wire.Directory)
        assert before == [wire.Sub(topic="maritime.>"), wire.Ping()]  # not overtaken
        await node.send(wire.Directory(certs=()))  # after the subscribe's pong (the fake's)
        assert await asyncio.wait_for(asking, 5) == wire.Directory(certs=())
        assert gbr.reconnections == 0


async def test_a_refused_cosignature_is_the_cosigns_answer_not_the_next_requests(
        fake: FakeBroker, coalition: Coalition) -> None:
    """A cosignature is confirmed (``cosign`` + ``ping``), not sent blind: the broker's
    refusal (an ``error`` without ``ref``) answers it, and the next control request still
    gets its own answer."""
    fake.answer_pings = False
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        node = await fake.next_connection()
        with capture_logs() as logs:
            gbr._send_cosignature("— broker.example abcd")
            await node.until(wire.Ping)
            await node.send(wire.Error(code="bad_signature", reason="cosignature refused"))
            await node.send(wire.Pong())
            asking = asyncio.ensure_future(gbr._connection.control(wire.Directory(),
                                                                   expect=wire.Directory))
            await node.until(wire.Directory)
            await node.send(wire.Directory(certs=()))
            assert await asyncio.wait_for(asking, 5) == wire.Directory(certs=())
        refused = [e for e in logs if e["event"] == "background_request_failed"]
        assert [(e["frame"], e["code"]) for e in refused] == [("cosign", "bad_signature")]


async def test_refusals_of_subscriptions_sent_again_are_nobodys_answer(
        fake: FakeBroker, coalition: Coalition) -> None:
    """After a reconnect the subscriptions go out again with nobody waiting: the broker's
    refusal of one is dropped (and logged) through the pong that follows them, not taken by
    the first request on the new link."""
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        first = await fake.next_connection()
        await gbr.subscribe("maritime.>")
        fake.answer_pings = False
        await first.close(b"unavailable")
        second = await fake.next_connection()
        with capture_logs() as logs:
            await second.until(wire.Ping)
            asking = asyncio.ensure_future(gbr._connection.control(wire.Directory(),
                                                                   expect=wire.Directory))
            await second.send(wire.Error(code="rate_limited", reason="too many subscriptions"))
            await second.send(wire.Pong())
            await second.until(wire.Directory)
            await second.send(wire.Directory(certs=()))
            assert await asyncio.wait_for(asking, 5) == wire.Directory(certs=())
        assert [(e["event"], e.get("code")) for e in logs
                if e["event"].startswith("late_")] == [("late_error_dropped", "rate_limited"),
                                                       ("late_answer_dropped", None)]


async def test_an_answer_of_the_wrong_kind_starts_a_new_link(
        fake: FakeBroker, coalition: Coalition) -> None:
    """An answer that is not what the request asks for (a ``directory`` for a ``route``)
    means the order was lost: refused as ``bad_frame``, and the client takes a new link where
    answers are in step again."""
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        first = await fake.next_connection()
        asking = asyncio.ensure_future(gbr.route("maritime.tracks", TO_GBR))
        await first.until(wire.Route)
        await first.send(wire.Directory(certs=()))
        with pytest.raises(RequestRejected) as caught:
            await asyncio.wait_for(asking, 5)
        assert caught.value.code == "bad_frame"
        assert await fake.next_connection() is not first
        await until(lambda: gbr.reconnections == 1)


async def test_a_request_right_after_a_new_link_was_asked_for_waits_for_it(
        fake: FakeBroker, coalition: Coalition) -> None:
    """The second request given up starts a new link; a request made at that moment waits
    for the new link instead of going out on the old one and failing as it closes."""
    async with client(fake.url, coalition, "GBR-GW1", timeout=1.0) as gbr:
        first = await fake.next_connection()
        connection = gbr._connection
        with pytest.raises(RequestTimeout):
            await connection.control(wire.Directory())
        given_up = asyncio.ensure_future(connection.control(wire.Directory()))
        await first.until(wire.Directory)
        await first.until(wire.Directory)
        with pytest.raises(RequestTimeout):
            await given_up
        assert connection.link is None  # retired at once: nothing more goes out on it
        following = asyncio.ensure_future(connection.confirmed(wire.Sub(topic="maritime.>")))
        second = await fake.next_connection()
        await second.until(wire.Sub)
        await asyncio.wait_for(following, 5)  # answered on the new link (the fake's pong)


# --- control answers in step: a second review (session 18) -------------------------------


async def test_a_pong_owed_on_a_link_that_ended_is_not_dropped_on_the_next(
        fake: FakeBroker, coalition: Coalition) -> None:
    """The broker refuses a ``sub`` and closes the link before its pong (as it does after an
    internal failure): the pong owed on that link never comes, and the first answer on the
    new link is its request's, not dropped as late."""
    fake.answer_pings = False
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        first = await fake.next_connection()
        asking = asyncio.ensure_future(gbr.subscribe("maritime.>"))
        await first.until(wire.Ping)
        await first.send(wire.Error(code="internal", reason="failed"))
        await first.close(b"internal")
        with pytest.raises((RequestRejected, ConnectionClosed)):
            await asyncio.wait_for(asking, 5)
        second = await fake.next_connection()
        await until(lambda: gbr.reconnections == 1)
        await _answered_in_step(gbr, second)


async def test_a_send_stuck_on_a_link_that_ended_does_not_hold_up_the_next_link(
        fake: FakeBroker, coalition: Coalition, monkeypatch: pytest.MonkeyPatch) -> None:
    """A control request's frames stuck on the old link (a transport that never drains)
    do not delay the control requests of the new link: each waits only for its own link's."""
    real_send = Link.send
    stuck = asyncio.Event()

    async def send(self: Link, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Directory) and not stuck.is_set():
            stuck.set()
            await asyncio.Event().wait()  # never drains
        await real_send(self, frame)

    async with client(fake.url, coalition, "GBR-GW1", timeout=0.5) as gbr:
        first = await fake.next_connection()
        monkeypatch.setattr(Link, "send", send)
        with pytest.raises(RequestTimeout):
            await gbr._connection.control(wire.Directory())
        await first.close(b"unavailable")
        second = await fake.next_connection()
        await until(lambda: gbr.reconnections == 1)
        await _answered_in_step(gbr, second)


async def test_confirmations_in_the_background_keep_only_the_latest_and_none_offline(
        fake: FakeBroker, coalition: Coalition) -> None:
    """Cosignatures come once a second: while one waits for its pong, a newer one replaces
    any not yet sent (the latest checkpoint is the one that counts), so they never pile up
    in front of the application's requests; none is queued while no link is up."""
    fake.answer_pings = False
    async with client(fake.url, coalition, "GBR-GW1") as gbr:
        node = await fake.next_connection()
        connection = gbr._connection
        connection.confirm_soon(wire.Cosign(line="one"))
        assert await node.until(wire.Ping) == ([wire.Cosign(line="one")], wire.Ping())
        for line in ("two", "three"):  # while "one" waits for its pong
            connection.confirm_soon(wire.Cosign(line=line))
        await node.send(wire.Pong())
        assert await node.until(wire.Ping) == ([wire.Cosign(line="three")], wire.Ping())
        await node.send(wire.Pong())
        fake.answer_pings = True
        asking = asyncio.ensure_future(connection.confirmed(wire.Sub(topic="x.>")))
        assert await node.until(wire.Ping) == ([wire.Sub(topic="x.>")], wire.Ping())
        await asyncio.wait_for(asking, 5)  # "two" was never sent
        await connection.recycle("test: offline")
        with capture_logs() as logs:
            connection.confirm_soon(wire.Cosign(line="offline"))
        assert [e["event"] for e in logs] == ["background_request_dropped"]


async def test_subscriptions_sent_again_do_not_count_as_a_request_given_up(
        fake: FakeBroker, coalition: Coalition) -> None:
    """After a reconnect the re-sent subscriptions' pong is owed to nobody; a request that
    then times out is the first given up, not the second: the link is kept."""
    async with client(fake.url, coalition, "GBR-GW1", timeout=0.3) as gbr:
        first = await fake.next_connection()
        await gbr.subscribe("maritime.>")
        fake.answer_pings = False
        await first.close(b"unavailable")
        second = await fake.next_connection()
        await until(lambda: gbr.reconnections == 1)
        await second.until(wire.Ping)  # the re-sent subscription's; not answered yet
        with pytest.raises(RequestTimeout):
            await gbr._connection.control(wire.Directory())
        await asyncio.sleep(0.2)
        assert gbr.reconnections == 1 and fake.connections.empty()
        await second.send(wire.Pong())  # the subscriptions'
        await second.send(wire.Directory(certs=()))  # the directory's, late: dropped
        asking = asyncio.ensure_future(gbr._connection.control(wire.Directory(),
                                                               expect=wire.Directory))
        await second.until(wire.Directory)
        await second.send(wire.Error(code="internal", reason="its own answer"))
        with pytest.raises(RequestRejected, match="its own answer"):
            await asyncio.wait_for(asking, 5)
