"""The store writer process: commits in a child process, its failures, its end, and the audit
log on top of it (broker/store/writer_process.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from broker.audit.commit_policy import CommitPolicy
from broker.audit.leaves import DeliverEntry
from broker.audit.log import AuditLog
from broker.audit.merkle import leaf_hash
from broker.audit.note import Signer, verify_note
from broker.coalition import Coalition
from broker.config import load_config
from broker.errors import StorageError
from broker.server import BrokerServer, Limits
from broker.store.base import Batch
from broker.store.sqlite import SqliteStore
from broker.store.writer_process import WriterProcess
from clients.gateway import GatewayClient, label
from tests.integration.conftest import FAST_COMMIT
from tests.integration.process import write_broker_config

FAST = CommitPolicy(max_batch=64, max_delay_s=0.001, checkpoint_interval_s=0.01)


def _entries(first: int, count: int) -> Batch:
    entries = [b"entry %d" % i for i in range(first, first + count)]
    return Batch(first_index=first, entries=entries, leaves=[leaf_hash(e) for e in entries])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore.in_dir(tmp_path)
    yield opened
    opened.close()


@pytest.fixture
async def server(coalition: Coalition) -> AsyncIterator[BrokerServer]:
    """The integration suite's broker, with its writer process."""
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                            limits=Limits(max_frame_bytes=64 * 1024), commit=FAST_COMMIT,
                            writer_process=True) as running:
        yield running


@pytest.fixture
async def writer(store: SqliteStore) -> AsyncIterator[WriterProcess]:
    started = await WriterProcess.start(store.path)
    try:
        yield started
    finally:
        await started.close()


async def _exits(process: WriterProcess, timeout: float = 10.0) -> int:
    async with asyncio.timeout(timeout):
        while process.process.poll() is None:
            await asyncio.sleep(0.01)
    return process.process.returncode


async def test_a_commit_in_the_child_is_visible_to_the_brokers_reads(
        store: SqliteStore, writer: WriterProcess) -> None:
    assert writer.pid != os.getpid()
    assert await writer.commit(_entries(0, 3)) is False
    assert await writer.commit(_entries(3, 2)) is False
    assert store.size() == 5
    assert store.entries(0, 5) == [b"entry %d" % i for i in range(5)]


async def test_a_failed_commit_writes_nothing_and_the_child_goes_on(
        store: SqliteStore, writer: WriterProcess) -> None:
    await writer.commit(_entries(0, 2))
    # Entry 1 exists: the whole batch (2 new entries and a duplicate) is refused.
    with pytest.raises(StorageError) as refused:
        await writer.commit(Batch(first_index=1, entries=[b"a", b"b", b"c"],
                                  leaves=[bytes(32)] * 3))
    assert refused.value.code == "unavailable"
    assert "UNIQUE constraint failed" in refused.value.reason
    assert store.size() == 2
    await writer.commit(_entries(2, 1))
    assert store.size() == 3


async def test_an_unexpected_error_in_the_child_is_answered_and_writes_nothing(
        store: SqliteStore, writer: WriterProcess) -> None:
    # An index SQLite cannot hold raises OverflowError (not an sqlite3.Error) while binding.
    with pytest.raises(StorageError) as refused:
        await writer.commit(Batch(first_index=1 << 70, entries=[b"a"], leaves=[bytes(32)]))
    assert refused.value.code == "internal"
    assert "OverflowError" in refused.value.reason
    await writer.commit(_entries(0, 1))
    assert store.entries(0, 5) == [b"entry 0"]


