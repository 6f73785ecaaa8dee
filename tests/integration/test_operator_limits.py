"""What the broker's operator cannot do (issue 8, item 6), end to end against a real broker and
its admin API.

The threat: the operator runs the broker. They hold the most powerful admin token (role
``operator``), the broker's data directory and signing key on disk, and the policy directory the
broker loads. The design (DESIGN §1, §4, §8, §10) says that still does not let them read what the
nations exchange, widen what the nations agreed to share, or rewrite the record of what happened
without the nations noticing. This module is the one place that shows each limit as a story:

1. **No payloads.** Every admin endpoint the operator's token reaches (walked from the OpenAPI
   document, with sample parameters), and the audit export, return after real traffic neither
   the plaintext, nor the payload's content key, nor the ciphertext or the sealed keys: audit
   entries carry the label (metadata), the SHA-256 of the envelope and the decisions, nothing
   else; queues are reported as counts. Even the SQLite store on disk holds only ciphertext
   sealed to the recipients' X25519 keys.
2. **No policy of their own.** A policy directory whose agreement lacks a party's signature (a
   missing ``.sig`` line, or a widened agreement re-signed by only some parties), a node
   certificate signed by another nation, or a trust root below its threshold is refused by the
   reload endpoint with an error naming the missing signer; the previous bundle stays in force
   (same hash, same decisions) and no ``policy`` entry is written, only the refused ``admin`` one.
3. **No silent rewrite of the log.** With the broker stopped, deleting or rewriting an entry in
   the store makes the broker refuse to start (the log no longer extends its last signed
   checkpoint). An operator careful enough to also remove the checkpoints gets a broker that
   starts, but a gateway that witnessed the log raises the alarm (rollback), an auditor holding
   an earlier cosigned checkpoint flags the export offline, and no consistency proof from that
   checkpoint to one signed after the truncation verifies. The admin API has no way to append
   an entry, and every operator action, refused ones included, is an ``admin`` entry naming the
   operator's token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import io
import json
import sqlite3
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nacl.public
import pytest
from structlog.testing import capture_logs

from broker.audit.leaves import AdminEntry, Entry, PolicyEntry, RouteEntry, entry_from_bytes
from broker.audit.log import LogDamaged
from broker.audit.merkle import leaf_hash, verify_consistency
from broker.audit.note import Verifier, add_signatures
from broker.audit.witness import Equivocation, check_offered_checkpoint, verify_log_checkpoint
from broker.coalition import DAY_MS, Coalition, NodeSpec, build_coalition
from broker.envelope import Envelope, build_envelope
from broker.errors import VerificationError
from broker.server import BrokerServer, Limits
from broker.store.base import Batch
from broker.store.sqlite import SqliteStore
from clients.auditor import Report, verify_export
from clients.export import export_store
from clients.gateway import Expired, GatewayClient, Receipt, label
from clients.identity import KeyFile
from clients.witness import broker_log_key
from policies import authoring
from policies.model import Agreement, Tier
from tests.integration.conftest import FAST_COMMIT
from tests.integration.test_admin import TOKENS, Admin, _admin_entries, _admin_server, _broker

#: The payload of the traffic: it must never come out of an operator interface.
MARKER = b"OPERATOR-MUST-NOT-READ-THIS-5e1d"
TO_GBR = label("NATO", "SECRET", "USA", ["GBR"])
OPERATOR = "operator-token"  # the name test_admin's operator token is configured under


@dataclasses.dataclass
class Running:
    """A broker with its admin listener and an HTTP session to call it."""

    broker: BrokerServer
    admin: Admin
    coalition: Coalition


@pytest.fixture
async def running(coalition: Coalition) -> AsyncIterator[Running]:
    """A broker on the shared test coalition, with test_admin's viewer, auditor and operator
    tokens."""
    async with _broker(coalition) as broker, _admin_server(broker, coalition) as server, \
            aiohttp.ClientSession() as http:
        yield Running(broker, Admin(server.url, http), coalition)


def gateway(broker: BrokerServer, coalition: Coalition, node: str,
            state: Path | None = None, alarms: list[Equivocation] | None = None
            ) -> GatewayClient:
    """A gateway client of ``node`` (a witness keeping its state in ``state``)."""
    return GatewayClient(broker.url, coalition.nodes[node], coalition.trust_root,
                         broker_name=coalition.broker_name, timeout=5, state_dir=state,
                         on_alarm=None if alarms is None else alarms.append)


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    """Wait (at most ``timeout`` s) until ``predicate`` holds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def raw_call(admin: Admin, method: str, path: str, role: str | None,
                   **kwargs: Any) -> tuple[int, bytes]:
    """Call the admin API with ``role``'s token; the status and the exact body bytes."""
    headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role is not None else {}
    async with admin.http.request(method, admin.url + path, headers=headers,
                                  **kwargs) as response:
        return response.status, await response.read()


def entries(broker: BrokerServer) -> list[Entry]:
    """Every durable entry of the broker's log, decoded."""
    return [entry_from_bytes(d) for d in broker.audit.store.entries(0, broker.audit.size)]


