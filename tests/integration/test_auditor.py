"""The auditor against real logs: a clean log verifies; tampered rows, a lying broker's decisions
and deliveries, and a rewritten history are each reported with the index."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from broker.audit.leaves import (
    DeliverEntry,
    Entry,
    ExpireEntry,
    PolicyEntry,
    RouteEntry,
    entry_from_bytes,
    envelope_digest,
)
from broker.audit.log import AuditLog
from broker.audit.note import Signer
from broker.cli import main
from broker.coalition import Coalition
from broker.server import BrokerServer
from broker.store.sqlite import SqliteStore
from clients.auditor import Report, verify_export
from clients.export import Export, export_store
from clients.gateway import GatewayClient, label
from policies.bundle import Bundle, bundle_content
from policies.decide import Decision
from tests.integration.conftest import FAST_COMMIT


async def _traffic(coalition: Coalition, data_dir: Path, messages: int = 6) -> list[bytes]:
    """Run a broker with some permitted and denied traffic; return the message ids."""
    ids = []
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=data_dir,
                            commit=FAST_COMMIT) as server:
        def client(node: str) -> GatewayClient:
            return GatewayClient(server.url, coalition.nodes[node], coalition.trust_root,
                                 broker_name=coalition.broker_name, timeout=5,
                                 state_dir=data_dir.parent / f"witness-{node}")

        async with client("USA-GW1") as usa, client("GBR-GW1") as gbr, \
                client("FRA-GW1") as fra:
            await gbr.subscribe("reports.>")
            await fra.subscribe("reports.>")
            stream = gbr.messages()
            for i in range(messages):
                receipt = await usa.publish("reports.daily", b"report %d" % i,
                                            label("NATO", "SECRET", "USA", ["GBR"]))
                ids.append(receipt.id)
                await asyncio.wait_for(anext(stream), 5)
            await stream.aclose()
            # Let a checkpoint cover everything and be cosigned.
            async with asyncio.timeout(5):
                while server.audit.latest is None or server.audit.latest.size < \
                        server.audit.size or len(server.audit.latest.cosignatures) < 2:
                    await asyncio.sleep(0.02)
    return ids


def _export(coalition: Coalition, data_dir: Path, out: Path) -> Path:
    store = SqliteStore(data_dir / "broker.sqlite")
    try:
        export_store(store, coalition.broker_name, out)
    finally:
        store.close()
    return out


@pytest.fixture
async def logged(coalition: Coalition, tmp_path: Path) -> Path:
    await _traffic(coalition, tmp_path / "data")
    return tmp_path / "data"


def test_clean_log_verifies_with_every_decision_replayed(
        coalition: Coalition, logged: Path, tmp_path: Path) -> None:
    report = verify_export(_export(coalition, logged, tmp_path / "export"),
                           pins=[coalition.root_sha256])
    assert report.ok, report.problems
    assert report.entries > 12 and report.checkpoints >= 1
    assert report.decisions_replayed == 12  # 6 messages x (GBR permitted, FRA denied)
    assert report.deliveries_checked == 6
    assert report.cosignatures >= 2 and report.witnessed_by == ("FRA", "GBR", "USA")


def test_verify_refuses_an_unpinned_trust_root(coalition: Coalition, logged: Path,
                                               tmp_path: Path) -> None:
    report = verify_export(_export(coalition, logged, tmp_path / "export"), pins=[b"\x00" * 32])
    assert not report.ok
    assert any("pinned" in p.detail for p in report.problems)


def test_an_unreadable_saved_checkpoint_is_a_problem_not_a_crash(
        coalition: Coalition, logged: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved.note"
    saved.write_bytes(b"\xff\xfe not a note")
    report = verify_export(_export(coalition, logged, tmp_path / "export"),
                           pins=[coalition.root_sha256], saved=[saved])
    assert not report.ok
    assert [p.what for p in report.problems] == ["checkpoint"]
    assert "saved.note" in report.problems[0].detail


def _entry_count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])


@pytest.mark.parametrize("tamper", ["change", "delete", "reorder"])
def test_tampered_entry_row_is_named_by_its_index(
        coalition: Coalition, logged: Path, tmp_path: Path, tamper: str) -> None:
    db = logged / "broker.sqlite"
    victim = _entry_count(db) // 2
    with sqlite3.connect(db) as conn:
        if tamper == "change":
            data = conn.execute("SELECT data FROM entries WHERE idx = ?", (victim,)).fetchone()[0]
            changed = bytearray(data)
            changed[-1] ^= 0x01
            conn.execute("UPDATE entries SET data = ? WHERE idx = ?", (bytes(changed), victim))
        elif tamper == "delete":
            conn.execute("DELETE FROM entries WHERE idx = ?", (victim,))
        else:
            a, b = (conn.execute("SELECT data FROM entries WHERE idx = ?", (i,)).fetchone()[0]
                    for i in (victim, victim + 1))
            conn.execute("UPDATE entries SET data = ? WHERE idx = ?", (b, victim))
            conn.execute("UPDATE entries SET data = ? WHERE idx = ?", (a, victim + 1))
    report = verify_export(_export(coalition, logged, tmp_path / "export"),
                           pins=[coalition.root_sha256])
    assert not report.ok
    assert report.first_bad_index == victim


def test_checkpoint_saved_earlier_catches_a_rewritten_history(
        coalition: Coalition, logged: Path, tmp_path: Path) -> None:
    """The broker rewrites an entry and re-signs everything (it holds the key): only a
    checkpoint the auditor (or a witness) kept from before can tell."""
    first = _export(coalition, logged, tmp_path / "before")
    saved = sorted((first / "checkpoints").glob("*.note"), key=lambda p: int(p.stem))[-1]
    db = logged / "broker.sqlite"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT idx, data FROM entries ORDER BY idx").fetchall()
        conn.execute("DELETE FROM entries")
        conn.execute("DELETE FROM nodes")
        conn.execute("DELETE FROM checkpoints")
        conn.execute("DELETE FROM cosignatures")
    forged = [bytes(d) for _, d in rows]
    forged[3] = DeliverEntry(ts=1, id=b"\x00" * 16, to="FRA-GW1", seq=1).to_bytes()

    async def resign() -> None:
        audit = AuditLog(SqliteStore(db), Signer.from_seed(
            coalition.broker_name, bytes(coalition.broker_key.signing_key)), policy=FAST_COMMIT)
        await audit.start()
        for data in forged:
            await audit.append(entry_from_bytes(data))
        await audit.stop()
        audit.store.close()

    asyncio.run(resign())
    report = verify_export(_export(coalition, logged, tmp_path / "after"),
                           pins=[coalition.root_sha256], saved=[saved])
    assert any(p.what == "checkpoint" and "saved" in p.detail for p in report.problems)
    assert any(p.what == "deliver" and p.index == 3 for p in report.problems)


async def test_lying_broker_decisions_and_deliveries_are_flagged(
        coalition: Coalition, tmp_path: Path) -> None:
    """A broker signs a log claiming it permitted what the agreements deny, and delivered a
    message to a node it was never released to."""
    bundle = coalition.bundle()
    data = tmp_path / "liar"
    audit = AuditLog(SqliteStore(data / "broker.sqlite"), Signer.from_seed(
        coalition.broker_name, bytes(coalition.broker_key.signing_key)), policy=FAST_COMMIT)
    await audit.start()
    lab = label("NATO", "SECRET", "USA", ["GBR"])
    await audit.append(PolicyEntry(ts=1, bundle=bundle.hash),
                       bundles=[(bundle.hash, bundle_content(bundle))])
    now = time.time_ns() // 1_000_000
    await audit.append(RouteEntry(
        ts=now, id=b"\x01" * 16, env=envelope_digest(b"x"), sender="USA-GW1",
        topic="reports.daily", label=lab, prec=0, ttl=60, bundle=bundle.hash,
        sealed=("FRA-GW1", "GBR-GW1"),
        decisions={"GBR-GW1": Decision(True, (), "COALITION-DEFAULT@1/all"),
                   "FRA-GW1": Decision(True, (), "COALITION-DEFAULT@1/all")}))
    await audit.append(DeliverEntry(ts=now, id=b"\x01" * 16, to="USA-GW2", seq=1))
    await audit.stop()
    audit.store.close()
    report = verify_export(_export(coalition, data, tmp_path / "export"),
                           pins=[coalition.root_sha256], quorum=0)
    assert [(p.what, p.index) for p in report.problems] == [("replay", 1), ("deliver", 2)]
    assert "FRA-GW1" in report.problems[0].detail


def test_cli_export_verify_and_prove(coalition: Coalition, logged: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-export"
    assert main(["audit", "export", "--data-dir", str(logged), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    pin = coalition.root_sha256.hex()
    assert main(["audit", "verify", str(out), "--pin", pin, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == []
    message = _first_route_id(out)
    assert main(["audit", "prove", str(out), "--id", message, "--pin", pin]) == 0
    assert "inclusion verified" in capsys.readouterr().out
    with sqlite3.connect(logged / "broker.sqlite") as conn:
        conn.execute("DELETE FROM entries WHERE idx = 2")
    out2 = tmp_path / "cli-export-2"
    assert main(["audit", "export", "--data-dir", str(logged), "--out", str(out2)]) == 0
    assert main(["audit", "verify", str(out2), "--pin", pin]) == 1
    assert "FIRST BAD INDEX    2" in capsys.readouterr().out


def _first_route_id(export: Path) -> str:
    for _, data in Export.open(export).entries():
        entry = entry_from_bytes(data)
        if isinstance(entry, RouteEntry):
            return entry.id.hex()
    raise AssertionError("no route entry")


async def test_route_outside_the_bundle_in_force_and_backdated_entries_are_flagged(
        coalition: Coalition, tmp_path: Path) -> None:
    bundle = coalition.bundle()
    data = tmp_path / "backdater"
    audit = AuditLog(SqliteStore(data / "broker.sqlite"), Signer.from_seed(
        coalition.broker_name, bytes(coalition.broker_key.signing_key)), policy=FAST_COMMIT)
    await audit.start()
    now = time.time_ns() // 1_000_000
    lab = label("NATO", "SECRET", "USA", ["GBR"])

    def route(ts: int, message: int) -> RouteEntry:
        return RouteEntry(ts=ts, id=bytes([message]) * 16, env=envelope_digest(b"x"),
                          sender="USA-GW1", topic="reports.daily", label=lab, prec=0, ttl=60,
                          bundle=bundle.hash, sealed=("GBR-GW1",),
                          decisions={"GBR-GW1": Decision(True, (), "COALITION-DEFAULT@1/all")})

    await audit.append(route(now, 1), bundles=[(bundle.hash, bundle_content(bundle))])
    await audit.append(PolicyEntry(ts=now, bundle=bundle.hash))
    await audit.append(route(now, 2))
    await audit.append(route(now - 3_600_000, 3))  # an hour back: backdated into a window
    await audit.stop()
    audit.store.close()
    report = verify_export(_export(coalition, data, tmp_path / "export"),
                           pins=[coalition.root_sha256], quorum=0)
    # Message 3, backdated an hour with a 60 s TTL, also looks like a copy dropped unended.
    assert [(p.what, p.index) for p in report.problems] == [("replay", 0), ("entries", 3),
                                                            ("expire", None)]
    assert "message 03030303" in report.problems[2].detail


async def _verified_forgery(coalition: Coalition, tmp_path: Path,
                            entries: list[Entry]) -> Report:
    """Sign ``entries`` (after a policy entry) with the broker's key, export, verify."""
    bundle = coalition.bundle()
    data = tmp_path / "forged"
    audit = AuditLog(SqliteStore(data / "broker.sqlite"), Signer.from_seed(
        coalition.broker_name, bytes(coalition.broker_key.signing_key)), policy=FAST_COMMIT)
    await audit.start()
    await audit.append(PolicyEntry(ts=entries[0].ts, bundle=bundle.hash),
                       bundles=[(bundle.hash, bundle_content(bundle))])
    for entry in entries:
        await audit.append(entry)
    await audit.stop()
    audit.store.close()
    return verify_export(_export(coalition, data, tmp_path / "export"),
                         pins=[coalition.root_sha256], quorum=0)


