"""The admin HTTP API against a real broker: tokens and roles, health, metrics, nodes (suspend,
resume, revoke, with the audit entries they write), queues, policy and audit endpoints."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import re
import signal
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from broker.admin.app import AdminContext, AdminServer
from broker.admin.auth import TokenTable, hash_token, new_token
from broker.audit.leaves import AdminEntry, RouteEntry, entry_from_bytes
from broker.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from broker.coalition import Coalition
from broker.config import AdminToken
from broker.errors import StorageError
from broker.server import BrokerServer, Limits
from broker.store.writer_process import WriterProcess
from clients.auditor import verify_export
from clients.gateway import AuthenticationError, GatewayClient, label
from tests.integration.conftest import FAST_COMMIT

TOKENS = {role: new_token() for role in ("viewer", "auditor", "operator")}
TO_GBR = label("NATO", "SECRET", "USA", ["GBR"])


class Admin:
    """A small client of the admin API that keeps the last response."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url, self.http = url, http

    async def call(self, method: str, path: str, role: str | None = "operator",
                   **kwargs: Any) -> tuple[int, Any]:
        headers = kwargs.pop("headers", {})
        if role is not None:
            headers["Authorization"] = f"Bearer {TOKENS[role]}"
        async with self.http.request(method, self.url + path, headers=headers,
                                     **kwargs) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.read()


def _broker(coalition: Coalition) -> BrokerServer:
    return BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                        key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                        limits=Limits(max_frame_bytes=64 * 1024), commit=FAST_COMMIT,
                        writer_process=True)  # the operator's view of the writer process too


def _admin_server(broker: BrokerServer, coalition: Coalition) -> AdminServer:
    async def reload() -> Any:
        return await broker.reload(coalition.policy_dir, pinned_root_sha256=coalition.root_sha256)

    tokens = TokenTable(AdminToken(f"{role}-token", role, hash_token(token))
                        for role, token in TOKENS.items())
    return AdminServer(AdminContext(broker, reload), tokens, port=0)


@pytest.fixture
async def broker(coalition: Coalition) -> AsyncIterator[BrokerServer]:
    async with _broker(coalition) as running:
        yield running


@pytest.fixture
async def admin(broker: BrokerServer, coalition: Coalition) -> AsyncIterator[Admin]:
    async with _admin_server(broker, coalition) as server, aiohttp.ClientSession() as http:
        yield Admin(server.url, http)


@pytest.fixture
def gateway(coalition: Coalition, broker: BrokerServer) -> Callable[[str], GatewayClient]:
    def make(node: str) -> GatewayClient:
        return GatewayClient(broker.url, coalition.nodes[node], coalition.trust_root,
                             broker_name=coalition.broker_name, timeout=5)
    return make


def _admin_entries(broker: BrokerServer) -> list[AdminEntry]:
    return [e for _, data in broker.audit.store.iter_entries()
            if isinstance(e := entry_from_bytes(data), AdminEntry)]


# --- tokens and roles -------------------------------------------------------------------------


async def test_health_is_public_and_everything_else_needs_a_token(admin: Admin) -> None:
    assert await admin.call("GET", "/healthz", role=None) == (200, {"status": "ok"})
    assert await admin.call("GET", "/readyz", role=None) == (200, {"status": "ready"})
    status, body = await admin.call("GET", "/v1/status", role=None)
    assert (status, body["error"]) == (401, "unauthorized")
    status, body = await admin.call("GET", "/v1/status", role=None,
                                    headers={"Authorization": "Bearer cbt_not-a-token"})
    assert (status, body["error"]) == (401, "unauthorized")
    async with admin.http.get(admin.url + "/v1/status") as response:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_stalled_disk_makes_the_broker_not_ready_until_the_commit_returns(
        admin: Admin, broker: BrokerServer, gateway: Callable[[str], GatewayClient]) -> None:
    broker.audit.policy = dataclasses.replace(broker.audit.policy, stall_s=0.2)
    writer = broker.audit.writer
    assert isinstance(writer, WriterProcess)
    async with gateway("USA-GW1") as usa:
        writer.process.send_signal(signal.SIGSTOP)  # a disk whose fsync does not return
        valve = threading.Timer(15, writer.process.send_signal, (signal.SIGCONT,))
        valve.start()
        try:
            publishing = asyncio.create_task(
                usa.publish("reports.daily", b"x", label("NATO", "SECRET", "USA", ["GBR"])))
            async with asyncio.timeout(5):
                while (status := await admin.call("GET", "/readyz", role=None))[0] == 200:
                    await asyncio.sleep(0.05)
            assert status[0] == 503 and status[1]["error"] == "not_ready"
            assert "audit commit has been running" in status[1]["detail"]
            # Liveness is another question: the process answers.
            assert await admin.call("GET", "/healthz", role=None) == (200, {"status": "ok"})
        finally:
            valve.cancel()
            writer.process.send_signal(signal.SIGCONT)
        await asyncio.wait_for(publishing, 10)
    # Back to the production threshold: a checkpoint's fsync may take over 0.2 s on slow CI.
    broker.audit.policy = dataclasses.replace(broker.audit.policy, stall_s=5.0)
    assert await admin.call("GET", "/readyz", role=None) == (200, {"status": "ready"})