# --- 1. no payloads ---------------------------------------------------------------------------


def _encodings(secret: bytes) -> Iterator[bytes]:
    """``secret`` as it could appear in a response: raw, hex, base64 (standard, URL-safe)."""
    yield secret
    yield secret.hex().encode()
    yield secret.hex().upper().encode()
    yield base64.b64encode(secret)
    yield base64.urlsafe_b64encode(secret)


def _decoded_strings(value: Any) -> Iterator[bytes]:
    """Every string inside a JSON value, as bytes and, where it decodes, hex- or
    base64-decoded (an entry's ``raw`` field is base64 of the whole entry: a secret inside it
    would not show as its own base64)."""
    if isinstance(value, str):
        yield value.encode()
        yield from _decoded(bytes.fromhex, value)
        yield from _decoded(lambda text: base64.b64decode(text, validate=True), value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _decoded_strings(key)
            yield from _decoded_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _decoded_strings(item)


def _decoded(decode: Callable[[str], bytes], text: str) -> list[bytes]:
    """``[decode(text)]``, or ``[]`` when ``text`` is not in that encoding."""
    try:
        return [decode(text)]
    except (binascii.Error, ValueError):
        return []


def _json(body: bytes) -> list[Any]:
    """``[the parsed JSON]``, or ``[]`` when ``body`` is not JSON."""
    try:
        return [json.loads(body)]
    except ValueError:
        return []


def _blobs(body: bytes) -> Iterator[bytes]:
    """``body`` and everything inside it: JSON strings decoded, tar members extracted."""
    yield body
    for parsed in _json(body):
        yield from _decoded_strings(parsed)
    if body[257:262] == b"ustar":
        with tarfile.open(fileobj=io.BytesIO(body)) as archive:
            for member in archive.getmembers():
                extracted = archive.extractfile(member)
                if extracted is not None:
                    yield from _blobs(extracted.read())


def exposed(body: bytes, secrets: dict[str, bytes]) -> list[str]:
    """The names of the ``secrets`` found anywhere in ``body``, in any encoding."""
    blobs = list(_blobs(body))
    return sorted(name for name, secret in secrets.items()
                  if any(form in blob for blob in blobs for form in _encodings(secret)))


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One real publish and everything about it that must stay secret."""

    env: bytes
    audit: int
    secrets: dict[str, bytes]


async def marked_traffic(run: Running) -> Traffic:
    """USA-GW1 publishes :data:`MARKER` to GBR-GW1 (online: delivered and acknowledged) and
    USA-GW2 (offline: queued, so its ciphertext sits in the store); the content key is
    recovered as GBR-GW1 would. Waits until a checkpoint covers everything."""
    c = run.coalition
    keys = {n: c.nodes[n].enc_public for n in ("GBR-GW1", "USA-GW2")}
    env = build_envelope(signing_key=c.nodes["USA-GW1"].signing_key, sender="USA-GW1",
                         topic="reports.daily", payload=MARKER, label=TO_GBR, prec=3, ttl=3600,
                         recipient_keys=keys, now_ms=time.time_ns() // 1_000_000,
                         to=("GBR-GW1", "USA-GW2"))
    parsed = Envelope.from_bytes(env)
    gbr_key = c.nodes["GBR-GW1"].enc_key
    assert gbr_key is not None
    content_key = nacl.public.SealedBox(gbr_key).decrypt(parsed.keys["GBR-GW1"])
    async with gateway(run.broker, c, "USA-GW1") as usa, \
            gateway(run.broker, c, "GBR-GW1") as gbr:
        receipt = await usa.publish_envelope(env)
        assert receipt.recipients == {"GBR-GW1": "delivered", "USA-GW2": "queued"}
        stream = gbr.messages()
        message = await asyncio.wait_for(anext(stream), 5)
        await stream.aclose()
        assert message.payload == MARKER  # the recipient can read it: the secrets are real
        await until(lambda: any(e.KIND == "deliver" for e in entries(run.broker)))
    await until(lambda: run.broker.audit.latest is not None
                and run.broker.audit.latest.size > receipt.audit)
    secrets = {"plaintext": MARKER, "content key": content_key, "ciphertext": parsed.ct,
               "sealed key": parsed.keys["GBR-GW1"], "envelope": env}
    return Traffic(env, receipt.audit, secrets)


def _sample_query(name: str, traffic: Traffic, size: int) -> int:
    """A sensible value for each query parameter the OpenAPI document names."""
    return {"start": 0, "end": size, "index": traffic.audit, "size": size, "old": 1,
            "new": size}[name]


async def _walk(run: Running, traffic: Traffic, role: str
                ) -> list[tuple[str, str, int, bytes]]:
    """Call every GET route of the OpenAPI document (every node for ``{node}``, sample query
    parameters), plus the two read-only POSTs (decision dry run, reload), with ``role``'s token:
    ``(method, path, status, body)``."""
    status, doc = await run.admin.call("GET", "/v1/openapi.json", role=None)
    assert status == 200
    size = run.broker.audit.size
    calls = []
    for path, operations in sorted(doc["paths"].items()):
        for method, operation in sorted(operations.items()):
            if method == "post" and operation["operationId"] not in ("decide", "reloadPolicy"):
                continue  # suspend / resume / revoke: part 3 shows they are audited
            query = {p["name"]: str(_sample_query(p["name"], traffic, size))
                     for p in operation.get("parameters", []) if p.get("in") == "query"}
            body = None
            if "requestBody" in operation:
                examples = operation["requestBody"]["content"]["application/json"]["examples"]
                body = next(iter(examples.values()))["value"]
            nodes = sorted(run.broker.hub.bundle.nodes) if "{node}" in path else [""]
            for node in nodes:
                target = path.replace("{node}", node)
                status, data = await raw_call(run.admin, method.upper(), target, role,
                                              params=query, json=body)
                calls.append((method.upper(), target, status, data))
    return calls


async def test_no_admin_endpoint_returns_a_payload(running: Running) -> None:
    """Entries carry labels and hashes only (``route``: the label, SHA-256 of the envelope,
    the decisions; ``deliver``: id, recipient, seq); queues are counts; nothing decrypts."""
    with capture_logs() as logs:
        traffic = await marked_traffic(running)
        calls = await _walk(running, traffic, "operator")
    permissions = {path: {m.upper(): op["x-permission"] for m, op in ops.items()}
                   for path, ops in (await running.admin.call("GET", "/v1/openapi.json",
                                                              role=None))[1]["paths"].items()}
    reached = []
    for method, path, status, body in calls:
        template = next(t for t in permissions if _matches(t, path))
        if permissions[template][method] == "audit":
            assert status == 403, (path, status)  # the operator may not read the log
        else:
            assert status == 200, (path, status, body[:200])
            reached.append(path)
        # Why nothing can leak: no interface reads the queue's envelopes (queues are counts),
        # and audit entries carry labels and hashes only (a route entry holds the label, the
        # SHA-256 of the envelope and the decisions; a deliver entry the id, recipient, seq).
        assert exposed(body, traffic.secrets) == [], path
    assert {"/v1/status", "/v1/nodes/GBR-GW1", "/v1/queues", "/v1/policy/documents",
            "/v1/audit/checkpoint", "/metrics", "/v1/policy/decide"} <= set(reached)
    # The log itself, as an auditor (who may) fetches it, the export tar included.
    audit_calls = [c for c in await _walk(running, traffic, "auditor")
                   if c[1].startswith("/v1/audit/")]
    assert {(path, status) for _, path, status, _ in audit_calls} >= {
        ("/v1/audit/entries", 200), ("/v1/audit/export", 200),
        ("/v1/audit/proofs/inclusion", 200), ("/v1/audit/proofs/consistency", 200)}
    for _, path, _, body in audit_calls:
        assert exposed(body, traffic.secrets) == [], path
    export = next(body for _, path, _, body in audit_calls if path == "/v1/audit/export")
    assert b"ustar" in export[:512] and len(list(_blobs(export))) > 5  # the tar was opened
    # What an entry does carry about the message: its label and the envelope's hash.
    _, listed = await running.admin.call(
        "GET", f"/v1/audit/entries?start={traffic.audit}&end={traffic.audit + 1}",
        role="auditor")
    (item,) = listed["entries"]
    assert isinstance(entry_from_bytes(base64.b64decode(item["raw"])), RouteEntry)
    assert set(item["entry"]) == {"id", "env", "from", "topic", "label", "prec", "ttl",
                                  "bundle", "sealed", "decisions"}
    assert item["entry"]["label"] == TO_GBR.to_map()
    assert bytes.fromhex(item["entry"]["env"]) == hashlib.sha256(traffic.env).digest()
    assert exposed(repr(logs).encode(), traffic.secrets) == []  # nor do the broker's logs


def _matches(template: str, path: str) -> bool:
    """Whether ``path`` is an instance of the OpenAPI path ``template``."""
    want, have = template.split("/"), path.split("/")
    return len(want) == len(have) and all(
        w == h or (w.startswith("{") and w.endswith("}")) for w, h in zip(want, have, strict=True))


async def test_the_store_on_disk_holds_no_plaintext_and_no_content_key(
        running: Running) -> None:
    """The operator's disk access: the SQLite files hold the queued envelope for the offline
    recipient, ciphertext sealed to its X25519 key, and never the plaintext or the content
    key."""
    traffic = await marked_traffic(running)
    await running.broker.audit.write(Batch())
    data_dir = running.broker.data_dir
    disk = b"".join(p.read_bytes() for p in sorted(data_dir.glob("broker.sqlite*")))
    assert exposed(disk, {k: traffic.secrets[k] for k in ("plaintext", "content key")}) == []
    assert traffic.secrets["ciphertext"] in disk  # queued for USA-GW2, which is offline


# --- 2. no policy of their own ------------------------------------------------------------------


@pytest.fixture
def narrow(tmp_path: Path) -> Coalition:
    """FRA, GBR, USA with one agreement up to CONFIDENTIAL only: a SECRET label from USA to
    GBR is denied ``above_ceiling``, so widening the agreement would change a decision."""
    now = time.time_ns() // 1_000_000
    nations = ("FRA", "GBR", "USA")
    agreement = Agreement(id="NARROW", version=1, purpose="Only up to CONFIDENTIAL",
                          parties=nations, not_before=now - DAY_MS, not_after=now + 30 * DAY_MS,
                          tiers=(Tier(name="all", members=nations, ceiling="CONFIDENTIAL"),))
    return build_coalition(tmp_path / "narrow", nations=nations, now_ms=now,
                           nodes=[NodeSpec(f"{n}-GW1", n) for n in nations],
                           agreements=[agreement])


def _signed(coalition: Coalition, path: Path, data: bytes, signers: list[str]) -> None:
    """Write ``data`` at ``path`` with a ``.sig`` carrying exactly ``signers``' lines."""
    path.write_bytes(data)
    path.with_name(path.name + ".sig").write_bytes(authoring.signature_file(
        data, [(n, coalition.authorities[n].signing_key) for n in signers]))


def _agreement_missing_a_line(c: Coalition) -> tuple[str, str]:
    path = c.policy_dir / "agreements" / "NARROW.toml"
    _signed(c, path, path.read_bytes(), ["FRA", "GBR"])  # USA's line left out
    return "agreements/NARROW.toml", "USA"


def _agreement_widened_by_some(c: Coalition) -> tuple[str, str]:
    path = c.policy_dir / "agreements" / "NARROW.toml"
    widened = path.read_bytes().replace(b"version = 1", b"version = 2").replace(
        b'ceiling = "CONFIDENTIAL"', b'ceiling = "SECRET"')
    assert widened != path.read_bytes()
    _signed(c, path, widened, ["GBR", "USA"])  # FRA never agreed
    return "agreements/NARROW.toml", "FRA"


def _certificate_by_another_nation(c: Coalition) -> tuple[str, str]:
    # The operator certifies a key of their own as GBR-GW1's, and gets USA to sign it.
    path = c.policy_dir / "nodes" / "GBR-GW1.toml"
    impostor = KeyFile.generate("node", "GBR-GW1")
    cert = path.read_bytes()
    forged = authoring.node_cert_toml(
        node="GBR-GW1", nation="GBR", sign_key=impostor.sign_public,
        enc_key=impostor.enc_public, not_before_ms=0, not_after_ms=4_000_000_000_000,
        max_level="SECRET")
    assert forged != cert
    _signed(c, path, forged, ["USA"])
    return "nodes/GBR-GW1.toml", "GBR"


def _trust_root_below_threshold(c: Coalition) -> tuple[str, str]:
    path = c.policy_dir / "trust-root.toml"
    _signed(c, path, path.read_bytes(), ["USA"])  # the root demands 2 of 3
    return "trust-root.toml", "FRA, GBR"


REFUSALS = {
    "agreement_sig_missing_a_party": _agreement_missing_a_line,
    "agreement_widened_signed_by_some_parties": _agreement_widened_by_some,
    "node_certificate_signed_by_another_nation": _certificate_by_another_nation,
    "trust_root_below_threshold": _trust_root_below_threshold,
}

DECIDE = {"label": {"policy": "NATO", "class": "SECRET", "orig": "USA", "rel": ["GBR"],
                    "cats": {}},
          "sender": "USA-GW1", "recipient": "GBR-GW1", "topic": "reports.daily"}


def _policy_entries(broker: BrokerServer) -> list[bytes]:
    """The bundle hash of every ``policy`` entry, in log order."""
    return [e.bundle for e in entries(broker) if isinstance(e, PolicyEntry)]


@pytest.mark.parametrize("tamper", REFUSALS.values(), ids=REFUSALS.keys())
async def test_operator_cannot_load_a_bundle_the_nations_did_not_sign(
        narrow: Coalition, tamper: Callable[[Coalition], tuple[str, str]]) -> None:
    originals = {p: p.read_bytes() for p in narrow.policy_dir.rglob("*") if p.is_file()}
    async with _broker(narrow) as broker, _admin_server(broker, narrow) as server, \
            aiohttp.ClientSession() as http:
        admin = Admin(server.url, http)
        _, before = await admin.call("GET", "/v1/policy", role="viewer")
        _, decided = await admin.call("POST", "/v1/policy/decide", role="viewer", json=DECIDE)
        assert (decided["permit"], decided["reasons"]) == (False, ["above_ceiling"])
        document, missing = tamper(narrow)
        with capture_logs() as logs:
            status, body = await admin.call("POST", "/v1/policy/reload")
        # Refused with a clear error naming the document and the missing signer(s).
        assert (status, body["error"]) == (422, "unsigned")
        assert document in body["detail"] and f"by {missing}" in body["detail"], body
        refused = [e for e in logs if e["event"] == "policy_reload_refused"]
        assert [(e["code"], e["active"]) for e in refused] == [("unsigned", before["bundle"])]
        # The previous bundle stays in force: same hash, same decisions, same certificates.
        _, after = await admin.call("GET", "/v1/policy", role="viewer")
        assert after == before
        _, again = await admin.call("POST", "/v1/policy/decide", role="viewer", json=DECIDE)
        assert again == {**decided, "at_ms": again["at_ms"]}
        assert broker.hub.bundle.nodes["GBR-GW1"].sign_key == \
            narrow.nodes["GBR-GW1"].sign_public
        # No policy entry for the refused bundle; the refusal itself is an admin entry.
        await broker.audit.write(Batch())
        assert _policy_entries(broker) == [bytes.fromhex(before["bundle"])]
        (entry,) = _admin_entries(broker)
        assert (entry.operator, entry.action, entry.target, entry.outcome) == (
            OPERATOR, "reload", before["bundle"], "refused:unsigned")
        # Put back as the nations signed it, the directory loads again (nothing changed).
        for path, data in originals.items():
            path.write_bytes(data)
        status, body = await admin.call("POST", "/v1/policy/reload")
        assert (status, body["changed"]) == (200, False)


async def test_a_widened_agreement_signed_by_every_party_is_loaded(narrow: Coalition) -> None:
    """The control: the same widening, signed by all three parties, is the nations' decision:
    it loads, gets a ``policy`` entry, and the decision changes."""
    async with _broker(narrow) as broker, _admin_server(broker, narrow) as server, \
            aiohttp.ClientSession() as http:
        admin = Admin(server.url, http)
        _, before = await admin.call("GET", "/v1/policy", role="viewer")
        path = narrow.policy_dir / "agreements" / "NARROW.toml"
        widened = path.read_bytes().replace(b"version = 1", b"version = 2").replace(
            b'ceiling = "CONFIDENTIAL"', b'ceiling = "SECRET"')
        _signed(narrow, path, widened, ["FRA", "GBR", "USA"])
        status, body = await admin.call("POST", "/v1/policy/reload")
        assert (status, body["changed"]) == (200, True)
        _, decided = await admin.call("POST", "/v1/policy/decide", role="viewer", json=DECIDE)
        assert decided["permit"] and decided["via"] == "NARROW@2/all"
        await broker.audit.write(Batch())
        assert _policy_entries(broker) == [bytes.fromhex(before["bundle"]),
                                           bytes.fromhex(body["bundle"])]


# --- 3. no silent rewrite of the log ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class History:
    """A log the nations witnessed, with an operator action in it, and the broker stopped."""

    db: Path
    #: Index of the operator's ``suspend`` entry (what an operator would like to erase).
    suspend: int
    #: The auditor's copy of a checkpoint covering it, cosigned by two nations' gateways.
    saved: Path
    saved_size: int
    saved_root: bytes


async def witnessed_history(coalition: Coalition, tmp_path: Path) -> History:
    """Real traffic witnessed by USA-GW1 and GBR-GW1 (state in ``tmp_path/witness-NODE``); the
    operator suspends and resumes FRA-GW1; an auditor saves the cosigned checkpoint that covers
    it (from the admin API); then the broker stops."""
    async with _broker(coalition) as broker, _admin_server(broker, coalition) as server, \
            aiohttp.ClientSession() as http:
        admin = Admin(server.url, http)
        async with gateway(broker, coalition, "USA-GW1", tmp_path / "witness-USA-GW1") as usa, \
                gateway(broker, coalition, "GBR-GW1", tmp_path / "witness-GBR-GW1") as gbr:
            await gbr.subscribe("reports.>")
            for i in range(3):
                await usa.publish("reports.daily", b"report %d" % i, TO_GBR)
            status, body = await admin.call("POST", "/v1/nodes/FRA-GW1/suspend")
            assert status == 200
            suspend = body["audit"]
            assert (await admin.call("POST", "/v1/nodes/FRA-GW1/resume"))[0] == 200
            for i in range(3, 6):
                last = await usa.publish("reports.daily", b"report %d" % i, TO_GBR)
            await until(lambda: (latest := broker.audit.latest) is not None
                        and latest.size > last.audit
                        and {"USA-GW1", "GBR-GW1"} <= set(latest.cosignatures))
            status, checkpoint = await admin.call("GET", "/v1/audit/checkpoint", role="viewer")
            assert status == 200
    note = add_signatures(checkpoint["note"], list(checkpoint["cosignatures"].values()))
    saved = tmp_path / "auditor-saved.note"
    saved.write_text(note)
    parsed = verify_log_checkpoint(note, _log_key(coalition))
    return History(broker.data_dir / "broker.sqlite", suspend, saved, parsed.size,
                   parsed.root)


def _log_key(coalition: Coalition) -> Verifier:
    """The broker's checkpoint key, as the trust root lists it (what witnesses check)."""
    key = broker_log_key(coalition.trust_root, coalition.broker_name)
    assert key is not None
    return key


def audit_offline(coalition: Coalition, history: History, out: Path) -> Report:
    """What an auditor does with the data directory (or `coalition audit export`): export the
    store and verify it against the pinned trust root and the checkpoint saved earlier."""
    store = SqliteStore(history.db)
    try:
        export_store(store, coalition.broker_name, out)
    finally:
        store.close()
    return verify_export(out, pins=[coalition.root_sha256], saved=[history.saved])


def _forged_admin_entry(data: bytes) -> bytes:
    """The operator's own ``suspend`` entry, rewritten to blame someone else."""
    entry = entry_from_bytes(data)
    assert isinstance(entry, AdminEntry) and entry.operator == OPERATOR
    return dataclasses.replace(entry, operator="night-shift").to_bytes()


def _delete(conn: sqlite3.Connection, index: int) -> None:
    """Remove the entry row."""
    conn.execute("DELETE FROM entries WHERE idx = ?", (index,))


def _rewrite(conn: sqlite3.Connection, index: int) -> None:
    """Replace the entry row's bytes (the recorded leaf hash no longer matches)."""
    (data,) = conn.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
    conn.execute("UPDATE entries SET data = ? WHERE idx = ?", (_forged_admin_entry(data), index))


def _rewrite_with_leaf(conn: sqlite3.Connection, index: int) -> None:
    """Replace the entry row and its recorded leaf hash: only the signed roots can tell."""
    (data,) = conn.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
    forged = _forged_admin_entry(data)
    conn.execute("UPDATE entries SET data = ? WHERE idx = ?", (forged, index))
    conn.execute("UPDATE entries SET leaf = ? WHERE idx = ?", (leaf_hash(forged), index))


def _truncate(conn: sqlite3.Connection, index: int) -> None:
    """Remove the entry and every later one."""
    conn.execute("DELETE FROM entries WHERE idx >= ?", (index,))


TAMPERING = {
    "delete_the_entry": (_delete, "audit entry {i} is missing"),
    "rewrite_the_entry": (_rewrite, "audit entry {i} does not match its stored leaf hash"),
    "rewrite_the_entry_and_its_leaf_hash": (_rewrite_with_leaf, "the log was rewritten"),
    "truncate_from_the_entry": (_truncate, "entries were lost"),
}


@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=TAMPERING.keys())
async def test_tampered_store_is_refused_at_start_and_flagged_by_the_auditor(
        coalition: Coalition, tmp_path: Path,
        tamper: tuple[Callable[[sqlite3.Connection, int], None], str]) -> None:
    history = await witnessed_history(coalition, tmp_path)
    damage, message = tamper
    with sqlite3.connect(history.db) as conn:
        damage(conn, history.suspend)
    conn.close()
    # (a) The broker refuses to start: the log no longer extends its last signed checkpoint.
    with pytest.raises(LogDamaged, match=message.format(i=history.suspend)) as refused:
        async with _broker(coalition):
            pass
    assert refused.value.code == "log_damaged"
    # (b) An auditor holding the earlier cosigned checkpoint sees it offline.
    report = audit_offline(coalition, history, tmp_path / "export")
    assert not report.ok
    saved = [p for p in report.problems if p.what == "checkpoint" and "saved" in p.detail]
    assert saved, report.problems
    if damage is not _rewrite_with_leaf:
        assert report.first_bad_index == history.suspend, report.problems


