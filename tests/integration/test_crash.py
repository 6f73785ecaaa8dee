"""kill -9 under load, once and several times: everything receipted survives, is delivered (to
the application exactly once), and the log verifies."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from pathlib import Path

import pytest

from broker.audit.leaves import RouteEntry, entry_from_bytes
from broker.coalition import Coalition
from broker.store.sqlite import SqliteStore
from clients.auditor import verify_export
from clients.export import Export, export_store
from clients.gateway import GatewayClient, GatewayError, Receipt, label
from clients.link import Backoff
from tests.integration.process import free_port, running_broker, write_broker_config

LABEL = label("NATO", "SECRET", "USA", ["GBR"])


def _client(url: str, coalition: Coalition, node: str, tmp_path: Path) -> GatewayClient:
    return GatewayClient(url, coalition.nodes[node], coalition.trust_root,
                         broker_name=coalition.broker_name, timeout=5,
                         state_dir=tmp_path / f"witness-{node}")


async def _publish_until_killed(client: GatewayClient, receipts: list[Receipt]) -> None:
    """Keep 16 publishes in flight until the connection dies."""
    async def one(i: int) -> None:
        receipts.append(await client.publish("reports.load", b"msg %d" % i, LABEL))

    i = 0
    with contextlib.suppress(GatewayError):
        while True:
            await asyncio.gather(*(one(i + k) for k in range(16)))
            i += 16


@pytest.mark.parametrize("writer", ["loop", "process"])
async def test_kill_9_under_load_loses_nothing_receipted(coalition: Coalition, tmp_path: Path,
                                                         writer: str) -> None:
    config = write_broker_config(tmp_path, coalition, audit=f'writer = "{writer}"')
    receipts: list[Receipt] = []
    async with running_broker(config) as broker:
        async with _client(broker.url, coalition, "GBR-GW1", tmp_path) as gbr:
            await gbr.subscribe("reports.>")  # durable: kept while GBR is offline
        usa = _client(broker.url, coalition, "USA-GW1", tmp_path)
        await usa.connect()
        load = asyncio.create_task(_publish_until_killed(usa, receipts))
        async with asyncio.timeout(20):
            while len(receipts) < 150:
                await asyncio.sleep(0.005)
        broker.kill9()  # with publishes in flight and a batch possibly half-written
        await load
        await usa.close()
        assert await broker.wait() == -9
    assert len(receipts) >= 150
    assert all(r.recipients == {"GBR-GW1": "queued"} for r in receipts)

    async with running_broker(config) as broker:
        await _drain_and_witness(broker.url, coalition, tmp_path, receipts)

    store = SqliteStore(tmp_path / "data" / "broker.sqlite")
    try:
        export_store(store, coalition.broker_name, tmp_path / "export")
    finally:
        store.close()
    report = verify_export(tmp_path / "export", pins=[coalition.root_sha256])
    assert report.ok, report.problems
    routed = {}
    for index, data in Export.open(tmp_path / "export").entries():
        entry = entry_from_bytes(data)
        if isinstance(entry, RouteEntry):
            routed[entry.id] = index
    assert all(routed.get(r.id) == r.audit for r in receipts), "a receipted entry is missing"


async def _drain_and_witness(url: str, coalition: Coalition, tmp_path: Path,
                             receipts: list[Receipt]) -> None:
    """GBR receives everything it is owed, exactly once; USA and GBR cosign past it."""
    async with _client(url, coalition, "GBR-GW1", tmp_path) as gbr, \
            _client(url, coalition, "USA-GW1", tmp_path):
        wanted = {r.id for r in receipts}
        seen: list[bytes] = []
        stream = gbr.messages()
        async with asyncio.timeout(30):
            while not wanted <= set(seen):
                seen.append((await anext(stream)).id)
        await stream.aclose()
        assert len(seen) == len(set(seen)), "the application saw a message twice"
        store = SqliteStore(tmp_path / "data" / "broker.sqlite")
        try:
            async with asyncio.timeout(10):
                while not _witnessed_by_two(store, max(r.audit for r in receipts)):
                    await asyncio.sleep(0.05)
        finally:
            store.close()


def _witnessed_by_two(store: SqliteStore, index: int) -> bool:
    return any(c.size > index and len(c.cosignatures) >= 2 for c in store.checkpoints())


async def test_several_kills_at_random_moments_lose_nothing_and_show_each_once(
        coalition: Coalition, tmp_path: Path) -> None:
    """Three kill -9s at random moments while USA publishes and GBR consumes, both reconnecting
    by themselves. Every receipted message reaches GBR's application exactly once, and the log
    on disk verifies after every crash."""
    seed = random.randrange(1 << 32)
    print(f"\nrandom seed {seed}")  # a failure names the seed that reproduces its timings
    rng = random.Random(seed)
    # The writer process (killed with it: it exits when the broker's socket closes).
    config = write_broker_config(tmp_path, coalition, port=free_port(),
                                 audit='writer = "process"')
    backoff = Backoff(initial=0.05, maximum=0.5)

    def client(url: str, node: str) -> GatewayClient:
        return GatewayClient(url, coalition.nodes[node], coalition.trust_root,
                             broker_name=coalition.broker_name, timeout=5, reconnect=backoff,
                             heartbeat=2, state_dir=tmp_path / f"state-{node}")

    receipts: list[Receipt] = []
    shown: list[bytes] = []  # what GBR's application saw, in order
    async with contextlib.AsyncExitStack() as clients:
        for kill in range(3):
            async with running_broker(config) as broker:
                if kill == 0:  # the clients connect once; after that they reconnect alone
                    usa = await clients.enter_async_context(client(broker.url, "USA-GW1"))
                    gbr = await clients.enter_async_context(client(broker.url, "GBR-GW1"))
                    await gbr.subscribe("reports.>")
                    tasks = [asyncio.create_task(_publish_forever(usa, receipts)),
                             asyncio.create_task(_consume_forever(gbr, shown))]
                else:  # kill only once both are back: a client that missed a whole
                    # incarnation (USA's quota filled before GBR's backoff came round) would
                    # not be tested for coming back after that kill
                    async with asyncio.timeout(30):
                        while min(usa.reconnections, gbr.reconnections) < kill:
                            await asyncio.sleep(0.005)
                target = len(receipts) + rng.randrange(20, 200)
                async with asyncio.timeout(30):
                    while len(receipts) < target:
                        await asyncio.sleep(0.005)
                await asyncio.sleep(rng.uniform(0, 0.2))
                broker.kill9()
                assert await broker.wait() == -9
            _verify_on_disk(coalition, tmp_path, f"after-kill-{kill}")
        tasks[0].cancel()
        async with running_broker(config):
            wanted = {r.id for r in receipts}
            async with asyncio.timeout(60):
                while not wanted <= set(shown):
                    await asyncio.sleep(0.02)
                while min(usa.reconnections, gbr.reconnections) < 3:  # back after the third
                    await asyncio.sleep(0.02)
        tasks[1].cancel()
    assert len(receipts) >= 60
    assert len(shown) == len(set(shown)), "the application saw a message twice"
    assert gbr.reconnections >= 3 and usa.reconnections >= 3  # came back after each kill
    _verify_on_disk(coalition, tmp_path, "final")


async def _publish_forever(client: GatewayClient, receipts: list[Receipt]) -> None:
    """Keep 8 publishes in flight; a publish whose connection dropped is not receipted (its
    outcome is unknown) and is simply not counted."""
    async def one(i: int) -> None:
        with contextlib.suppress(GatewayError):
            receipts.append(await client.publish("reports.load", b"msg %d" % i, LABEL))

    for i in itertools.count(step=8):
        await asyncio.gather(*(one(i + k) for k in range(8)))


async def _consume_forever(client: GatewayClient, shown: list[bytes]) -> None:
    async for message in client.messages():
        shown.append(message.id)


def _verify_on_disk(coalition: Coalition, tmp_path: Path, name: str) -> None:
    store = SqliteStore(tmp_path / "data" / "broker.sqlite")
    try:
        export_store(store, coalition.broker_name, tmp_path / name)
    finally:
        store.close()
    report = verify_export(tmp_path / name, pins=[coalition.root_sha256], quorum=0)
    assert report.ok, report.problems
