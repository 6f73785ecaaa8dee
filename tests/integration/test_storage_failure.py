"""A real disk-full in a real broker process (RLIMIT_FSIZE: every write past the limit fails
with EFBIG): the broker stops accepting with a clear error, keeps running, and loses nothing it
had receipted; after a restart with room again, all of it is delivered and the log verifies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.coalition import Coalition
from broker.store.sqlite import SqliteStore
from clients.auditor import verify_export
from clients.export import export_store
from clients.gateway import GatewayClient, Receipt, RequestRejected, label
from tests.integration.process import running_broker, write_broker_config

LABEL = label("NATO", "SECRET", "USA", ["GBR"])


def _client(url: str, coalition: Coalition, node: str) -> GatewayClient:
    return GatewayClient(url, coalition.nodes[node], coalition.trust_root,
                         broker_name=coalition.broker_name, timeout=10)


@pytest.mark.parametrize("writer", ["loop", "process"])
async def test_disk_full_stops_intake_clearly_and_loses_nothing_receipted(
        coalition: Coalition, tmp_path: Path, writer: str) -> None:
    # The free-space guard is off so that the write itself fails, as on a disk that fills
    # faster than the broker measures it.
    config = write_broker_config(tmp_path, coalition, limits="min_free_disk_bytes = 0",
                                 audit=f'writer = "{writer}"')
    receipts: list[Receipt] = []
    async with running_broker(config, max_file_bytes=1_500_000) as broker:
        async with _client(broker.url, coalition, "GBR-GW1") as gbr:
            await gbr.subscribe("reports.>")
        async with _client(broker.url, coalition, "USA-GW1") as usa:
            refusal = None
            for i in range(2_000):  # each commit adds ~30 KiB of WAL pages: the limit comes first
                try:
                    receipts.append(await usa.publish("reports.load", b"%d" % i + b"x" * 900,
                                                      LABEL))
                except RequestRejected as exc:
                    refusal = exc
                    break
            assert refusal is not None, "the file size limit was never reached"
            assert refusal.code == "unavailable"
            assert "audit log stopped" in refusal.reason or "not stored" in refusal.reason
            # It stays refused (no half-working broker), and the process is still alive.
            again = await _refused(usa)
            assert again.code == "unavailable" and "audit log stopped" in again.reason
        assert broker.process.returncode is None
        assert any(e.get("event") == "audit_log_stopped" for e in broker.events)
    assert len(receipts) >= 20, len(receipts)

    async with running_broker(config) as broker, _client(broker.url, coalition,
                                                         "GBR-GW1") as gbr:
        stream = gbr.messages()
        async with asyncio.timeout(30):
            got = [(await anext(stream)).id for _ in receipts]
        await stream.aclose()
    assert got == [r.id for r in receipts]  # every receipted message, in order, once

    store = SqliteStore(tmp_path / "data" / "broker.sqlite")
    try:
        export_store(store, coalition.broker_name, tmp_path / "export")
    finally:
        store.close()
    report = verify_export(tmp_path / "export", pins=[coalition.root_sha256], quorum=0)
    assert report.ok, report.problems


async def _refused(client: GatewayClient) -> RequestRejected:
    try:
        await client.publish("reports.load", b"after", LABEL)
    except RequestRejected as exc:
        return exc
    raise AssertionError("a publish was accepted after the store failed")
