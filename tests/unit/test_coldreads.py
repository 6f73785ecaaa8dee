"""broker.coldreads: cold copies read from the store; a failed read pauses the node and retries
after a backoff that doubles up to a cap and resets once a read succeeds."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from broker import coldreads
from broker.coldreads import ColdReads
from broker.errors import StorageError


class FakeStore:
    def __init__(self) -> None:
        self.envelopes = {1: b"one", 2: b"two"}
        self.failing = False

    def read(self, node: str, seqs: list[int]) -> dict[int, bytes]:
        if self.failing:
            raise StorageError("disk I/O error")
        return {seq: self.envelopes[seq] for seq in seqs if seq in self.envelopes}


def test_a_read_returns_the_envelopes_and_logs_the_missing_ones() -> None:
    store = FakeStore()
    reads = ColdReads(store.read, lambda node: None)
    with structlog.testing.capture_logs() as logs:
        assert reads.read("GBR-GW1", [1, 2]) == {1: b"one", 2: b"two"}
        assert reads.read("GBR-GW1", [2, 3]) == {2: b"two"}
    assert [(line["event"], line.get("seqs")) for line in logs] == [
        ("queued_envelopes_missing", [3])]


async def test_a_failed_read_pauses_the_node_until_its_retry_pumps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coldreads, "RETRY_FIRST_S", 0.01)
    store, pumped = FakeStore(), asyncio.Event()
    reads = ColdReads(store.read, lambda node: pumped.set())
    store.failing = True
    with structlog.testing.capture_logs() as logs:
        assert reads.read("GBR-GW1", [1]) is None
    assert logs[0]["event"] == "queued_envelopes_unreadable"
    assert logs[0]["reason"] == "disk I/O error"
    reads.retry_later("GBR-GW1")
    assert reads.waiting("GBR-GW1") and not reads.waiting("FRA-GW1")
    await asyncio.wait_for(pumped.wait(), 2)
    assert not reads.waiting("GBR-GW1")


async def test_the_backoff_doubles_to_its_cap_and_resets_after_a_good_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "call_later", lambda delay, *args: delays.append(delay))
    store = FakeStore()
    reads = ColdReads(store.read, lambda node: None)
    store.failing = True
    for _ in range(11):
        assert reads.read("GBR-GW1", [1]) is None
        reads.retry_later("GBR-GW1")
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == coldreads.RETRY_MAX_S == 30.0
    store.failing = False
    assert reads.read("GBR-GW1", [1]) == {1: b"one"}
    reads.retry_later("GBR-GW1")
    assert delays[-1] == 0.1


def test_without_a_running_loop_nothing_is_scheduled_and_the_node_is_not_paused() -> None:
    reads = ColdReads(FakeStore().read, lambda node: None)
    reads.retry_later("GBR-GW1")
    assert not reads.waiting("GBR-GW1")