async def test_a_careful_rollback_is_caught_by_the_witnesses_and_the_auditor(
        coalition: Coalition, tmp_path: Path) -> None:
    """The operator truncates the log at their ``suspend`` entry *and* removes every
    checkpoint, cosignature and tree node beyond it, so the broker starts (it cannot know).
    The nations can."""
    history = await witnessed_history(coalition, tmp_path)
    cut = history.suspend
    with sqlite3.connect(history.db) as conn:
        conn.execute("DELETE FROM entries WHERE idx >= ?", (cut,))
        conn.execute("DELETE FROM nodes WHERE ((idx + 1) << level) > ?", (cut,))
        conn.execute("DELETE FROM checkpoints WHERE size > ?", (cut,))
        conn.execute("DELETE FROM cosignatures WHERE size > ?", (cut,))
    conn.close()
    alarms: list[Equivocation] = []
    async with _broker(coalition) as broker:
        assert broker.audit.size == cut + 1  # it started, and logged its policy again
        await until(lambda: broker.audit.latest is not None
                    and broker.audit.latest.size == broker.audit.size)
        # (b) A gateway that witnessed the log before sees a smaller log: rollback.
        offered = broker.audit.size
        async with gateway(broker, coalition, "USA-GW1", tmp_path / "witness-USA-GW1",
                           alarms) as usa:
            await until(lambda: bool(alarms))
            cosigned = max(usa.witness.cosigned)
        assert offered < history.saved_size <= cosigned
        assert f"older than the checkpoint of size {cosigned}" in alarms[0].reason
        assert "rollback" in alarms[0].reason
        assert alarms[0].previous is not None  # the evidence: the note it cosigned
        assert any((tmp_path / "witness-USA-GW1").glob("evidence-*/offered.note"))
        # The broker grows the truncated log past the old size and signs new checkpoints.
        async with gateway(broker, coalition, "USA-GW2") as usa2:
            while broker.audit.size <= history.saved_size + 2:
                await usa2.publish("reports.daily", b"filler", label("NATO", "SECRET", "USA"))
        await until(lambda: (latest := broker.audit.latest) is not None
                    and latest.size > history.saved_size)
        latest = broker.audit.latest
        assert latest is not None
        new = verify_log_checkpoint(latest.note, _log_key(coalition))
        # (c) No consistency proof from the old checkpoint to the new one verifies: the proof
        # the broker computes over its (rewritten) tree fails, and a witness calls it a fork.
        proof = broker.audit.consistency_proof(history.saved_size, new.size)
        with pytest.raises(VerificationError):
            verify_consistency(history.saved_size, new.size, history.saved_root, new.root,
                               proof)
        with pytest.raises(Equivocation, match="does not extend"):
            check_offered_checkpoint({history.saved_size: history.saved_root}, latest.note,
                                     proof, history.saved_size, _log_key(coalition))
    # (b) The auditor with the saved checkpoint flags the export offline.
    report = audit_offline(coalition, history, tmp_path / "export")
    assert any(p.what == "checkpoint" and "auditor-saved.note" in p.detail
               and "rewritten" in p.detail for p in report.problems), report.problems


