"""The auditor with worker processes reports exactly what it reports in line: on a log with
problems, with suspensions that change decisions half-way (runs decided from a stale guess
are decided again), and when a worker dies."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker import child
from broker.audit.leaves import AdminEntry, DeliverEntry, Entry, PolicyEntry, RouteEntry
from broker.audit.log import AuditLog
from broker.audit.note import Signer
from broker.cli import main
from broker.coalition import Coalition
from broker.release import decide_recipient
from broker.store.sqlite import SqliteStore
from clients import replay_workers
from clients.auditor import verify_export
from clients.export import Export, export_store
from clients.gateway import label
from clients.replay import (
    ADMIN,
    BAD,
    DELIVER,
    ROUTE,
    SESSION,
    Replay,
    Suspensions,
    decide_steps,
    is_step,
)
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


@pytest.mark.parametrize("when", [0, 3])
def test_a_worker_that_dies_leaves_the_rest_to_the_auditor(
        coalition: Coalition, export: Path, when: int) -> None:
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
        processes = [worker.process for worker in decider.workers]
        for number, (_, steps) in enumerate(decider.steps(iter(runs))):
            if number == when:  # each worker holds a run by now: the victim dies with one
                processes[1].kill()
            for step in steps:
                replay.apply(step)
        assert decider.workers == []  # dropped, with the other one
    assert all(process.poll() is not None for process in processes)  # none left behind
    assert problems == expected_problems and problems
    assert replay.outstanding == expected.outstanding
    assert replay.decisions_replayed == expected.decisions_replayed == 60


def test_an_answer_for_other_entries_or_malformed_is_refused() -> None:
    run = [(4, b"a"), (5, b"b")]
    good = [[DELIVER, 4, 7, b"i", "GBR-GW1"], [BAD, 5, "not a valid entry: x"]]
    assert _checked_steps([1, good], run) == good
    for reply in ([1, good[:1]], [1, [good[0], [BAD, 6, "x"]]], "garbage", [1, [[3, 4], [3, 5]]],
                  [1, [None, None]], [1, [good[0], [BAD, 5, b"bytes, not text"]]]):
        with pytest.raises(WorkerLost):
            _checked_steps(reply, run)


ROUTE_STEP = [ROUTE, 9, 1, b"b" * 32, b"i" * 16, 60, ["GBR-GW1"], 2, [["replay", "differs"]]]


@pytest.mark.parametrize("step", [
    [ROUTE, 9, True, *ROUTE_STEP[3:]],  # a bool is not a time
    ROUTE_STEP[:-1],  # a field short
    [*ROUTE_STEP, 0],  # one too many
    [*ROUTE_STEP[:6], [7], *ROUTE_STEP[7:]],  # a recipient that is not a node id
    [*ROUTE_STEP[:8], [["replay"]]],  # a problem without its detail
    [*ROUTE_STEP[:8], [["replay", 3]]],
    [ADMIN, 9, 1, "suspend", "GBR-GW1"],
    [SESSION, 9, 1, "connect", None],
    [99, 9, 1],  # no such kind
    [[ROUTE], 9, 1],
    (ROUTE, 9),
])
def test_a_malformed_step_is_not_a_step(step: Any) -> None:
    assert is_step(ROUTE_STEP, 9) and not is_step(ROUTE_STEP, 8)
    assert not is_step(step, 9)


def _truncated(entries: bytes) -> bytes:
    return entries[:-5]


def _gapped(entries: bytes) -> bytes:
    records, offset = [], 0
    while offset < len(entries):
        length = int.from_bytes(entries[offset + 8:offset + 12], "big")
        records.append(entries[offset:offset + 12 + length])
        offset += 12 + length
    return b"".join(records[:17] + records[18:])


def _corrupted(entries: bytes) -> bytes:
    at = len(entries) // 2
    return entries[:at] + bytes([entries[at] ^ 0x40]) + entries[at + 1:]


@pytest.mark.parametrize("tamper", [_truncated, _gapped, _corrupted])
def test_workers_and_the_auditor_agree_on_a_damaged_export(
        coalition: Coalition, export: Path, monkeypatch: pytest.MonkeyPatch,
        tamper: Callable[[bytes], bytes]) -> None:
    entries = export / "entries.bin"
    entries.write_bytes(tamper(entries.read_bytes()))
    monkeypatch.setattr(replay_workers, "CHUNK", 4)
    spawned: list[subprocess.Popen[bytes]] = []
    spawn = child.spawn

    def recorded(*args: Any) -> subprocess.Popen[bytes]:
        spawned.append(spawn(*args))
        return spawned[-1]

    monkeypatch.setattr(child, "spawn", recorded)
    alone = verify_export(export, pins=[coalition.root_sha256], quorum=0, workers=0)
    helped = verify_export(export, pins=[coalition.root_sha256], quorum=0, workers=3)
    assert helped.to_map() == alone.to_map()
    assert not alone.ok and alone.first_bad_index is not None
    assert len(spawned) == 3 and all(process.poll() is not None for process in spawned)


def test_the_cli_report_stays_json_when_a_worker_is_lost(
        coalition: Coalition, export: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def lost(self: Any) -> Any:
        raise WorkerLost("EOFError: the socket closed")

    monkeypatch.setattr(replay_workers._Worker, "receive", lost)
    code = main(["audit", "verify", str(export), "--pin", coalition.root_sha256.hex(),
                 "--quorum", "0", "--workers", "2", "--json"])
    printed = capsys.readouterr()
    assert code == 1 and json.loads(printed.out)["decisions_replayed"] == 60
    assert "replay_workers_not_started" in printed.err


@pytest.mark.parametrize(("cpus", "large", "small"), [(1, 0, 0), (2, 2, 0), (8, 4, 0)])
def test_workers_by_default_one_per_cpu_for_large_logs(
        monkeypatch: pytest.MonkeyPatch, cpus: int, large: int, small: int) -> None:
    monkeypatch.setattr(replay_workers.os, "sched_getaffinity", lambda _: set(range(cpus)))
    assert default_workers(replay_workers.MIN_ENTRIES) == large
    assert default_workers(replay_workers.MIN_ENTRIES - 1) == small


def test_a_changed_first_entry_is_named_by_the_checkpoints_also_when_leaves_are_short(
        coalition: Coalition, export: Path) -> None:
    """Index 0 is a mismatch like any other (it once read as "none" beside a short
    leaves.bin, and the checkpoints then named the end of the recorded leaves instead)."""
    entries = export / "entries.bin"
    data = bytearray(entries.read_bytes())
    data[12 + 3] ^= 0x01  # inside the first entry's bytes (after its 12-byte header)
    entries.write_bytes(bytes(data))
    leaves = export / "leaves.bin"
    leaves.write_bytes(leaves.read_bytes()[:-32])
    report = verify_export(export, pins=[coalition.root_sha256], quorum=0, workers=0)
    rewritten = [p for p in report.problems if "do not hash to its root" in p.detail]
    assert rewritten and all(p.index == 0 for p in rewritten), report.problems