async def test_a_bundle_put_in_force_over_a_newer_one_is_flagged(
        coalition: Coalition, tmp_path: Path) -> None:
    """The broker refuses a rollback; a log that shows one anyway (a broker that skipped the
    check) is flagged, against the bundle before and against every one before it."""
    from tests.integration.test_key_rotation import rotate

    original = coalition.bundle()
    rotate(coalition, "USA-GW1", serial=2)
    rotated = coalition.bundle()
    (coalition.policy_dir / "nodes/USA-GW1.toml").unlink()
    (coalition.policy_dir / "nodes/USA-GW1.toml.sig").unlink()
    without = coalition.bundle()  # the node removed: no rollback
    report = await _policy_log(coalition, tmp_path, [original, rotated, without, original,
                                                     rotated])
    # Only the fourth: "original" after "without" follows the bundle before, not the marks.
    assert [(p.what, p.index) for p in report.problems] == [("policy", 3)]
    assert "USA-GW1: certificate serial 1 is lower than 2" in report.problems[0].detail
    assert "rollback" in report.problems[0].detail


async def test_a_policy_entry_whose_bundle_the_export_lacks_is_flagged(
        coalition: Coalition, tmp_path: Path) -> None:
    """A store keeps every bundle ever in force; one deleted (say, to hide what a rollback
    went back from) leaves its policy entry naming a bundle nobody can check."""
    bundle = coalition.bundle()
    # The middle one's content never stored.
    report = await _policy_log(coalition, tmp_path, [bundle, b"\x42" * 32, bundle])
    assert [(p.what, p.index) for p in report.problems] == [("policy", 1)]
    assert "is not in the export" in report.problems[0].detail