@dataclasses.dataclass(frozen=True)
class QueuedAndRestarted:
    """What became of a message queued for an offline node, its TTL passed while the broker
    was stopped, after the broker ran again: the broker's refusal to start, or the auditor's
    report and the ``expired`` notices its sender got."""

    receipt: Receipt
    refused: LogDamaged | None
    report: Report | None
    notices: list[Expired]


async def queued_then_restarted(coalition: Coalition, tmp_path: Path, *,
                                delete_row: bool) -> QueuedAndRestarted:
    """USA-GW1 publishes (TTL 1 s) to GBR-GW1, which never connects; the broker stops at once.
    With ``delete_row`` the operator then deletes the queued copy from the store. Once the TTL
    has passed the broker runs again (expiry sweep every 0.1 s) and USA-GW1 reconnects; an
    auditor verifies the export."""
    def make() -> BrokerServer:
        return BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                            limits=Limits(max_frame_bytes=64 * 1024, expiry_interval_s=0.1),
                            commit=FAST_COMMIT)

    async with make() as broker, gateway(broker, coalition, "USA-GW1") as usa:
        receipt = await usa.publish("reports.daily", MARKER, TO_GBR, to=("GBR-GW1",), ttl=1)
        assert receipt.recipients == {"GBR-GW1": "queued"}
    db = broker.data_dir / "broker.sqlite"
    if delete_row:
        with sqlite3.connect(db) as conn:
            assert conn.execute("DELETE FROM queue WHERE recipient = 'GBR-GW1'").rowcount == 1
        conn.close()
    await asyncio.sleep(1.2)  # the TTL passes while the broker is down
    notices: list[Expired] = []
    try:
        async with make() as broker, gateway(broker, coalition, "USA-GW1") as usa:
            await asyncio.sleep(0.5)  # several expiry sweeps; a notice comes at connect
            notices = list(usa.expired)
    except LogDamaged as refused:
        return QueuedAndRestarted(receipt, refused, None, [])
    store = SqliteStore(db)
    try:
        export_store(store, coalition.broker_name, tmp_path / "export")
    finally:
        store.close()
    # The broker sweeps every 0.1 s here, so 0.3 s past its TTL a copy must have ended.
    report = verify_export(tmp_path / "export", pins=[coalition.root_sha256], quorum=0,
                           expiry_grace_ms=300)
    return QueuedAndRestarted(receipt, None, report, notices)