@pytest.mark.parametrize(("role", "method", "path", "expected"), [
    ("viewer", "GET", "/v1/status", 200),
    ("viewer", "GET", "/v1/audit/entries", 403),
    ("viewer", "POST", "/v1/nodes/GBR-GW1/suspend", 403),
    ("auditor", "GET", "/v1/audit/entries", 200),
    ("auditor", "POST", "/v1/policy/reload", 403),
    ("operator", "GET", "/v1/audit/entries", 403),
    ("operator", "GET", "/metrics", 200),
])
async def test_roles(admin: Admin, role: str, method: str, path: str, expected: int) -> None:
    status, body = await admin.call(method, path, role=role)
    assert status == expected
    if expected == 403:
        assert body["error"] == "forbidden" and role in body["detail"]


async def test_errors_are_json_with_a_request_id(admin: Admin) -> None:
    async with admin.http.get(admin.url + "/v1/nowhere",
                              headers={"X-Request-Id": "trace-42"}) as response:
        assert response.status == 404
        assert await response.json() == {"error": "not_found", "detail": "Not Found"}
        assert response.headers["X-Request-Id"] == "trace-42"
    status, body = await admin.call("GET", "/v1/nodes/NOPE-GW1")
    assert (status, body["error"]) == (404, "not_found")
    status, body = await admin.call("POST", "/v1/policy/decide", data=b"not json")
    assert (status, body["error"]) == (400, "bad_request")


# --- nodes ----------------------------------------------------------------------------------


async def test_suspended_node_is_cut_off_within_a_second_and_refused_until_resumed(
        admin: Admin, broker: BrokerServer, gateway: Callable[[str], GatewayClient]) -> None:
    async with gateway("GBR-GW1") as gbr, gateway("USA-GW1") as usa:
        await gbr.subscribe("reports.>")
        status, body = await admin.call("GET", "/v1/nodes/GBR-GW1")
        assert (status, body["online"], body["status"]) == (200, True, "active")
        status, body = await admin.call("POST", "/v1/nodes/GBR-GW1/suspend")
        assert (status, body["status"]) == (200, "suspended")
        async with asyncio.timeout(1):  # disconnected within 1 s, and not reconnected
            while gbr.failure is None:
                await asyncio.sleep(0.01)
        assert gbr.failure.code == "node_inactive"
        receipt = await usa.publish("reports.daily", b"x", TO_GBR)
        assert receipt.recipients == {"GBR-GW1": "denied:node_inactive"}
    with pytest.raises(AuthenticationError) as refused:
        async with gateway("GBR-GW1"):
            pass
    assert refused.value.code == "node_inactive"
    status, body = await admin.call("POST", "/v1/nodes/GBR-GW1/resume")
    assert (status, body["status"]) == (200, "active")
    async with gateway("GBR-GW1"):
        pass  # welcome again
    entries = [(e.operator, e.action, e.target, e.outcome) for e in _admin_entries(broker)]
    assert entries == [("operator-token", "suspend", "GBR-GW1", "ok"),
                       ("operator-token", "resume", "GBR-GW1", "ok")]


async def test_revoked_node_cannot_be_resumed_and_refusals_are_audited(
        admin: Admin, broker: BrokerServer, coalition: Coalition) -> None:
    assert (await admin.call("POST", "/v1/nodes/FRA-GW1/revoke"))[0] == 200
    status, body = await admin.call("POST", "/v1/nodes/FRA-GW1/resume")
    assert (status, body["error"]) == (409, "conflict")
    status, _ = await admin.call("POST", "/v1/nodes/NOPE-GW1/suspend")
    assert status == 404
    assert [(e.action, e.target, e.outcome) for e in _admin_entries(broker)] == [
        ("revoke", "FRA-GW1", "ok"), ("resume", "FRA-GW1", "refused:conflict"),
        ("suspend", "NOPE-GW1", "refused:not_found")]
    await broker.stop()
    async with _broker(coalition) as again:  # the status is durable
        assert again.hub.statuses == {"FRA-GW1": "revoked"}
        assert again.hub.is_inactive("FRA-GW1")


