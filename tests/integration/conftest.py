"""Integration fixtures: a real broker on loopback and real gateway clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from broker import verifier
from broker.audit.commit_policy import CommitPolicy
from broker.coalition import Coalition
from broker.server import BrokerServer, Limits
from clients.gateway import GatewayClient

#: Checkpoints every 50 ms so that witness tests do not wait for the production interval.
FAST_COMMIT = CommitPolicy(max_batch=256, max_delay_s=0.001, checkpoint_interval_s=0.05)


@pytest.fixture
async def server(request: pytest.FixtureRequest, coalition: Coalition,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BrokerServer]:
    """A broker; parametrized indirectly with a number of signature workers (default 0)."""
    workers = getattr(request, "param", 0)
    if workers:
        # Every envelope through a worker, also the lone ones an idle broker checks itself.
        monkeypatch.setattr(verifier, "MIN_BATCH", 1)
    limits = Limits(max_frame_bytes=64 * 1024, handshake_timeout_s=2.0)
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                            limits=limits, commit=FAST_COMMIT,
                            verify_workers=workers) as running:
        yield running


@pytest.fixture
def gateway(coalition: Coalition, server: BrokerServer) -> Callable[[str], GatewayClient]:
    root = coalition.trust_root

    def make(node: str) -> GatewayClient:
        return GatewayClient(server.url, coalition.nodes[node], root,
                             broker_name=coalition.broker_name, timeout=5,
                             max_frame=64 * 1024)

    return make
