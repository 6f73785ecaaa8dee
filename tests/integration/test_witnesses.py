"""Gateways witness the audit log: they cosign consistent checkpoints, and catch a forked one."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from broker.audit.note import parse_note, verify_cosignature
from broker.audit.witness import Equivocation
from broker.coalition import Coalition
from broker.errors import VerificationError
from broker.server import BrokerServer
from broker.witnesses import witness_verifier
from clients.gateway import GatewayClient, RequestRejected, label
from tests.integration.conftest import FAST_COMMIT

LABEL = label("NATO", "SECRET", "USA", ["GBR"])


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def _cosigned_past(server: BrokerServer, index: int, nodes: set[str]) -> bool:
    """The latest checkpoint covers entry ``index`` and ``nodes`` cosigned it."""
    latest = server.audit.latest
    return latest is not None and latest.size > index and nodes <= set(latest.cosignatures)


def _client(server: BrokerServer, coalition: Coalition, node: str, state: Path,
            alarms: list[Equivocation] | None = None) -> GatewayClient:
    return GatewayClient(server.url, coalition.nodes[node], coalition.trust_root,
                         broker_name=coalition.broker_name, timeout=5, state_dir=state,
                         on_alarm=None if alarms is None else alarms.append)


async def test_gateways_cosign_checkpoints_and_the_broker_keeps_the_cosignatures(
        server: BrokerServer, coalition: Coalition, tmp_path: Path) -> None:
    async with _client(server, coalition, "USA-GW1", tmp_path / "usa") as usa, \
            _client(server, coalition, "GBR-GW1", tmp_path / "gbr") as gbr:
        await gbr.subscribe("reports.>")
        receipt = await usa.publish("reports.daily", b"quiet", LABEL)
        await _until(lambda: _cosigned_past(server, receipt.audit, {"USA-GW1", "GBR-GW1"}),
                     "both gateways cosign the checkpoint that covers the publish")
    latest = server.audit.latest
    assert latest is not None
    text = parse_note(latest.note).text
    for node, line in latest.cosignatures.items():
        verify_cosignature(text, line, witness_verifier(server.bundle.nodes[node]))
    stored = server.audit.store.latest_checkpoint()
    assert stored is not None and set(stored.cosignatures) >= {"USA-GW1", "GBR-GW1"}
    assert (tmp_path / "usa" / "witness.json").exists()


async def _fork(coalition: Coalition, data_dir: Path,
                work: Callable[[BrokerServer], Awaitable[None]]) -> None:
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=data_dir,
                            commit=FAST_COMMIT) as server:
        await work(server)


async def test_a_broker_showing_two_logs_is_caught_by_the_witness(
        coalition: Coalition, tmp_path: Path) -> None:
    """The same broker key runs two diverging logs; one witness sees both."""
    state = tmp_path / "gbr-witness"
    alarms: list[Equivocation] = []

    async def traffic(server: BrokerServer, payload: bytes) -> None:
        async with _client(server, coalition, "USA-GW1", tmp_path / f"usa-{payload!r}") as usa:
            for _ in range(3):
                await usa.publish("reports.daily", payload, LABEL)
        # Both forks then show the witness a checkpoint of the same size, different roots.
        await _until(lambda: server.audit.latest is not None
                     and server.audit.latest.size == server.audit.size, "checkpoint covers all")
        async with _client(server, coalition, "GBR-GW1", state, alarms) as gbr:
            await _until(lambda: gbr.cosigned > 0 or bool(alarms), "a checkpoint is judged")

    await _fork(coalition, tmp_path / "fork-a", lambda s: traffic(s, b"fork a"))
    assert not alarms
    await _fork(coalition, tmp_path / "fork-b", lambda s: traffic(s, b"fork b"))
    # Without the alarm, the witness would have cosigned a contradicting checkpoint. Which
    # contradiction it sees first depends on timing: fork b's checkpoint has the size of one
    # the witness cosigned on fork a (two roots), or a smaller one if fork a's log had grown
    # by the witness's own session entries meanwhile (a rollback). Either is the fork.
    assert alarms
    assert "two different roots" in alarms[0].reason or "(rollback)" in alarms[0].reason
    evidence = sorted(state.glob("evidence-*"))
    assert evidence and (evidence[0] / "cosigned.note").exists()
    assert (evidence[0] / "offered.note").read_text() == alarms[0].offered


async def test_sender_proves_its_message_was_logged(server: BrokerServer, coalition: Coalition,
                                                    tmp_path: Path) -> None:
    async with _client(server, coalition, "USA-GW1", tmp_path / "usa") as usa, \
            _client(server, coalition, "GBR-GW1", tmp_path / "gbr") as gbr:
        await gbr.subscribe("reports.>")
        receipt = await usa.publish("reports.daily", b"quiet", LABEL)
        await _until(lambda: _cosigned_past(server, receipt.audit, {"USA-GW1"}),
                     "a checkpoint USA cosigned covers it")
        checkpoint = await usa.prove(receipt)
        assert checkpoint.size > receipt.audit
        # Another node's entry is not served: it is that nation's metadata.
        with pytest.raises(RequestRejected) as caught:
            await gbr.prove(receipt)
        assert caught.value.code == "unexpected_frame"
        # A broker that answers with another entry is caught by the client.
        forged = dataclasses.replace(receipt, id=b"\x00" * 16)
        with pytest.raises(VerificationError, match="not this message"):
            await usa.prove(forged)
