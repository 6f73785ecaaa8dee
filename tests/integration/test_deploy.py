"""deploy/broker.toml is accepted as it is, and its demo coalition exchanges traffic."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from broker.config import load_config
from broker.server import BrokerServer
from clients.gateway import GatewayClient, label
from clients.identity import KeyFile

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


async def test_example_config_serves_its_demo_coalition(tmp_path: Path) -> None:
    config = load_config(DEPLOY / "broker.toml")
    # Same configuration, but on a free port and a fresh data directory so the test never
    # collides with a running broker or leaves state in deploy/.
    config = dataclasses.replace(
        config, listen=dataclasses.replace(config.listen, port=0),
        broker=dataclasses.replace(config.broker, data_dir=tmp_path / "data"))
    keys = DEPLOY / "demo-coalition" / "keys"
    async with BrokerServer.from_config(config) as server:
        root = server.hub.bundle.trust_root
        # The example's store limits reach the hub as written in the file.
        assert server.hub.max_queued_bytes == config.limits.max_queued_bytes_per_node
        assert server.limits.store.max_store_bytes == config.limits.max_store_bytes
        assert server.limits.store.min_free_bytes == config.limits.min_free_disk_bytes
        assert server.limits.expiry_interval_s == config.limits.expiry_interval_ms / 1000

        def client(node: str) -> GatewayClient:
            return GatewayClient(server.url, KeyFile.read(keys / f"{node}.key"), root,
                                 broker_name=config.broker.name, timeout=5)

        async with client("USA-GW1") as usa, client("GBR-GW1") as gbr:
            await gbr.subscribe("reports.>")
            receipt = await usa.publish("reports.daily", b"all quiet",
                                        label("NATO", "SECRET", "USA", ["GBR"]))
            assert receipt.recipients == {"GBR-GW1": "delivered"}
            stream = gbr.messages()
            message = await asyncio.wait_for(anext(stream), 5)
            await stream.aclose()
            assert message.payload == b"all quiet"
