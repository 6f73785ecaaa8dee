"""Envelope signatures checked in worker processes (broker/verifier.py): batches, order, the
loss, garbage, stall and start failure of a worker, the end of the pool, and a broker serving
with workers (its publish tests also run with them: tests/integration/test_publish.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import nacl.signing
import pytest
from structlog.testing import capture_logs

from broker import crypto, verifier, wire
from broker.audit.leaves import RouteEntry, entry_from_bytes
from broker.coalition import Coalition
from broker.envelope import Envelope, build_envelope
from broker.errors import BrokerError
from broker.server import BrokerServer
from broker.store.base import Batch
from broker.verifier import VerifyPool
from clients.gateway import GatewayClient, label
from clients.identity import KeyFile
from tests.integration.rawnode import RawNode
from tests.integration.test_key_rotation import Origin, reload, revoke, rotate

KEY = nacl.signing.SigningKey(b"\x05" * 32)
FORGER = nacl.signing.SigningKey(b"\x06" * 32)
PUBLIC = bytes(KEY.verify_key)


def item(n: int, *, forged: bool = False) -> tuple[bytes, bytes, bytes]:
    body = b"body %d" % n
    return PUBLIC, body, crypto.sign(FORGER if forged else KEY, crypto.DOMAIN_ENVELOPE, body)


class Verdicts:
    """Collects ``(n, ok)`` in the order the verdicts arrive."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bool]] = []

    def submit(self, pool: VerifyPool, n: int, *, forged: bool = False) -> None:
        pool.submit(*item(n, forged=forged), lambda ok: self.got.append((n, ok)))

    async def wait_for(self, count: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"{len(self.got)} of {count} verdicts"
            await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def every_batch_to_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of any size go to the worker, unless a test says otherwise."""
    monkeypatch.setattr(verifier, "MIN_BATCH", 1)


@pytest.fixture
async def pool() -> AsyncIterator[VerifyPool]:
    started = await VerifyPool.start(1)
    try:
        yield started
    finally:
        await started.close()


async def flushed() -> None:
    """Let the loop turn, so that what was submitted is sent to the worker."""
    for _ in range(3):
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)


async def owing(pool: VerifyPool, count: int, timeout: float = 10) -> None:
    """Wait until the workers owe ``count`` envelopes (frames sent by a node have arrived)."""
    deadline = time.monotonic() + timeout
    while pool.owed != count:
        assert time.monotonic() < deadline, f"the workers owe {pool.owed}, not {count}"
        await asyncio.sleep(0.01)


def forged(n: int) -> bool:
    return n % 7 == 3


async def test_a_turns_envelopes_go_to_the_worker_and_come_back_in_order(
        pool: VerifyPool) -> None:
    verdicts = Verdicts()
    for n in range(300):  # more than one batch (MAX_BATCH = 256)
        verdicts.submit(pool, n, forged=forged(n))
    assert verdicts.got == []  # nothing is answered while the loop has not turned
    await verdicts.wait_for(300)
    assert verdicts.got == [(n, not forged(n)) for n in range(300)]
    assert (pool.by_workers, pool.on_loop) == (300, 0)


@pytest.mark.parametrize("then", ["answers", "dies"])
async def test_a_small_batch_is_checked_on_the_loop_but_waits_for_those_in_flight(
        pool: VerifyPool, monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    monkeypatch.setattr(verifier, "MIN_BATCH", 4)
    verdicts = Verdicts()
    for n in range(3):  # the worker is idle: handed out at the end of the turn
        verdicts.submit(pool, n, forged=forged(n))
    await verdicts.wait_for(3)
    assert (pool.by_workers, pool.on_loop) == (0, 3)
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)
    try:
        for n in range(3, 8):  # a batch for the worker, which holds it
            verdicts.submit(pool, n, forged=forged(n))
        await flushed()
        for n in range(8, 10):  # checked here, but handed out after the batch before them
            verdicts.submit(pool, n, forged=forged(n))
        await flushed()
        assert len(verdicts.got) == 3 and pool.on_loop == 5
    finally:
        os.kill(pid, signal.SIGCONT if then == "answers" else signal.SIGKILL)
    await verdicts.wait_for(10)
    assert verdicts.got == [(n, not forged(n)) for n in range(10)]
    assert (pool.by_workers, pool.on_loop) == ((5, 5) if then == "answers" else (0, 10))


async def test_a_killed_worker_owes_nothing_and_is_restarted(
        pool: VerifyPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "RESTART_INITIAL_S", 0.05)
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)  # it holds the batch without answering
    verdicts = Verdicts()
    for n in range(20):
        verdicts.submit(pool, n, forged=forged(n))
    await flushed()
    assert verdicts.got == []
    with capture_logs() as logs:
        os.kill(pid, signal.SIGKILL)
        await verdicts.wait_for(20)
    assert verdicts.got == [(n, not forged(n)) for n in range(20)]  # on the loop, in order
    assert (pool.on_loop, pool.lost_workers) == (20, 1)
    lost = [e for e in logs if e["event"] == "verify_worker_lost"]
    assert lost and lost[0]["verified_on_loop"] == 20 and lost[0]["pid"] == pid
    deadline = time.monotonic() + 10
    while not pool.pids:
        assert time.monotonic() < deadline, "no new worker"
        await asyncio.sleep(0.02)
    assert pool.pids != [pid]
    for n in range(20, 30):
        verdicts.submit(pool, n, forged=forged(n))
    await verdicts.wait_for(30)
    assert verdicts.got[20:] == [(n, not forged(n)) for n in range(20, 30)]
    assert pool.by_workers == 10


async def test_a_worker_that_answers_garbage_is_not_believed(
        pool: VerifyPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier, "RESTART_INITIAL_S", 60)
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)
    verdicts = Verdicts()
    for n in range(5):
        verdicts.submit(pool, n, forged=True)
    await flushed()
    worker = pool._workers[0]
    assert worker is not None
    with capture_logs() as logs:
        # "all good", but for a batch it was never sent: every signature is checked here.
        worker.data_received(msgpack.packb([worker.sent[0].number + 1, b"\x01" * 5]))
    assert verdicts.got == [(n, False) for n in range(5)]
    assert [e["reason"] for e in logs if e["event"] == "verify_worker_lost"] == [
        "it answered garbage"]
    assert pool.pids == []  # killed; the next one starts after the pause
    for n in range(5, 8):
        verdicts.submit(pool, n)
    assert verdicts.got[5:] == [(n, True) for n in range(5, 8)]  # meanwhile, on the loop


@pytest.mark.parametrize(("limit", "value", "reason"), [
    ("MAX_PENDING", 5, "it fell 5 envelopes behind"),
    ("STALL_S", 0.2, "it has not answered for 0.2 s"),
])
async def test_a_worker_too_far_behind_is_given_up_and_its_envelopes_checked_in_order(
        pool: VerifyPool, monkeypatch: pytest.MonkeyPatch, limit: str, value: float,
        reason: str) -> None:
    monkeypatch.setattr(verifier, limit, value)
    monkeypatch.setattr(verifier, "RESTART_INITIAL_S", 60)
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)
    verdicts = Verdicts()
    with capture_logs() as logs:
        for n in range(5):
            verdicts.submit(pool, n, forged=forged(n))
        await owing(pool, 5)
        assert verdicts.got == []
        verdicts.submit(pool, 5)  # one too many at once; or its batch waits past the time
        await verdicts.wait_for(6)
    assert verdicts.got == [(n, not forged(n)) for n in range(6)]
    assert [e["reason"] for e in logs if e["event"] == "verify_worker_lost"] == [reason]
    assert pool.owed == 0 and pool.pids == []


async def test_close_answers_nothing_owed_and_the_workers_are_gone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stalled, idle = await VerifyPool.start(1), await VerifyPool.start(2)
    stalled_pid, idle_pids = stalled.pids[0], idle.pids
    assert len(idle_pids) == 2
    os.kill(stalled_pid, signal.SIGSTOP)
    verdicts = Verdicts()
    for n in range(3):
        verdicts.submit(stalled, n)
    await flushed()
    await stalled.close(timeout=0.2)
    await idle.close()
    await asyncio.sleep(0.05)
    assert verdicts.got == []  # a publish without a verdict was not accepted
    for pid in (stalled_pid, *idle_pids):
        assert not Path(f"/proc/{pid}").exists(), "a worker outlived its pool"
    assert stalled.pids == idle.pids == []


def child_process() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A worker started by hand, and the broker's end of its socket."""
    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-m", "broker.verifier", str(theirs.fileno())],
                             pass_fds=(theirs.fileno(),))
    theirs.close()
    return child, ours


