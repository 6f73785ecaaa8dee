"""Key rotation and revocation by the nations (issue 8, item 5), against a real broker.

A nation replaces a node's certificate (new key, higher ``serial``) or revokes it in its signed
``revocations/NATION.toml``; the operator only reloads. After the switch the old key is useless
(handshake and envelopes), a revoked certificate is refused at the handshake, left out of the
directory and denied as a recipient, and the broker refuses to step back to older documents,
also across a restart.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker import stored_bundle, wire
from broker.admin.app import AdminContext
from broker.admin.views import node_status
from broker.audit.leaves import SessionEntry, entry_from_bytes
from broker.cli import main
from broker.coalition import DAY_MS, Coalition
from broker.envelope import Envelope, build_envelope
from broker.errors import PolicyDocumentError, StorageError
from broker.server import BrokerServer
from broker.store.sqlite import SqliteStore
from clients.gateway import GatewayClient, label
from clients.identity import KeyFile
from policies import authoring
from policies.bundle import Bundle
from policies.documents import SignedDocument, parse_node_cert
from policies.highwater import HighWater
from policies.loader import load_bundle
from policies.model import Revocation
from tests.integration.conftest import FAST_COMMIT
from tests.integration.rawnode import RawNode

Gateways = Callable[[str], GatewayClient]
LABEL = label("NATO", "SECRET", "USA", ["GBR"])


def _now() -> int:
    return time.time_ns() // 1_000_000


def _sign_into(coalition: Coalition, path: str, data: bytes, signer: str) -> None:
    target = coalition.policy_dir / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    sig = authoring.signature_file(data, [(signer, coalition.authorities[signer].signing_key)])
    target.with_name(target.name + ".sig").write_bytes(sig)


def rotate(coalition: Coalition, node: str, *, serial: int) -> KeyFile:
    """The nation issues ``node`` a new certificate with a new key (what the CLI does with
    ``coalition keys gen`` + ``keys cert --serial`` + ``keys sign``)."""
    old = parse_node_cert(SignedDocument(f"nodes/{node}.toml",
                                         (coalition.policy_dir / f"nodes/{node}.toml").read_bytes(),
                                         b""))
    key = KeyFile.generate("node", node)
    now = _now()
    data = authoring.node_cert_toml(
        node=node, nation=old.nation, sign_key=key.sign_public, enc_key=key.enc_public,
        not_before_ms=now, not_after_ms=now + 30 * DAY_MS,
        max_level=old.accreditation.max, serial=serial)
    _sign_into(coalition, f"nodes/{node}.toml", data, old.nation)
    return key


def revoke(coalition: Coalition, node: str, *, signer: str | None = None) -> None:
    """The node's nation (or ``signer``) lists its current certificate as revoked."""
    cert = coalition.bundle().nodes[node]
    nation = signer or cert.nation
    entry = Revocation(nation=nation, node=node, sign_key=cert.sign_key,
                       reason="key compromise", revoked_at=_now())
    _sign_into(coalition, f"revocations/{nation}.toml",
               authoring.revocations_toml(nation, [entry]), nation)


async def reload(server: BrokerServer, coalition: Coalition) -> None:
    await server.reload(coalition.policy_dir, pinned_root_sha256=coalition.root_sha256)


def broker_on(coalition: Coalition, data_dir: Path, bundle: Bundle | None = None) -> BrokerServer:
    """A broker on ``data_dir`` with ``bundle`` (default: the documents as they are now)."""
    return BrokerServer(name=coalition.broker_name,
                        bundle=coalition.bundle() if bundle is None else bundle,
                        key=coalition.broker_key, data_dir=data_dir, commit=FAST_COMMIT)


def client(server: BrokerServer, coalition: Coalition, key: KeyFile) -> GatewayClient:
    return GatewayClient(server.url, key, coalition.trust_root,
                         broker_name=coalition.broker_name, timeout=5, max_frame=64 * 1024,
                         reconnect=None)


async def next_error(raw: RawNode) -> wire.Error:
    """The next error frame (checkpoints pushed to the node meanwhile are skipped)."""
    while True:
        frame = await raw.recv()
        if isinstance(frame, wire.Error):
            return frame