async def test_a_cancellation_that_lands_after_the_reply_still_reports_durable(
        store: SqliteStore, writer: WriterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    real = writer._round_trip

    async def answered_then_cancelled(payload: bytes) -> list[str]:
        reply = await real(payload)
        caller.cancel()  # the child said "ok"; the caller has not resumed yet
        return reply

    monkeypatch.setattr(writer, "_round_trip", answered_then_cancelled)
    caller = asyncio.create_task(writer.commit(_entries(0, 2)))
    assert await caller is True
    assert store.size() == 2


async def test_a_cancelled_exchange_fails_the_log_rather_than_leave_appends_waiting(
        store: SqliteStore, writer: WriterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # What tearing the event loop down does: the exchange task itself is cancelled, here
    # after the child committed. The outcome is unknown to the broker: the append fails, the
    # log stops, and no later commit goes through the out-of-step socket.
    real = writer._round_trip

    async def committed_then_cancelled(payload: bytes) -> list[str]:
        await real(payload)
        raise asyncio.CancelledError

    monkeypatch.setattr(writer, "_round_trip", committed_then_cancelled)
    audit = AuditLog(store, Signer.from_seed("broker.test", bytes(range(32))), policy=FAST,
                     writer=writer)
    await audit.start()
    try:
        with pytest.raises(StorageError) as failed:
            await asyncio.wait_for(
                audit.append(DeliverEntry(ts=1, id=bytes(16), to="GBR-GW1", seq=1)), 10)
        assert "outcome is unknown" in failed.value.reason
        assert audit.failed is not None
    finally:
        await audit.stop()
    assert store.size() == 1  # it was durable after all: the next start finds it
    with pytest.raises(StorageError, match="unusable"):
        await writer.commit(_entries(1, 1))


async def test_a_dead_child_fails_the_commit_with_its_exit_status(
        store: SqliteStore, writer: WriterProcess) -> None:
    await writer.commit(_entries(0, 1))
    writer.process.kill()
    await _exits(writer)
    with pytest.raises(StorageError) as gone:
        await writer.commit(_entries(1, 1))
    assert "store writer process" in gone.value.reason
    assert f"exited with status {-signal.SIGKILL}" in gone.value.reason
    assert store.size() == 1


async def test_the_child_refuses_a_file_that_is_not_a_broker_store(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).close()
    with pytest.raises(StorageError) as refused:
        await WriterProcess.start(other)
    assert "did not start" in refused.value.reason
    assert "is not a broker store" in refused.value.reason


async def test_the_child_exits_when_the_broker_closes_its_socket(writer: WriterProcess) -> None:
    # What a SIGKILLed broker leaves: its end of the socket closed, nobody waiting.
    writer._sock.close()
    assert await _exits(writer) == 0


async def test_the_child_ignores_stop_signals_sent_to_the_whole_group(
        store: SqliteStore, writer: WriterProcess) -> None:
    # Ctrl-C, a hang-up or a service manager's SIGTERM reach the child too; the broker's
    # orderly stop (or reload) must still commit through it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        writer.process.send_signal(sig)
    await asyncio.sleep(0.2)
    assert writer.process.poll() is None
    await writer.commit(_entries(0, 1))
    assert store.size() == 1


async def test_a_caller_cancelled_mid_commit_still_learns_that_it_is_durable(
        store: SqliteStore, writer: WriterProcess) -> None:
    writer.process.send_signal(signal.SIGSTOP)  # the commit cannot finish until SIGCONT
    try:
        task = asyncio.create_task(writer.commit(_entries(0, 4)))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done()  # it waits for the outcome, although cancelled
    finally:
        writer.process.send_signal(signal.SIGCONT)
    assert await task is True
    assert store.size() == 4


async def test_the_audit_log_commits_and_signs_checkpoints_through_the_child(
        store: SqliteStore, writer: WriterProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_here(batch: Batch) -> None:
        raise AssertionError("committed in the broker's process")

    monkeypatch.setattr(store, "commit", not_here)
    signer = Signer.from_seed("broker.test", bytes(range(32)))
    audit = AuditLog(store, signer, policy=FAST, writer=writer)
    await audit.start()
    try:
        futures = [audit.append(DeliverEntry(ts=1_700_000_000_000 + i, id=i.to_bytes(16, "big"),
                                             to="GBR-GW1", seq=i)) for i in range(150)]
        assert list(await asyncio.gather(*futures)) == list(range(150))
    finally:
        await audit.stop()
    assert store.size() == 150
    latest = store.latest_checkpoint()
    assert latest is not None and latest.size == 150
    verify_note(latest.note, [signer.verifier()])


async def test_the_audit_log_stops_when_its_writer_process_dies(
        store: SqliteStore, writer: WriterProcess) -> None:
    audit = AuditLog(store, Signer.from_seed("broker.test", bytes(range(32))), policy=FAST,
                     writer=writer)
    await audit.start()
    try:
        await audit.append(DeliverEntry(ts=1, id=bytes(16), to="GBR-GW1", seq=1))
        writer.process.kill()
        await _exits(writer)
        with pytest.raises(StorageError) as failed:
            await audit.append(DeliverEntry(ts=2, id=bytes(16), to="GBR-GW1", seq=2))
        assert "store writer process" in failed.value.reason
        assert audit.failed is not None
        with pytest.raises(StorageError):
            audit.append(DeliverEntry(ts=3, id=bytes(16), to="GBR-GW1", seq=3))
    finally:
        await audit.stop()
    assert store.size() == 1


async def test_a_stalled_disk_does_not_stall_the_broker(
        server: BrokerServer, gateway: Callable[[str], GatewayClient]) -> None:
    # A stopped writer is a disk whose fsync does not return. Commits wait (no receipt before
    # the message is durable), but the event loop goes on: a node connects and reads the
    # directory meanwhile. With commits on the loop, this connection would hang too.
    writer = server.audit.writer
    assert isinstance(writer, WriterProcess)
    async with gateway("USA-GW1") as usa, gateway("GBR-GW1") as gbr:
        await gbr.subscribe("reports.>")
        writer.process.send_signal(signal.SIGSTOP)
        # Were the loop blocked by the commit, nothing below could resume the child: this
        # thread does, so that the test fails (the receipt arrives early) rather than hangs.
        valve = threading.Timer(15, writer.process.send_signal, (signal.SIGCONT,))
        valve.start()
        try:
            publishing = asyncio.create_task(
                usa.publish("reports.daily", b"while the disk stalls",
                            label("NATO", "SECRET", "USA", ["GBR"])))
            await asyncio.sleep(0.3)
            assert not publishing.done()
            async with asyncio.timeout(5), gateway("FRA-GW1") as fra:
                assert "USA-GW1" in await fra.directory()
            assert not publishing.done()
        finally:
            valve.cancel()
            writer.process.send_signal(signal.SIGCONT)
        receipt = await asyncio.wait_for(publishing, 10)
        assert receipt.recipients == {"GBR-GW1": "delivered"}


@pytest.mark.parametrize("who", ["process", "loop"])
async def test_the_config_chooses_who_commits(who: str, coalition: Coalition,
                                              tmp_path: Path) -> None:
    config = load_config(write_broker_config(tmp_path, coalition, audit=f'writer = "{who}"'))
    async with BrokerServer.from_config(config) as server:
        writer = server.audit.writer
        assert (writer is not None) is (who == "process")
        if isinstance(writer, WriterProcess):
            assert writer.process.poll() is None
    if isinstance(writer, WriterProcess):  # stopped with the broker
        assert writer.process.returncode == 0