async def test_an_undelivered_message_ends_with_an_expire_entry_and_a_notice(
        coalition: Coalition, tmp_path: Path) -> None:
    """The honest run: the copy expires after the restart, with an ``expire`` entry the
    auditor checks and an ``expired`` notice to its sender."""
    outcome = await queued_then_restarted(coalition, tmp_path, delete_row=False)
    assert outcome.refused is None and outcome.report is not None
    assert outcome.report.ok, outcome.report.problems
    assert outcome.report.expiries_checked == 1
    assert outcome.notices == [Expired(id=outcome.receipt.id, recipient="GBR-GW1")]


async def test_a_queued_message_deleted_on_disk_does_not_vanish_unnoticed(
        coalition: Coalition, tmp_path: Path) -> None:
    """The operator deletes a receipted, permitted, undelivered copy from the ``queue`` table
    while the broker is stopped. The log then never gets the ``expire`` (or ``deliver``) entry
    DESIGN §9 promises for it, and its sender is never told: the broker must refuse to start,
    or the auditor must flag the copy that never ended although its TTL passed while its
    recipient was never connected.

    The broker cannot see it without replaying its whole log at start; the auditor does:
    ``clients.replay.Replay.finish`` flags a copy outstanding past its TTL at the end of the log."""
    outcome = await queued_then_restarted(coalition, tmp_path, delete_row=True)
    if outcome.refused is not None:
        return  # the broker noticed: fine
    assert outcome.report is not None
    assert outcome.notices == []
    assert not outcome.report.ok, (
        f"message {outcome.receipt.id.hex()} (route entry {outcome.receipt.audit}) was "
        "dropped without an expire entry, and the auditor's report is clean")
    assert any(p.index == outcome.receipt.audit or outcome.receipt.id.hex() in p.detail
               for p in outcome.report.problems), outcome.report.problems