async def eventually(check: Callable[[], bool], timeout: float = 5) -> None:
    """Wait for an audit entry to become durable (the log commits in batches)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the timeout"
        await asyncio.sleep(0.02)


def session_events(server: BrokerServer, node: str) -> list[SessionEntry]:
    entries = (entry_from_bytes(raw) for raw in server.audit.store.entries(0, server.audit.size))
    return [e for e in entries if isinstance(e, SessionEntry) and e.node == node]


# --- rotation -----------------------------------------------------------------------------------


async def test_a_rotated_certificate_replaces_the_old_key_everywhere(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    old_key = coalition.nodes["USA-GW1"]
    async with gateway("GBR-GW1") as gbr, gateway("USA-GW1") as usa_old:
        await gbr.subscribe("maritime.>")
        await usa_old.publish("maritime.tracks", b"before the switch", LABEL)
        await gbr.directory()  # GBR knows the old certificate; it reads the message later
        new_key = rotate(coalition, "USA-GW1", serial=2)
        await reload(server, coalition)

        # The connection authenticated with the old certificate is closed at the switch.
        async with RawNode(server.url) as raw:  # a fresh old-key login is refused too
            answer = await raw.login(old_key)
            assert isinstance(answer, wire.Error) and answer.code == "bad_signature"
        with pytest.raises(Exception):  # noqa: B017 - closed: any request fails
            await usa_old.publish("maritime.tracks", b"after the switch, old key", LABEL)

        async with client(server, coalition, new_key) as usa_new:
            receipt = await usa_new.publish("maritime.tracks", b"after, new key", LABEL)
            assert receipt.delivered == ["GBR-GW1"]
            directory = await gbr.directory()
            assert directory["USA-GW1"].sign_key == new_key.sign_public
            assert directory["USA-GW1"].serial == 2

            plan = await usa_new.route("maritime.tracks", LABEL)
        # An envelope signed with the old key, sent over a connection made with the new one.
        forged = build_envelope(
            signing_key=old_key.signing_key, sender="USA-GW1", topic="maritime.tracks",
            payload=b"old key", label=LABEL, prec=0, ttl=60, recipient_keys=plan.keys,
            now_ms=_now())
        async with RawNode(server.url) as raw:
            assert isinstance(await raw.login(new_key), wire.Welcome)
            await raw.send(wire.Pub(env=forged))
            error = await next_error(raw)
            assert error.code == "bad_signature"
            assert error.ref == Envelope.from_bytes(forged).id
        got = []
        async for message in gbr.messages():
            got.append(message.payload)
            if len(got) == 2:
                break
        assert got == [b"before the switch", b"after, new key"]
    connects = [e.event for e in session_events(server, "USA-GW1")]
    assert "auth_failed" in connects


async def test_a_rolled_back_certificate_is_refused_and_the_new_one_stays(
    server: BrokerServer, coalition: Coalition
) -> None:
    cert_path = coalition.policy_dir / "nodes/USA-GW1.toml"
    original = cert_path.read_bytes(), cert_path.with_name("USA-GW1.toml.sig").read_bytes()
    rotate(coalition, "USA-GW1", serial=2)
    await reload(server, coalition)
    in_force = server.bundle.hash
    # The operator puts back the old, validly signed certificate (serial 1).
    cert_path.write_bytes(original[0])
    cert_path.with_name("USA-GW1.toml.sig").write_bytes(original[1])
    with pytest.raises(PolicyDocumentError) as refused, capture_logs() as logs:
        await reload(server, coalition)
    assert refused.value.code == "rollback"
    assert "serial 1 is lower than 2" in refused.value.reason
    assert server.bundle.hash == in_force == server.hub.bundle.hash
    assert [e["code"] for e in logs if e["event"] == "policy_reload_refused"] == ["rollback"]


async def test_a_changed_certificate_must_raise_its_serial(
    server: BrokerServer, coalition: Coalition
) -> None:
    rotate(coalition, "USA-GW1", serial=1)  # new key, same serial
    with pytest.raises(PolicyDocumentError) as refused:
        await reload(server, coalition)
    assert refused.value.code == "rollback" and "must raise its serial" in refused.value.reason


async def test_the_broker_will_not_restart_on_older_documents(
    coalition: Coalition, tmp_path: Path
) -> None:
    old_policy = {p: p.read_bytes() for p in coalition.policy_dir.rglob("*") if p.is_file()}
    data_dir = tmp_path / "data"

    async with broker_on(coalition, data_dir) as first:
        rotate(coalition, "USA-GW1", serial=2)
        revoke(coalition, "USA-GW2")
        await reload(first, coalition)
    for path in list(coalition.policy_dir.rglob("*")):
        if path.is_file() and path not in old_policy:
            path.unlink()
    for path, data in old_policy.items():
        path.write_bytes(data)
    with pytest.raises(PolicyDocumentError) as refused:
        async with broker_on(coalition, data_dir):
            pass
    assert refused.value.code == "rollback"
    assert "revocation of USA-GW2 by USA was dropped" in refused.value.reason
    assert "serial 1 is lower than 2" in refused.value.reason


async def _rotate_then_remove(server: BrokerServer, coalition: Coalition) -> Callable[[], None]:
    """USA-GW1 rotated to serial 2 and reloaded, then removed and reloaded (no rollback);
    returns what puts its original serial-1 certificate back into the policy directory."""
    cert = coalition.policy_dir / "nodes/USA-GW1.toml"
    sig = cert.with_name("USA-GW1.toml.sig")
    original = cert.read_bytes(), sig.read_bytes()
    rotate(coalition, "USA-GW1", serial=2)
    await reload(server, coalition)
    cert.unlink()
    sig.unlink()
    await reload(server, coalition)

    def put_back() -> None:
        cert.write_bytes(original[0])
        sig.write_bytes(original[1])
    return put_back


def _meta(data_dir: Path, key: str, value: str | None) -> None:
    """Set (``None``: delete) a row of the store's ``meta`` table, as damage or an older store
    would leave it."""
    conn = sqlite3.connect(data_dir / "broker.sqlite")
    try:
        with conn:
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            if value is not None:
                conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    finally:
        conn.close()


@pytest.mark.parametrize("store", ["marks stored", "written before marks were stored",
                                   "later bundles stored by such a broker"])
async def test_a_certificate_removed_then_brought_back_older_is_refused_also_after_a_restart(
    coalition: Coalition, tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle in force no longer holds a removed node; the marks of every bundle ever in
    force still do (policies.highwater), so its older certificate cannot come back later. A
    start reads the marks stored with the last activation; a store without them (written by an
    earlier version) has them rebuilt from its bundles, then stored; bundles such a broker
    stored after the marks (a downgrade, then an upgrade again) are folded in."""
    data_dir = tmp_path / "data"
    async with broker_on(coalition, data_dir) as first:
        original = first.bundle
        put_back = await _rotate_then_remove(first, coalition)
        assert "USA-GW1" not in first.bundle.nodes
        put_back()  # and it comes back with its old, validly signed serial 1
        with pytest.raises(PolicyDocumentError) as refused:
            await reload(first, coalition)
        assert refused.value.code == "rollback"
        assert "USA-GW1: certificate serial 1 is lower than 2" in refused.value.reason
        assert "USA-GW1" not in first.bundle.nodes
        marks = first.hub.high_water
    if store == "written before marks were stored":
        _meta(data_dir, "high_water", None)
    elif store != "marks stored":  # the marks of the first bundle only
        _meta(data_dir, "high_water",
              base64.b64encode(HighWater.of([original]).to_bytes()).decode())
    verified: list[Bundle] = []
    build = stored_bundle.build_bundle
    monkeypatch.setattr(stored_bundle, "build_bundle",
                        lambda *args, **kwargs: verified.append(build(*args, **kwargs))
                        or verified[-1])
    with pytest.raises(PolicyDocumentError) as refused:
        async with broker_on(coalition, data_dir):
            pass
    assert refused.value.code == "rollback"
    assert "USA-GW1: certificate serial 1 is lower than 2" in refused.value.reason
    # The bundle in force is verified (it is compared with), once; the others only when the
    # marks do not cover them: none, all three, the two after the first.
    expected = {"marks stored": 1, "written before marks were stored": 3}.get(store, 2)
    assert len(verified) == len({b.hash for b in verified}) == expected
    assert first.bundle.hash in {b.hash for b in verified}
    async with broker_on(coalition, data_dir, first.bundle) as again:  # what was in force
        assert again.hub.high_water == marks
    stored = SqliteStore.in_dir(data_dir, read_only=True)
    try:
        assert stored.high_water() == marks.to_bytes()
    finally:
        stored.close()