def test_the_child_answers_in_order_and_exits_when_its_socket_closes() -> None:
    child, ours = child_process()
    with ours:
        ours.settimeout(10)
        unpacker = msgpack.Unpacker()
        requests = [[1, [*item(1), *item(2, forged=True)]], [2, []], [3, [*item(3)]]]
        ours.sendall(b"".join(msgpack.packb(r) for r in requests))
        replies: list[object] = []
        while len(replies) < 4:
            unpacker.feed(ours.recv(1 << 16))
            replies.extend(unpacker)
        assert replies == [["ready"], [1, b"\x01\x00"], [2, b""], [3, b"\x01"]]
    assert child.wait(10) == 0  # the broker's end closed: it exits by itself


def test_the_child_stops_at_a_request_no_broker_sends() -> None:
    child, ours = child_process()
    with ours:
        ours.sendall(msgpack.packb([1, [b"key", b"body"]]))
        assert child.wait(10) == 2


async def test_a_worker_that_cannot_start_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifier.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(BrokerError) as missing:
        await VerifyPool.start(1)
    assert missing.value.code == "unavailable"
    assert "cannot start a verify worker" in missing.value.reason
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    monkeypatch.setattr(verifier.sys, "executable", str(silent))
    with pytest.raises(BrokerError) as slow:
        await VerifyPool.start(1, timeout=0.3)
    assert slow.value.code == "unavailable" and "within 0.3 s" in slow.value.reason