# --- metrics, queues, policy -----------------------------------------------------------------


async def test_metrics_count_publishes_decisions_queues_and_commits(
        admin: Admin, gateway: Callable[[str], GatewayClient]) -> None:
    async with gateway("GBR-GW1") as gbr:
        await gbr.subscribe("reports.>")
    async with gateway("USA-GW1") as usa, gateway("FRA-GW1") as fra:
        await fra.subscribe("reports.>")
        await usa.publish("reports.daily", b"x", TO_GBR, precedence="FLASH")
        status, text = await admin.call("GET", "/metrics", role="viewer")
    assert status == 200
    metrics = text.decode()
    assert 'coalition_publishes_total{outcome="receipted"} 1.0' in metrics
    assert 'coalition_decisions_total{reason="",result="permit"} 1.0' in metrics
    assert 'coalition_decisions_total{reason="not_in_audience",result="deny"} 1.0' in metrics
    assert 'coalition_queue_depth{precedence="FLASH"} 1.0' in metrics
    assert "coalition_audit_commit_seconds_count" in metrics
    assert "coalition_connections 2.0" in metrics
    status, body = await admin.call("GET", "/v1/queues", role="viewer")
    assert body["total"] == 1 and body["queues"][0]["node"] == "GBR-GW1"
    assert body["queues"][0]["by_precedence"] == {"FLASH": 1}


async def test_metrics_sample_the_event_loops_lag(admin: Admin) -> None:
    # The probe samples every 0.1 s from the broker's start: a few samples within seconds.
    async with asyncio.timeout(10):
        while True:
            status, text = await admin.call("GET", "/metrics", role="viewer")
            samples = re.search(rb"^coalition_event_loop_lag_seconds_count (\S+)$", text, re.M)
            assert status == 200 and samples is not None
            if float(samples[1]) >= 3:
                break
            await asyncio.sleep(0.1)


async def test_policy_view_documents_and_decision_dry_run(admin: Admin,
                                                           broker: BrokerServer) -> None:
    status, body = await admin.call("GET", "/v1/policy", role="viewer")
    assert status == 200 and body["bundle"] == broker.hub.bundle.hash.hex()
    assert body["trust_root"]["nations"] == ["FRA", "GBR", "USA"]
    status, body = await admin.call("GET", "/v1/policy/documents", role="viewer")
    assert "trust-root.toml" in {d["name"] for d in body["documents"]}
    query = {"label": {"policy": "NATO", "class": "SECRET", "orig": "USA", "rel": ["GBR"],
                       "cats": {}}, "sender": "USA-GW1", "topic": "reports.daily"}
    status, body = await admin.call("POST", "/v1/policy/decide", role="viewer",
                                    json={**query, "recipient": "GBR-GW1"})
    assert (status, body["permit"]) == (200, True)
    status, body = await admin.call("POST", "/v1/policy/decide", role="viewer",
                                    json={**query, "recipient": "FRA-GW1"})
    assert (body["permit"], body["reasons"]) == (False, ["not_in_audience"])


async def test_reload_is_audited_with_the_operator(admin: Admin, broker: BrokerServer) -> None:
    status, body = await admin.call("POST", "/v1/policy/reload")
    assert (status, body["changed"]) == (200, False)
    (entry,) = _admin_entries(broker)
    assert (entry.operator, entry.action, entry.outcome) == ("operator-token", "reload",
                                                             "unchanged")


# --- audit ----------------------------------------------------------------------------------


