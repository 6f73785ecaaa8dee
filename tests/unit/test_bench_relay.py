"""The benchmark's relay (the latency floor and the relay limit) speaks enough of the node
protocol for the load generators, and routes as the broker would in the throughput plan: a
copy to each subscriber in the label's audience, a deny for the others, then the receipt."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgpack
import pytest

from broker import wire
from broker.bench.limits import sample_envelope
from broker.bench.relay import NOT_IN_AUDIENCE, RelayCore
from broker.envelope import Envelope

PUBLISHER, GBR, FRA, DEU = 1, 2, 3, 4


def _frame(frame: wire.Frame) -> bytes:
    return wire.encode_frame(frame)


def _hello(node: str) -> bytes:
    return msgpack.packb({"t": "hello", "v": 1, "node": node, "nonce": b"n" * 32, "ts": 0,
                          "sig": b"s" * 64})


def _relay() -> RelayCore:
    core = RelayCore()
    for conn, node in ((PUBLISHER, "USA-P1"), (GBR, "GBR-S1"), (FRA, "FRA-S1"),
                       (DEU, "DEU-S1")):
        (challenge,) = core.connected(conn)
        assert isinstance(wire.decode_frame(challenge, max_bytes=1 << 16), wire.Challenge)
        [(to, welcome)] = core.received(conn, _hello(node))
        assert to == conn and wire.decode_frame(welcome, max_bytes=1 << 16) == wire.Welcome(
            node=node)
        if conn != PUBLISHER:
            assert core.received(conn, _frame(wire.Sub(topic="bench.tput"))) == []
    return core


def test_a_pub_goes_to_the_audience_then_the_receipt_to_the_sender() -> None:
    core = _relay()
    env, _ = sample_envelope(1024)  # label NATO SECRET REL FRA, GBR on bench.tput
    for seq in (1, 2):
        sent = core.received(PUBLISHER, _frame(wire.Pub(env=env)))
        frames = [(to, wire.decode_frame(data, max_bytes=1 << 16)) for to, data in sent]
        assert frames[:2] == [(GBR, wire.Deliver(env=env, seq=seq)),
                              (FRA, wire.Deliver(env=env, seq=seq))]
        to, receipt = frames[2]
        assert to == PUBLISHER and isinstance(receipt, wire.Receipt)
        assert receipt.id == Envelope.from_bytes(env).id
        assert dict(receipt.recipients) == {"GBR-S1": "delivered", "FRA-S1": "delivered",
                                            "DEU-S1": NOT_IN_AUDIENCE}


def test_ping_pong_and_what_the_relay_drops() -> None:
    core = _relay()
    env, _ = sample_envelope(1024)
    assert core.received(GBR, _frame(wire.Ping())) == [(GBR, _frame(wire.Pong()))]
    assert core.received(GBR, b"\xc1 not msgpack") == []
    assert core.received(GBR, _frame(wire.Ack(seqs=(1, 2)))) == []
    core.connected(9)  # no hello yet: its pub is not relayed
    assert core.received(9, _frame(wire.Pub(env=env))) == []
    assert core.received(99, _frame(wire.Ping())) == []  # never connected
    assert core.received(PUBLISHER, _frame(wire.Pub(env=b"\x93not an envelope"))) == []
    assert core.received(GBR, _frame(wire.Sub(topic="bench.tput"))) == []  # again: still once
    core.disconnected(FRA)
    sent = core.received(PUBLISHER, _frame(wire.Pub(env=env)))
    assert [to for to, _ in sent] == [GBR, PUBLISHER]
    assert wire.decode_frame(sent[0][1], max_bytes=1 << 16) == wire.Deliver(env=env, seq=1)


def test_steal_share_is_the_stolen_part_of_the_time_that_passed() -> None:
    from broker.bench.harness import parse_machine_ticks, steal_share

    assert steal_share((10, 1000), (35, 1100)) == 0.25
    assert steal_share((10, 1000), (10, 1000)) == 0.0  # no time passed: no share
    # user nice system idle iowait irq softirq steal guest guest_nice: guest is in user
    stat = "cpu  100 2 30 800 4 0 6 58 40 0\ncpu0 50 1 15 400 2 0 3 29 20 0\n"
    assert parse_machine_ticks(stat) == (58, 1000)
    assert parse_machine_ticks("cpu  100 2 30 800\n") == (0, 932)  # an old kernel: no steal
    assert parse_machine_ticks("intr 1 2 3\n") == (0, 0)
    assert parse_machine_ticks("cpu  1 x 3\n") == (0, 0)


def test_the_core_hands_over_what_it_relayed_once() -> None:
    core = _relay()
    env, _ = sample_envelope(1024)
    core.received(PUBLISHER, _frame(wire.Pub(env=env)))
    core.received(GBR, _frame(wire.Ping()))
    assert core.take_relayed() == [env]
    assert core.take_relayed() == []
    core.received(9, _frame(wire.Pub(env=env)))  # not relayed: nothing to write either
    assert core.take_relayed() == []


class _Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def put(self, frame: bytes) -> None:
        self.frames.append(frame)


async def test_the_durable_relay_writes_the_envelopes_before_their_frames_leave(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.bench import relay

    synced: list[tuple[int, bytes]] = []
    journal_path = tmp_path / "journal"
    real_sync = os.fdatasync

    def fdatasync(fd: int) -> None:
        real_sync(fd)
        synced.append((len(sink.frames), journal_path.read_bytes()[:18]))

    sink = _Sink()
    journal = relay._Journal(journal_path, {GBR: sink, PUBLISHER: sink})  # type: ignore[dict-item]
    try:
        assert journal_path.stat().st_size == relay._Journal.SIZE  # the ring, written out
        monkeypatch.setattr(relay.os, "fdatasync", fdatasync)
        journal.hold([b"envelope1"], [(GBR, b"deliver1")])
        journal.hold([b"envelope2"], [(GBR, b"deliver2"), (PUBLISHER, b"receipt"),
                                      (77, b"to a connection gone")])
        assert sink.frames == []  # nothing leaves in the turn that received it
        for _ in range(500):
            if sink.frames:
                break
            await asyncio.sleep(0.01)
        # One sync for both, before any frame was put out; the envelopes in the file.
        assert synced == [(0, b"envelope1envelope2")]
        assert sink.frames == [b"deliver1", b"deliver2", b"receipt"]
        # Held while a sync is in flight: the next sync, then out.
        journal.hold([b"envelope3"], [(GBR, b"deliver3")])
        for _ in range(500):
            if len(sink.frames) == 4:
                break
            await asyncio.sleep(0.01)
        assert synced[1] == (3, b"envelope1envelope2")  # written after the first two
        assert sink.frames[3] == b"deliver3"
        with journal_path.open("rb") as f:
            assert f.read(27) == b"envelope1envelope2envelope3"
    finally:
        journal.close()


async def test_the_durable_relay_lets_nothing_out_that_a_failed_sync_did_not_keep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.bench import relay

    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    sink = _Sink()
    journal = relay._Journal(tmp_path / "journal", {GBR: sink})  # type: ignore[dict-item]
    try:
        monkeypatch.setattr(relay.os, "fdatasync", fdatasync)
        journal.hold([b"envelope1"], [(GBR, b"deliver1")])
        for _ in range(50):
            await asyncio.sleep(0.01)
        journal.hold([b"envelope2"], [(GBR, b"deliver2")])
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert sink.frames == []
    finally:
        journal.close()