# --- a broker with workers ------------------------------------------------------------------

Gateways = Callable[[str], GatewayClient]
WITH_WORKER = pytest.mark.parametrize("server", [1], indirect=True, ids=["verify-workers"])


def envelopes(coalition: Coalition, count: int, *, forged_at: set[int]) -> list[bytes]:
    """``count`` envelopes from USA-GW1 for GBR-GW1, numbered in their payload; those at
    ``forged_at`` signed by a key that is not USA-GW1's."""
    forger = KeyFile.generate("node", "USA-GW1")
    now = time.time_ns() // 1_000_000
    return [build_envelope(
        signing_key=(forger if n in forged_at else coalition.nodes["USA-GW1"]).signing_key,
        sender="USA-GW1", topic="maritime.tracks", payload=b"%d" % n,
        label=label("NATO", "SECRET", "USA", ["GBR"]), prec=0, ttl=60,
        recipient_keys={"GBR-GW1": coalition.nodes["GBR-GW1"].enc_public}, now_ms=now)
        for n in range(count)]


async def answers(raw: RawNode, count: int) -> list[wire.Frame]:
    """The next ``count`` receipts and errors."""
    got: list[wire.Frame] = []
    while len(got) < count:
        frame = await raw.recv()
        if isinstance(frame, (wire.Receipt, wire.Error)):
            got.append(frame)
    return got


async def received(gbr: GatewayClient, count: int) -> list[bytes]:
    stream = gbr.messages()
    try:
        return [(await asyncio.wait_for(stream.__anext__(), 5)).payload for _ in range(count)]
    finally:
        await stream.aclose()


@WITH_WORKER
async def test_pipelined_messages_are_routed_in_the_order_sent(
        server: BrokerServer, coalition: Coalition, gateway: Gateways) -> None:
    count, bad = 120, {5, 64, 100}
    sent = envelopes(coalition, count, forged_at=bad)
    async with gateway("GBR-GW1") as gbr, RawNode(server.url) as raw:
        await gbr.subscribe("maritime.>")
        await raw.login(coalition.nodes["USA-GW1"])
        for env in sent:
            await raw.send(wire.Pub(env=env))
        got = await answers(raw, count)
        ids = [Envelope.from_bytes(env).id for env in sent]
        good = [n for n in range(count) if n not in bad]
        assert [g.id for g in got if isinstance(g, wire.Receipt)] == [ids[n] for n in good]
        errors = [g for g in got if isinstance(g, wire.Error)]
        assert [(e.code, e.ref) for e in errors] == [("bad_signature", ids[n]) for n in sorted(bad)]
        audit = [g.audit for g in got if isinstance(g, wire.Receipt)]
        assert audit == sorted(audit)  # logged in the order sent
        assert await received(gbr, len(good)) == [b"%d" % n for n in good]
    pool = server._verifier
    assert pool is not None and pool.by_workers == count and pool.on_loop == 0