async def _policy_log(coalition: Coalition, tmp_path: Path,
                      activated: list[Bundle | bytes]) -> Report:
    """A log of ``policy`` entries only, signed with the broker's key, exported and verified:
    a bundle is stored with its entry, a bare hash names one whose content was never stored."""
    data = tmp_path / "policies"
    audit = AuditLog(SqliteStore(data / "broker.sqlite"), Signer.from_seed(
        coalition.broker_name, bytes(coalition.broker_key.signing_key)), policy=FAST_COMMIT)
    await audit.start()
    now = time.time_ns() // 1_000_000
    for bundle in activated:
        if isinstance(bundle, bytes):
            await audit.append(PolicyEntry(ts=now, bundle=bundle))
        else:
            await audit.append(PolicyEntry(ts=now, bundle=bundle.hash),
                               bundles=[(bundle.hash, bundle_content(bundle))])
    await audit.stop()
    audit.store.close()
    return verify_export(_export(coalition, data, tmp_path / "export"),
                         pins=[coalition.root_sha256], quorum=0)


def _released_to_gbr(coalition: Coalition, ts: int, message: int) -> RouteEntry:
    return RouteEntry(
        ts=ts, id=bytes([message]) * 16, env=envelope_digest(b"x"), sender="USA-GW1",
        topic="reports.daily", label=label("NATO", "SECRET", "USA", ["GBR"]), prec=0, ttl=60,
        bundle=coalition.bundle().hash, sealed=("GBR-GW1",),
        decisions={"GBR-GW1": Decision(True, (), "COALITION-DEFAULT@1/all")})


