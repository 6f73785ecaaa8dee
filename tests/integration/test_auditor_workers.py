"""The auditor with worker processes reports exactly what it reports in line: on a log with
problems, with suspensions that change decisions half-way (runs decided from a stale guess
are decided again), and when a worker dies."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit.leaves import AdminEntry, DeliverEntry, Entry, PolicyEntry, RouteEntry
from broker.audit.log import AuditLog
from broker.audit.note import Signer
from broker.coalition import Coalition
from broker.release import decide_recipient
from broker.store.sqlite import SqliteStore
from clients import replay_workers
from clients.auditor import verify_export
from clients.export import Export, export_store
from clients.gateway import label
from clients.replay import Replay, Suspensions, decide_steps
from clients.replay_workers import Decider, WorkerLost, _checked_steps, default_workers
from policies.bundle import bundle_content
from policies.cache import DecisionCache
from tests.integration.conftest import FAST_COMMIT

LABEL = label("NATO", "SECRET", "USA", ["GBR", "FRA"])
NODES = ("FRA-GW1", "GBR-GW1")


def _route(coalition: Coalition, ts: int, message: int, suspended: set[str]) -> RouteEntry:
    """A route entry as an honest broker logs it, ``suspended`` being inactive."""
    bundle = coalition.bundle()
    sender = bundle.nodes["USA-GW1"]
    decisions = {node: decide_recipient(LABEL, sender, node, "reports.daily", ts, bundle,
                                        sealed_for=NODES, inactive_nodes=suspended)
                 for node in NODES}
    return RouteEntry(ts=ts, id=message.to_bytes(16, "big"), env=bytes(32), sender="USA-GW1",
                      topic="reports.daily", label=LABEL, prec=0, ttl=3600,
                      bundle=bundle.hash, sealed=NODES, decisions=decisions)


def _admin(ts: int, action: str) -> AdminEntry:
    return AdminEntry(ts=ts, operator="alice", action=action, target="GBR-GW1", outcome="ok")


def _log(coalition: Coalition, now: int) -> list[Entry]:
    """Routes and deliveries; GBR suspended from entry ~20 to ~40; two lies."""
    entries: list[Entry] = []
    suspended: set[str] = set()
    for message in range(1, 31):
        ts = now + message
        if message == 8:
            entries.append(_admin(ts, "suspend"))
            suspended = {"GBR-GW1"}
        if message == 15:
            entries.append(_admin(ts, "resume"))
            suspended = set()
        route = _route(coalition, ts, message, suspended)
        if message == 20:  # a lie: GBR logged as permitted while FRA was denied, or so
            decisions = dict(route.decisions)
            decisions["FRA-GW1"] = decisions["GBR-GW1"].with_reason("not_in_audience")
            route = RouteEntry(**{**route.__dict__, "decisions": decisions})
        entries.append(route)
        for node in route.permitted:
            entries.append(DeliverEntry(ts=ts, id=route.id, to=node, seq=message))
        if message == 25:  # delivered to a node it was not released to
            entries.append(DeliverEntry(ts=ts, id=route.id, to="USA-GW2", seq=99))
    return entries


@pytest.fixture
async def export(coalition: Coalition, tmp_path: Path) -> Path:
    now = time.time_ns() // 1_000_000
    bundle = coalition.bundle()
    audit = AuditLog(SqliteStore(tmp_path / "data" / "broker.sqlite"), Signer.from_seed(
        coalition.broker_name, bytes(coalition.broker_key.signing_key)), policy=FAST_COMMIT)
    await audit.start()
    await audit.append(PolicyEntry(ts=now, bundle=bundle.hash),
                       bundles=[(bundle.hash, bundle_content(bundle))])
    await audit.append_all(_log(coalition, now))
    await audit.stop()
    audit.store.close()
    store = SqliteStore(tmp_path / "data" / "broker.sqlite")
    try:
        export_store(store, coalition.broker_name, tmp_path / "export")
    finally:
        store.close()
    return tmp_path / "export"


def test_workers_report_exactly_what_the_auditor_finds_in_line(
        coalition: Coalition, export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_workers, "CHUNK", 5)  # many runs: suspensions change in flight
    monkeypatch.setattr(replay_workers, "RUN_BYTES", 1200)  # some end at a size instead
    in_line: list[int] = []
    decide = Decider._in_line

    def counted(self: Decider, run: list[tuple[int, bytes]]) -> list[list[Any]]:
        in_line.append(run[0][0])
        return decide(self, run)

    monkeypatch.setattr(Decider, "_in_line", counted)
    alone = verify_export(export, pins=[coalition.root_sha256], quorum=0, workers=0)
    runs = len(in_line)
    in_line.clear()
    helped = verify_export(export, pins=[coalition.root_sha256], quorum=0, workers=2)

    assert helped.to_map() == alone.to_map()
    # What the log holds, so that equality is not two empty reports: the lie and the stray
    # delivery, and no false alarm from the decisions made while GBR was suspended.
    assert [(p.what, p.detail.split(":")[0]) for p in alone.problems] == [
        ("replay", "decision for FRA-GW1"), ("deliver", f"message {25:032x} went to USA-GW2, "
                                                        "which it was not released to")]
    assert alone.decisions_replayed == 60 and alone.deliveries_checked > 40
    # The workers decided most runs; the ones in flight when an admin entry was applied (a
    # stale guess of the suspensions) were decided again here.
    assert runs > 10 and 1 <= len(in_line) < runs // 2, (runs, in_line)


def test_a_worker_that_dies_leaves_the_rest_to_the_auditor(
        coalition: Coalition, export: Path) -> None:
    bundle = coalition.bundle()
    entries = list(Export.open(export).entries())
    runs = [entries[i:i + 7] for i in range(0, len(entries), 7)]
    expected_problems: list[tuple[str, str, int | None]] = []
    expected = Replay(lambda *found: expected_problems.append(found))
    suspensions = Suspensions()
    for run in runs:
        for step in decide_steps(run, {bundle.hash: bundle}, DecisionCache(), suspensions):
            expected.apply(step)

    problems: list[tuple[str, str, int | None]] = []
    replay = Replay(lambda *found: problems.append(found))
    with Decider({bundle.hash: bundle}, {bundle.hash: bundle_content(bundle)}, replay,
                 workers=2) as decider:
        assert len(decider.workers) == 2
        victim = decider.workers[1].process
        victim.kill()
        victim.wait()
        for _, steps in decider.steps(iter(runs)):
            for step in steps:
                replay.apply(step)
        assert decider.workers == []  # dropped, with the other one
    assert problems == expected_problems and problems
    assert replay.outstanding == expected.outstanding
    assert replay.decisions_replayed == expected.decisions_replayed == 60


def test_an_answer_for_other_entries_is_refused() -> None:
    run = [(4, b"a"), (5, b"b")]
    assert _checked_steps([1, [[3, 4, 0, "x"], [3, 5, 0, "y"]]], run)
    for reply in ([1, [[3, 4, 0, "x"]]], [1, [[3, 4, 0, "x"], [3, 6, 0, "y"]]], "garbage",
                  [1, [[3, 4], [3, 5]]], [1, [None, None]]):
        with pytest.raises(WorkerLost):
            _checked_steps(reply, run)


def test_small_logs_are_verified_in_line() -> None:
    assert default_workers(100) == 0
    assert default_workers(10**6) in (0, *range(2, 5))  # none on one CPU