@WITH_WORKER
async def test_a_worker_killed_under_traffic_loses_no_message(
        server: BrokerServer, coalition: Coalition, gateway: Gateways) -> None:
    count = 200
    sent = envelopes(coalition, count, forged_at=set())
    pool = server._verifier
    assert pool is not None
    (pid,) = pool.pids
    async with gateway("GBR-GW1") as gbr, RawNode(server.url) as raw:
        await gbr.subscribe("maritime.>")
        await raw.login(coalition.nodes["USA-GW1"])
        os.kill(pid, signal.SIGSTOP)  # the first half waits in the worker when it dies
        for env in sent[:100]:
            await raw.send(wire.Pub(env=env))
        await owing(pool, 100)
        os.kill(pid, signal.SIGKILL)
        for env in sent[100:]:
            await raw.send(wire.Pub(env=env))
        got = await answers(raw, count)
        assert all(isinstance(g, wire.Receipt) for g in got)
        assert [g.id for g in got] == [Envelope.from_bytes(env).id for env in sent]
        assert await received(gbr, count) == [b"%d" % n for n in range(count)]
    assert pool.lost_workers == 1 and pool.on_loop >= 100 and pool.by_workers < 100


@WITH_WORKER
@pytest.mark.parametrize("change", ["revoked", "rotated", "suspended"])
async def test_a_verdict_that_comes_after_the_sender_lost_its_standing_routes_nothing(
        server: BrokerServer, coalition: Coalition, gateway: Gateways, change: str) -> None:
    pool = server._verifier
    assert pool is not None
    (pid,) = pool.pids
    (env,) = envelopes(coalition, 1, forged_at=set())
    async with gateway("GBR-GW1") as gbr, RawNode(server.url) as raw:
        await gbr.subscribe("maritime.>")
        await raw.login(coalition.nodes["USA-GW1"])
        os.kill(pid, signal.SIGSTOP)
        await raw.send(wire.Pub(env=env))
        await owing(pool, 1)
        await lose_standing(server, coalition, change)  # USA-GW1's connection is closed
        with capture_logs() as logs:
            os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 5
            while pool.by_workers < 1:
                assert time.monotonic() < deadline, "no verdict"
                await asyncio.sleep(0.01)
        assert [e["id"] for e in logs if e["event"] == "publish_abandoned"] == [
            Envelope.from_bytes(env).id.hex()]
        await server.audit.write(Batch())  # everything appended before it is durable
    routed = [e for e in map(entry_from_bytes, server.audit.store.entries(0, server.audit.size))
              if isinstance(e, RouteEntry)]
    assert routed == []
    assert server.hub.queues.get("GBR-GW1") is None or server.hub.queues["GBR-GW1"].depth == 0


async def lose_standing(server: BrokerServer, coalition: Coalition, change: str) -> None:
    if change == "suspended":
        await server.hub.set_status("USA-GW1", "suspended", operator="test")
        return
    if change == "revoked":
        revoke(coalition, "USA-GW1")
    else:
        rotate(coalition, "USA-GW1", serial=2)
    await reload(server, coalition)


@WITH_WORKER
@pytest.mark.parametrize("change", ["revoked", "rotated", "suspended"])
async def test_a_verdict_for_a_sender_without_standing_is_refused_even_on_an_open_connection(
        server: BrokerServer, coalition: Coalition, change: str) -> None:
    # Connections are closed when their node loses its standing; the verdict is checked
    # against the certificate and status in force all the same.
    sender = server.bundle.nodes["USA-GW1"]
    (env,) = envelopes(coalition, 1, forged_at=set())
    await lose_standing(server, coalition, change)
    origin = Origin()
    server.hub.publisher._verified(Envelope.from_bytes(env), sender, origin, True)
    assert [(f.code, f.ref) for f in origin.frames if isinstance(f, wire.Error)] == [
        ("node_inactive", Envelope.from_bytes(env).id)]
    assert len(origin.frames) == 1 and not origin.closing


@WITH_WORKER
async def test_a_stopped_broker_leaves_no_worker(server: BrokerServer) -> None:
    pool = server._verifier
    assert pool is not None
    pids = pool.pids
    assert len(pids) == 1
    await server.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
