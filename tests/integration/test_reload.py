"""Policy reload: a good bundle is activated through the one seam (a ``policy`` audit entry); a
refused bundle changes nothing; SIGHUP and ``coalition broker reload`` reach a running process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker.audit.leaves import PolicyEntry, entry_from_bytes
from broker.cli import main
from broker.coalition import Coalition
from broker.errors import PolicyDocumentError
from broker.server import BrokerServer
from clients.gateway import GatewayClient
from clients.identity import KeyFile
from tests.integration.process import running_broker, write_broker_config


def _certify_new_node(coalition: Coalition, tmp_path: Path, node: str = "USA-GW7") -> Path:
    key = tmp_path / f"{node}.key"
    cert = coalition.policy_dir / "nodes" / f"{node}.toml"
    assert main(["keys", "gen", "--kind", "node", "--name", node, "--out", str(key)]) == 0
    assert main(["keys", "cert", "--node-key", str(key), "--nation", "USA", "--max", "SECRET",
                 "--out", str(cert)]) == 0
    assert main(["keys", "sign", str(cert), "--key",
                 str(coalition.keys_dir / "authority-USA.key")]) == 0
    return key


def _policy_entries(server: BrokerServer) -> list[bytes]:
    entries = [entry_from_bytes(e) for e in server.audit.store.entries(0, server.audit.size)]
    return [e.bundle for e in entries if isinstance(e, PolicyEntry)]


async def test_reload_activates_a_new_bundle_and_logs_it(
        server: BrokerServer, coalition: Coalition, tmp_path: Path) -> None:
    before = server.bundle.hash
    key = _certify_new_node(coalition, tmp_path)
    bundle = await server.reload(coalition.policy_dir, pinned_root_sha256=coalition.root_sha256)
    assert bundle.hash != before and server.hub.bundle is bundle
    assert _policy_entries(server) == [before, bundle.hash]
    assert server.audit.store.bundle(bundle.hash) is not None  # kept for replay
    async with GatewayClient(server.url, KeyFile.read(key), coalition.trust_root,
                             broker_name=coalition.broker_name, timeout=5) as new_node:
        assert new_node.welcome is not None


async def test_refused_bundle_changes_nothing(server: BrokerServer, coalition: Coalition,
                                              tmp_path: Path) -> None:
    before = server.bundle
    _certify_new_node(coalition, tmp_path)
    agreement = next((coalition.policy_dir / "agreements").glob("*.toml"))
    agreement.write_bytes(agreement.read_bytes().replace(b"SECRET", b"SECRXT", 1))
    with pytest.raises(PolicyDocumentError, match="agreements/"):
        await server.reload(coalition.policy_dir, pinned_root_sha256=coalition.root_sha256)
    assert server.bundle is before and server.hub.bundle is before
    assert "USA-GW7" not in server.hub.bundle.nodes
    assert _policy_entries(server) == [before.hash]


async def test_sighup_through_broker_reload_command(coalition: Coalition, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = write_broker_config(tmp_path, coalition)
    async with running_broker(config) as broker:
        key = _certify_new_node(coalition, tmp_path)
        assert main(["broker", "reload", "--config", str(config)]) == 0
        new_hash = capsys.readouterr().out.split("policy bundle ")[1].split(";")[0]
        async with asyncio.timeout(10):
            while not any(e.get("event") == "policy_activated" and e.get("bundle") == new_hash
                          for e in broker.events):
                await asyncio.sleep(0.05)
        async with GatewayClient(broker.url, KeyFile.read(key), coalition.trust_root,
                                 broker_name=coalition.broker_name, timeout=5) as new_node:
            assert new_node.welcome is not None