async def test_audit_entries_and_proofs_verify_against_the_log(
        admin: Admin, broker: BrokerServer, gateway: Callable[[str], GatewayClient]) -> None:
    async with gateway("USA-GW1") as usa:
        receipt = await usa.publish("reports.daily", b"x", TO_GBR)
    async with asyncio.timeout(5):
        while broker.audit.latest is None or broker.audit.latest.size <= receipt.audit:
            await asyncio.sleep(0.02)
    status, body = await admin.call("GET", "/v1/audit/checkpoint", role="viewer")
    size = body["size"]
    status, body = await admin.call("GET", f"/v1/audit/entries?start={receipt.audit}"
                                    f"&end={receipt.audit + 1}", role="auditor")
    (item,) = body["entries"]
    raw = base64.b64decode(item["entry"] and item["raw"])
    entry = entry_from_bytes(raw)
    assert isinstance(entry, RouteEntry) and entry.id == receipt.id
    assert item["entry"]["id"] == receipt.id.hex()
    status, proof = await admin.call(
        "GET", f"/v1/audit/proofs/inclusion?index={receipt.audit}&size={size}", role="auditor")
    root = broker.audit.root(size)
    verify_inclusion(receipt.audit, size, leaf_hash(raw), [bytes.fromhex(h)
                                                           for h in proof["proof"]], root)
    status, proof = await admin.call("GET", f"/v1/audit/proofs/consistency?old=1&new={size}",
                                     role="auditor")
    verify_consistency(1, size, broker.audit.root(1), root,
                       [bytes.fromhex(h) for h in proof["proof"]])
    status, body = await admin.call("GET", f"/v1/audit/proofs/inclusion?index={size}&size={size}",
                                    role="auditor")
    assert (status, body["error"]) == (400, "bad_request")


async def test_export_is_a_tar_the_auditor_verifies(
        admin: Admin, coalition: Coalition, broker: BrokerServer, tmp_path: Path,
        gateway: Callable[[str], GatewayClient]) -> None:
    async with gateway("USA-GW1") as usa:
        receipt = await usa.publish("reports.daily", b"x", TO_GBR)
    async with asyncio.timeout(5):
        while broker.audit.latest is None or broker.audit.latest.size <= receipt.audit:
            await asyncio.sleep(0.02)
    status, data = await admin.call("GET", "/v1/audit/export", role="auditor")
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(tmp_path, filter="data")
    report = verify_export(tmp_path / "audit-export", pins=[coalition.root_sha256], quorum=0)
    assert report.ok, report.problems
    assert report.entries >= 3


async def test_logs_carry_request_ids_and_the_token_name_never_the_token(
        admin: Admin, gateway: Callable[[str], GatewayClient]) -> None:
    with capture_logs(processors=[merge_contextvars]) as logs:
        await admin.call("POST", "/v1/nodes/GBR-GW1/suspend",
                         headers={"X-Request-Id": "ops-7"})
        await admin.call("GET", "/v1/status", role="viewer")
        await admin.call("GET", "/v1/status", role=None,
                         headers={"Authorization": "Bearer cbt_wrong-secret"})
    text = repr(logs)
    assert not any(token in text for token in TOKENS.values())
    assert "cbt_wrong-secret" not in text
    requests = [e for e in logs if e["event"] == "admin_request"]
    assert [(e["path"], e["status"], e["token"]) for e in requests] == [
        ("/v1/nodes/GBR-GW1/suspend", 200, "operator-token"),
        ("/v1/status", 200, "viewer-token"), ("/v1/status", 401, None)]
    changed = next(e for e in logs if e["event"] == "node_status_changed")
    assert changed["request_id"] == "ops-7"  # bound for every line of the request


async def test_a_route_that_declares_no_permission_is_refused_not_public(
        broker: BrokerServer, coalition: Coalition) -> None:
    server = _admin_server(broker, coalition)

    async def naked(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"secret": True})

    server.app.router.add_get("/v1/naked", naked)
    async with server, aiohttp.ClientSession() as http:
        admin = Admin(server.url, http)
        for role in (None, "operator"):
            status, body = await admin.call("GET", "/v1/naked", role=role)
            assert (status, body["error"]) == (403, "forbidden")


async def test_a_resume_that_is_not_recorded_is_undone(admin: Admin, broker: BrokerServer) -> None:
    assert (await admin.call("POST", "/v1/nodes/GBR-GW1/suspend"))[0] == 200
    real = broker.audit.append

    def failing(entry: Any, **kwargs: Any) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.set_exception(StorageError("commit failed: disk I/O error"))
        return future

    broker.audit.append = failing  # type: ignore[method-assign]
    try:
        status, body = await admin.call("POST", "/v1/nodes/GBR-GW1/resume")
    finally:
        broker.audit.append = real  # type: ignore[method-assign]
    assert (status, body["error"]) == (503, "unavailable")
    assert broker.hub.is_inactive("GBR-GW1") and broker.hub.statuses["GBR-GW1"] == "suspended"