PLAUSIBLE_APPENDS = [
    ("POST", "/v1/audit/entries"), ("PUT", "/v1/audit/entries"), ("PATCH", "/v1/audit/entries"),
    ("DELETE", "/v1/audit/entries"), ("POST", "/v1/audit/checkpoint"),
    ("POST", "/v1/audit"), ("POST", "/v1/audit/entry"), ("POST", "/v1/audit/append"),
    ("PUT", "/v1/audit/entries/3"), ("DELETE", "/v1/audit/entries/3"),
    ("POST", "/v1/audit/import"), ("POST", "/v1/log"), ("POST", "/v1/admin/entries"),
]


async def test_there_is_no_way_to_append_an_entry_through_the_admin_api(
        running: Running) -> None:
    broker = running.broker
    await broker.audit.write(Batch())
    size = broker.audit.size
    forged = AdminEntry(ts=1, operator="nobody", action="suspend", target="GBR-GW1",
                        outcome="ok").to_bytes()
    for method, path in PLAUSIBLE_APPENDS:
        status, body = await raw_call(running.admin, method, path, "operator", data=forged)
        assert status in (404, 405), (method, path, status)
        assert json.loads(body)["error"] in ("not_found", "method_not_allowed")
    _, doc = await running.admin.call("GET", "/v1/openapi.json", role=None)
    assert {m for p, ops in doc["paths"].items() if p.startswith("/v1/audit") for m in ops} \
        == {"get"}
    await broker.audit.write(Batch())
    assert broker.audit.size == size