@pytest.mark.parametrize("damage", ["not base64", "not marks"])
async def test_the_broker_will_not_start_on_damaged_marks(
    coalition: Coalition, tmp_path: Path, damage: str
) -> None:
    data_dir = tmp_path / "data"
    async with broker_on(coalition, data_dir):
        pass
    _meta(data_dir, "high_water", "%%%" if damage == "not base64"
          else base64.b64encode(b"\x93\x01\x02\x03").decode())
    with pytest.raises(StorageError) as refused:
        async with broker_on(coalition, data_dir):
            pass
    assert "high-water marks" in refused.value.reason and "damaged store" in refused.value.reason


@pytest.mark.parametrize("damage", ["older content", "garbage", "row deleted"])
async def test_the_broker_will_not_start_without_the_bundle_in_force_intact(
    coalition: Coalition, tmp_path: Path, damage: str
) -> None:
    """The rollback check across a restart needs the bundle in force when the broker last ran;
    a store whose copy of it is missing, unverifiable or swapped for an older (validly signed)
    bundle stops the start instead of skipping the check."""
    data_dir = tmp_path / "data"

    async with broker_on(coalition, data_dir) as first:
        original = first.bundle.hash
        rotate(coalition, "USA-GW1", serial=2)
        await reload(first, coalition)
        in_force = first.bundle.hash
    conn = sqlite3.connect(data_dir / "broker.sqlite")
    try:
        with conn:
            if damage == "row deleted":
                conn.execute("DELETE FROM bundles WHERE hash = ?", (in_force,))
            else:
                content = (b"\x80" if damage == "garbage" else conn.execute(
                    "SELECT content FROM bundles WHERE hash = ?", (original,)).fetchone()[0])
                conn.execute("UPDATE bundles SET content = ? WHERE hash = ?", (content, in_force))
    finally:
        conn.close()
    with pytest.raises(StorageError) as refused:
        async with broker_on(coalition, data_dir):
            pass
    assert "damaged store" in refused.value.reason and in_force.hex() in refused.value.reason