def _expired(ts: int, message: int) -> ExpireEntry:
    return ExpireEntry(ts=ts, id=bytes([message]) * 16, to="GBR-GW1", sender="USA-GW1")


def _delivered(ts: int, message: int, seq: int) -> DeliverEntry:
    return DeliverEntry(ts=ts, id=bytes([message]) * 16, to="GBR-GW1", seq=seq)


async def test_early_expiry_and_a_copy_that_ends_twice_are_flagged(
        coalition: Coalition, tmp_path: Path) -> None:
    """A broker that drops a message before its TTL and calls it an expiry, or claims both a
    delivery and an expiry of one copy, is caught; an honest expiry passes."""
    now = time.time_ns() // 1_000_000
    report = await _verified_forgery(coalition, tmp_path, [
        *(_released_to_gbr(coalition, now, message) for message in (1, 2, 3)),
        _expired(now + 60_000, 1),  # honest: at its TTL
        _expired(now + 1_000, 2),  # 59 s early
        _delivered(now + 2_000, 3, seq=3),
        _expired(now + 61_000, 3),  # delivered, then "expired"
    ])
    assert [(p.what, p.index) for p in report.problems] == [("expire", 5), ("expire", 7)]
    assert "before its TTL" in report.problems[0].detail
    assert "already" in report.problems[1].detail
    assert (report.expiries_checked, report.deliveries_checked) == (3, 1)


async def test_an_envelope_routed_twice_may_end_twice_without_a_false_alarm(
        coalition: Coalition, tmp_path: Path) -> None:
    """Sent again after a broker restart (the replay guard starts empty), one envelope makes two
    copies for one recipient; each ends once, and a third end is still flagged."""
    now = time.time_ns() // 1_000_000
    report = await _verified_forgery(coalition, tmp_path, [
        _released_to_gbr(coalition, now, 1),
        _released_to_gbr(coalition, now + 30_000, 1),
        _expired(now + 60_000, 1),  # the first copy, at its TTL
        _delivered(now + 61_000, 1, seq=2),
        _delivered(now + 62_000, 1, seq=3),
    ])
    assert [(p.what, p.index) for p in report.problems] == [("deliver", 5)]


async def test_a_copy_held_unacknowledged_by_a_connected_recipient_is_not_called_dropped(
        coalition: Coalition, tmp_path: Path) -> None:
    """In-flight copies do not expire: a recipient that stays connected without acknowledging
    (its application stopped consuming) holds it past its TTL. That is no drop."""
    data = tmp_path / "data"
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=data, commit=FAST_COMMIT) as srv:
        def client(node: str) -> GatewayClient:
            return GatewayClient(srv.url, coalition.nodes[node], coalition.trust_root,
                                 broker_name=coalition.broker_name, timeout=5)

        async with client("USA-GW1") as usa, client("GBR-GW1") as gbr:
            await gbr.subscribe("reports.>")
            receipt = await usa.publish("reports.daily", b"held",
                                        label("NATO", "SECRET", "USA", ["GBR"]), ttl=1)
            assert receipt.delivered == ["GBR-GW1"]  # in flight, never consumed
            await asyncio.sleep(1.3)
            await usa.publish("other.topic", b"later", label("NATO", "SECRET", "USA", ["USA"]))
            export_store(srv.audit.store, coalition.broker_name, tmp_path / "export")
    held = verify_export(tmp_path / "export", pins=[coalition.root_sha256], quorum=0,
                         expiry_grace_ms=0)
    assert held.ok, held.problems