async def test_every_operator_action_is_an_admin_entry_naming_the_token(
        running: Running, tmp_path: Path) -> None:
    admin, broker, c = running.admin, running.broker, running.coalition
    actions = [("POST", "/v1/nodes/GBR-GW1/suspend", 200),
               ("POST", "/v1/nodes/GBR-GW1/resume", 200),
               ("POST", "/v1/nodes/FRA-GW1/revoke", 200),
               ("POST", "/v1/nodes/FRA-GW1/resume", 409),  # a revoked node stays revoked
               ("POST", "/v1/nodes/GBR-GW1/resume", 409),  # already active
               ("POST", "/v1/nodes/NOPE-GW1/suspend", 404),
               ("POST", "/v1/policy/reload", 200)]
    for method, path, expected in actions:
        assert (await admin.call(method, path))[0] == expected, path
    agreement = next((c.policy_dir / "agreements").glob("*.toml"))
    agreement.with_name(agreement.name + ".sig").write_text("")  # every signature removed
    status, body = await admin.call("POST", "/v1/policy/reload")
    assert (status, body["error"]) == (422, "unsigned")
    # A viewer's attempt is no action: refused before it (403), only an access-log line naming
    # the token that tried.
    with capture_logs() as logs:
        assert (await admin.call("POST", "/v1/nodes/USA-GW1/suspend", role="viewer"))[0] == 403
    assert [(e["path"], e["status"], e["token"]) for e in logs if e["event"] ==
            "admin_request"] == [("/v1/nodes/USA-GW1/suspend", 403, "viewer-token")]
    bundle = broker.hub.bundle.hash.hex()
    assert [(e.operator, e.action, e.target, e.outcome) for e in _admin_entries(broker)] == [
        (OPERATOR, "suspend", "GBR-GW1", "ok"),
        (OPERATOR, "resume", "GBR-GW1", "ok"),
        (OPERATOR, "revoke", "FRA-GW1", "ok"),
        (OPERATOR, "resume", "FRA-GW1", "refused:conflict"),
        (OPERATOR, "resume", "GBR-GW1", "refused:conflict"),
        (OPERATOR, "suspend", "NOPE-GW1", "refused:not_found"),
        (OPERATOR, "reload", bundle, "unchanged"),
        (OPERATOR, "reload", bundle, "refused:unsigned"),
    ]
    # The nations see it the same way in the export, and the log verifies.
    await until(lambda: broker.audit.latest is not None
                and broker.audit.latest.size == broker.audit.size)  # a checkpoint covers it
    status, tar = await raw_call(admin, "GET", "/v1/audit/export", "auditor")
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(tmp_path, filter="data")
    report = verify_export(tmp_path / "audit-export", pins=[c.root_sha256], quorum=0)
    assert report.ok, report.problems