async def test_a_store_that_lost_its_in_force_record_still_refuses_older_documents(
    coalition: Coalition, tmp_path: Path
) -> None:
    """Without the record of the bundle in force there is nothing to compare a start with; the
    marks of every bundle the store keeps still refuse the older certificate."""
    data_dir = tmp_path / "data"
    old_bundle = coalition.bundle()
    async with broker_on(coalition, data_dir) as first:
        rotate(coalition, "USA-GW1", serial=2)
        await reload(first, coalition)
    conn = sqlite3.connect(data_dir / "broker.sqlite")
    try:
        with conn:
            conn.execute("DELETE FROM meta WHERE key = 'active_bundle'")
    finally:
        conn.close()
    with pytest.raises(PolicyDocumentError) as refused:
        async with broker_on(coalition, data_dir, old_bundle):
            pass
    assert refused.value.code == "rollback"
    assert "USA-GW1: certificate serial 1 is lower than 2" in refused.value.reason


async def test_policy_check_store_says_what_the_broker_would_say_on_reload(
    coalition: Coalition, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalition policy check DIR --store DATA_DIR` reads the broker's store (read only) and
    applies both of its checks: the bundle in force and the marks of every bundle it ran."""
    data_dir = tmp_path / "data"
    async with broker_on(coalition, data_dir) as first:
        put_back = await _rotate_then_remove(first, coalition)  # in force: without USA-GW1
        capsys.readouterr()
        check = ["policy", "check", str(coalition.policy_dir), "--store", str(data_dir)]
        assert main([*check, "--json"]) == 0  # the store is readable while the broker runs
        assert json.loads(capsys.readouterr().out)["follows_store"] is True
        put_back()  # the old certificate: the marks refuse it
        assert main(check) == 2
        out = capsys.readouterr().out
        assert f"loads, but the broker of {data_dir} would REFUSE it" in out
        assert "USA-GW1: certificate serial 1 is lower than 2" in out
    nowhere = tmp_path / "nowhere"
    assert main(["policy", "check", str(coalition.policy_dir), "--store", str(nowhere)]) != 0
    printed = capsys.readouterr()
    assert f"--store {nowhere}: no broker store there" in printed.out + printed.err
    assert not nowhere.exists()  # nothing created


async def test_a_gateway_refuses_a_rolled_back_certificate_from_another_broker_after_a_restart(
    coalition: Coalition, tmp_path: Path
) -> None:
    """A broker is not trusted to serve the newest certificates: once a gateway (with a state
    directory) has taken serial 2 of a node, a broker serving the replaced serial 1, even a
    fresh one and after the gateway restarted, gets it refused and logged."""
    old_bundle = coalition.bundle()
    state = tmp_path / "gbr-state"
    state.mkdir()

    def gbr(server: BrokerServer) -> GatewayClient:
        return GatewayClient(server.url, coalition.nodes["GBR-GW1"], coalition.trust_root,
                             broker_name=coalition.broker_name, timeout=5, reconnect=None,
                             state_dir=state)

    new_key = rotate(coalition, "USA-GW1", serial=2)
    async with broker_on(coalition, tmp_path / "honest") as honest, gbr(honest) as gateway:
        assert (await gateway.directory())["USA-GW1"].serial == 2
    assert old_bundle.nodes["USA-GW1"].serial == 1
    # A fresh broker serving the replaced certificate; the gateway restarted.
    async with broker_on(coalition, tmp_path / "stale", old_bundle) as stale, gbr(stale) as gateway:
        with capture_logs() as logs:
            directory = await gateway.directory()
        assert "USA-GW1" not in directory and "USA-GW2" in directory
        assert [e["reason"] for e in logs if e["event"] == "directory_rollback_refused"] == [
            "node USA-GW1: certificate serial 1 is lower than 2 in force "
            "(a rolled-back certificate)"]
        assert gateway.certs.floor["USA-GW1"].sign_key == new_key.sign_public


async def test_the_directory_leaves_out_a_held_certificate_that_has_expired_since(
    server: BrokerServer, coalition: Coalition, gateway: Gateways,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The book keeps the certificate it holds over a refused rollback, also once it has
    expired; the directory hands the application only certificates valid now (the floor
    keeps the expired one, so the rollback stays refused)."""
    rolled_back = server.hub.directory()  # serial 1 of USA-GW1, valid for a year
    rotate(coalition, "USA-GW1", serial=2)  # valid for 30 days
    await reload(server, coalition)
    async with gateway("GBR-GW1") as gbr:
        assert (await gbr.directory())["USA-GW1"].serial == 2
        # 31 days on, the broker serves the replaced (still valid) serial 1.
        later = _now() + 31 * DAY_MS
        monkeypatch.setattr("clients.gateway._now_ms", lambda: later)
        monkeypatch.setattr(server.hub, "directory", lambda: rolled_back)
        with capture_logs() as logs:
            directory = await gbr.directory()
        assert [e["event"] for e in logs if e["event"] == "directory_rollback_refused"] == [
            "directory_rollback_refused"]
        assert "USA-GW1" not in directory and "GBR-GW1" in directory
        assert all(cert.is_valid_at(later) for cert in directory.values())
        assert gbr.certs.floor["USA-GW1"].serial == 2


# --- revocation ---------------------------------------------------------------------------------


async def test_a_revoked_certificate_is_refused_everywhere(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    async with gateway("USA-GW1") as usa1, gateway("USA-GW2") as usa2:
        await usa2.subscribe("maritime.>")
        revoke(coalition, "USA-GW2")
        await reload(server, coalition)
        assert server.hub.peers.get("USA-GW2") is None or server.hub.peers["USA-GW2"].closing

        # handshake
        async with RawNode(server.url) as raw:
            answer = await raw.login(coalition.nodes["USA-GW2"])
            assert isinstance(answer, wire.Error) and answer.code == "node_inactive"
        await eventually(lambda: any(
            e.event == "auth_failed" and e.reason.startswith("node_inactive")
            for e in session_events(server, "USA-GW2")))
        # directory
        directory = await usa1.directory()
        assert "USA-GW2" not in directory and "USA-GW1" in directory
        # recipient list: by subscription and by explicit `to`
        plan = await usa1.route("maritime.tracks", label("NATO", "SECRET", "USA", ["USA"]),
                                to=("USA-GW2",))
        assert plan.recipients["USA-GW2"] == "deny:node_inactive"
        assert "USA-GW2" not in plan.keys
        receipt = await usa1.publish("maritime.tracks", b"x",
                                     label("NATO", "SECRET", "USA", ["USA"]), to=("USA-GW2",))
        assert receipt.denied == {"USA-GW2": ["node_inactive"]}
        assert server.hub.queues.get("USA-GW2") is None or server.hub.queues["USA-GW2"].depth == 0
    # the operator's view says so too
    assert node_status(AdminContext(server, None), server.bundle.nodes["USA-GW2"]) == "revoked"


async def test_a_revocation_cannot_be_dropped_by_a_reload(
    server: BrokerServer, coalition: Coalition
) -> None:
    revoke(coalition, "USA-GW2")
    await reload(server, coalition)
    in_force = server.bundle.hash
    (coalition.policy_dir / "revocations/USA.toml").unlink()
    (coalition.policy_dir / "revocations/USA.toml.sig").unlink()
    with pytest.raises(PolicyDocumentError) as refused:
        await reload(server, coalition)
    assert refused.value.code == "rollback" and "dropped" in refused.value.reason
    assert server.bundle.hash == in_force


async def test_a_nation_cannot_revoke_another_nations_node(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    revoke(coalition, "USA-GW2", signer="FRA")
    await reload(server, coalition)  # loads: the entry simply does not apply
    assert not server.hub.is_inactive("USA-GW2")
    async with gateway("USA-GW2") as usa2:
        assert "USA-GW2" in await usa2.directory()


async def test_a_revoked_node_comes_back_with_a_new_certificate(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    revoke(coalition, "USA-GW2")
    await reload(server, coalition)
    new_key = rotate(coalition, "USA-GW2", serial=2)
    await reload(server, coalition)
    async with client(server, coalition, new_key) as usa2, gateway("USA-GW1") as usa1:
        await usa2.subscribe("maritime.>")
        receipt = await usa1.publish("maritime.tracks", b"welcome back",
                                     label("NATO", "SECRET", "USA", ["USA"]))
        assert receipt.delivered == ["USA-GW2"]
        async for message in usa2.messages():
            assert message.payload == b"welcome back"
            break


async def test_envelope_from_a_connection_whose_certificate_changed_is_refused(
    server: BrokerServer, coalition: Coalition
) -> None:
    """Between the switch and the close, nothing more is accepted under the old certificate."""
    key = coalition.nodes["USA-GW1"]
    async with RawNode(server.url) as raw:
        assert isinstance(await raw.login(key), wire.Welcome)
        sender = server.bundle.nodes["USA-GW1"]
        rotate(coalition, "USA-GW1", serial=2)
        await reload(server, coalition)
        env = build_envelope(signing_key=key.signing_key, sender="USA-GW1",
                             topic="maritime.tracks", payload=b"x", label=LABEL, prec=0, ttl=60,
                             recipient_keys={}, now_ms=_now())
        origin = Origin()
        with pytest.raises(Exception) as raised:
            server.hub.publish(sender, env, origin)
        assert getattr(raised.value, "code", None) == "node_inactive"
        assert origin.frames == []


class Origin:
    """The connection a publish came from, as the hub sees it."""

    node = "USA-GW1"
    closing = False

    def __init__(self) -> None:
        self.frames: list[wire.Frame] = []

    def send(self, frame: wire.Frame) -> None:
        self.frames.append(frame)

    def close(self, code: str, reason: str) -> None:
        self.closing = True


# --- the broker's own key -----------------------------------------------------------------------


def new_trust_root(coalition: Coalition, *, version: int, broker_key: bytes) -> bytes:
    """The nations' next trust root (same nations and communities), listing ``broker_key`` for
    the broker, signed by the threshold; returns its SHA-256 (the operator pins it)."""
    root = load_bundle(coalition.policy_dir, pinned_root_sha256=None).trust_root
    data = authoring.trust_root_toml(
        version=version, common_scheme=root.common_scheme, threshold=root.threshold,
        witness_quorum=root.witness_quorum,
        nations={code: list(n.authority_keys) for code, n in root.nations.items()},
        communities={name: list(m) for name, m in root.communities.items()},
        brokers={coalition.broker_name: broker_key})
    signers = sorted(root.nations)[:root.threshold]
    (coalition.policy_dir / "trust-root.toml").write_bytes(data)
    (coalition.policy_dir / "trust-root.toml.sig").write_bytes(authoring.signature_file(
        data, [(n, coalition.authorities[n].signing_key) for n in signers]))
    return hashlib.sha256(data).digest()


async def test_the_broker_key_rotates_with_a_new_trust_root_and_the_log_continues(
    coalition: Coalition, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=data_dir,
                            commit=FAST_COMMIT) as first:
        async with client(first, coalition, coalition.nodes["USA-GW1"]) as usa:
            await usa.publish("maritime.tracks", b"before", LABEL)
        await eventually(lambda: first.audit.latest is not None
                         and first.audit.latest.size == first.audit.size)
        size = first.audit.size
    new_key = KeyFile.generate("broker", coalition.broker_name)
    pin = new_trust_root(coalition, version=2, broker_key=new_key.sign_public)
    bundle = load_bundle(coalition.policy_dir, pinned_root_sha256=pin)
    # The last checkpoint was signed with the old key: the trust root in force when the broker
    # last ran (kept in its store) vouches for it.
    async with BrokerServer(name=coalition.broker_name, bundle=bundle, key=new_key,
                            data_dir=data_dir, commit=FAST_COMMIT) as second:
        assert second.audit.size > size
        await eventually(lambda: second.audit.latest is not None
                         and second.audit.latest.size >= size + 1)
        assert second.audit.latest is not None
        assert f"— {coalition.broker_name} " in second.audit.latest.note

    # Going back to the first trust root (version 1) is a rollback, even with its key.
    pin_v1 = new_trust_root(coalition, version=1, broker_key=coalition.broker_key.sign_public)
    with pytest.raises(PolicyDocumentError) as refused:
        async with BrokerServer(name=coalition.broker_name,
                                bundle=load_bundle(coalition.policy_dir, pinned_root_sha256=pin_v1),
                                key=coalition.broker_key, data_dir=data_dir):
            pass
    assert refused.value.code == "rollback" and "trust root version 1" in refused.value.reason


async def test_a_checkpoint_signed_by_an_unlisted_key_still_refuses_the_start(
    coalition: Coalition, tmp_path: Path
) -> None:
    """The earlier key is the one the nations listed, not any key: a broker started with a key
    of its own choosing on an existing log is refused (the trust root does not list it)."""
    data_dir = tmp_path / "data"
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=data_dir, commit=FAST_COMMIT):
        pass
    stranger = KeyFile.generate("broker", coalition.broker_name)
    with pytest.raises(Exception, match="not the one the trust root lists"):
        async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                                key=stranger, data_dir=data_dir):
            pass


async def test_a_sender_seals_to_the_rotated_key_of_a_recipient_it_cached(
    server: BrokerServer, coalition: Coalition, gateway: Gateways
) -> None:
    """USA cached GBR-GW1's certificate; GBR-GW1 rotates; USA's next message must be sealed to
    the new key (else it is delivered, acknowledged, and unreadable)."""
    async with gateway("USA-GW1") as usa:
        await usa.directory()
        new_key = rotate(coalition, "GBR-GW1", serial=2)
        await reload(server, coalition)
        async with client(server, coalition, new_key) as gbr:
            await gbr.subscribe("maritime.>")
            receipt = await usa.publish("maritime.tracks", b"to the new key", LABEL)
            assert receipt.delivered == ["GBR-GW1"]
            async with asyncio.timeout(5):
                async for message in gbr.messages():
                    assert message.payload == b"to the new key"
                    break
