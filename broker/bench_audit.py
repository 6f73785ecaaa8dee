"""Audit log benchmarks: group-commit throughput and auditor verify/replay rate.

Run ``python -m broker.bench_audit [--entries N]`` (``coalition bench --scenario auditor``
runs :func:`measure` too). Everything is real: a throwaway coalition with signed documents, a
SQLite store with ``synchronous=FULL`` in a temporary directory, the production
:class:`~broker.audit.log.AuditLog`, and :func:`clients.auditor.verify_export`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path

from broker.audit.commit_policy import CommitPolicy
from broker.audit.leaves import DeliverEntry, PolicyEntry, RouteEntry
from broker.audit.log import AuditLog
from broker.audit.note import Signer
from broker.coalition import DAY_MS, NodeSpec, build_coalition
from broker.release import decide_recipient
from broker.store.sqlite import SqliteStore
from clients.auditor import verify_export
from clients.export import export_store
from clients.gateway import label
from clients.replay_workers import default_workers
from policies.bundle import Bundle, bundle_content


def _entries(bundle: Bundle, count: int, now: int,
             delivers: int = 1) -> list[RouteEntry | DeliverEntry]:
    """Realistic traffic: a route entry (3 candidates) then ``delivers`` deliver entries, in
    turn, ``count`` entries in all (rounded down to whole messages)."""
    lab = label("NATO", "SECRET", "USA", ["GBR"])
    sender = bundle.nodes["USA-GW1"]
    out: list[RouteEntry | DeliverEntry] = []
    for i in range(count // (1 + delivers)):
        message = hashlib.sha256(i.to_bytes(8, "big")).digest()[:16]
        decisions = {node: decide_recipient(lab, sender, node, "reports.daily", now + i, bundle,
                                            sealed_for=("GBR-GW1",))
                     for node in ("FRA-GW1", "GBR-GW1", "USA-GW2")}
        out.append(RouteEntry(ts=now + i, id=message, env=message * 2, sender="USA-GW1",
                              topic="reports.daily", label=lab, prec=0, ttl=3600,
                              bundle=bundle.hash, sealed=("GBR-GW1",), decisions=decisions))
        out.extend(DeliverEntry(ts=now + i, id=message, to="GBR-GW1", seq=(1 + delivers) * i + k)
                   for k in range(1, 1 + delivers))
    return out


@dataclasses.dataclass(frozen=True)
class _Filled:
    entries: int
    #: Wall seconds, and CPU seconds of this process (every thread: the commit runs in one).
    wall_s: float
    cpu_s: float


async def _fill(data: Path, signer: Signer, bundle: Bundle,
                entries: list[RouteEntry | DeliverEntry], now: int) -> _Filled:
    audit = AuditLog(SqliteStore(data / "broker.sqlite"), signer,
                     policy=CommitPolicy(max_batch=1024, max_delay_s=0.002))
    await audit.start()
    await audit.append(PolicyEntry(ts=now, bundle=bundle.hash),
                       bundles=[(bundle.hash, bundle_content(bundle))])
    start, cpu = time.perf_counter(), time.process_time()
    # Many publishers at once, as on a busy broker: each append waits for its commit.
    window = 4096
    for first in range(0, len(entries), window):
        await asyncio.gather(*(audit.append(e) for e in entries[first:first + window]))
    filled = _Filled(len(entries), time.perf_counter() - start, time.process_time() - cpu)
    await audit.stop()
    audit.store.close()
    return filled


def _coalition(base: Path, now: int) -> tuple[Bundle, Signer, bytes]:
    nodes = [NodeSpec("USA-GW1", "USA"), NodeSpec("USA-GW2", "USA"),
             NodeSpec("GBR-GW1", "GBR"), NodeSpec("FRA-GW1", "FRA")]
    coalition = build_coalition(base / "coalition", nations=["FRA", "GBR", "USA"], nodes=nodes,
                                now_ms=now - DAY_MS)
    signer = Signer.from_seed(coalition.broker_name, bytes(coalition.broker_key.signing_key))
    return coalition.bundle(), signer, coalition.root_sha256


def audit_cpu_per_message(base: Path, messages: int, delivers: int = 2) -> float:
    """CPU microseconds the production audit log spends per message whose route entry (three
    candidates) is followed by ``delivers`` deliver entries (two in the throughput plan):
    entry encoding, Merkle hashing, the SQLite rows and the durable commits, all threads of
    this process, written in large batches (the cheapest way the log commits). The queue and
    message rows a broker also writes are not in it."""
    now = time.time_ns() // 1_000_000
    bundle, signer, _ = _coalition(base, now)
    entries = _entries(bundle, messages * (1 + delivers), now, delivers)
    filled = asyncio.run(_fill(base / "data", signer, bundle, entries, now))
    return filled.cpu_s / (len(entries) // (1 + delivers)) * 1e6


@dataclasses.dataclass(frozen=True)
class AuditFigures:
    """What :func:`measure` found."""

    entries: int
    commit_per_s: float
    verify_s: float
    decisions_replayed: int
    problems: int
    #: Worker processes of the timed verification (``verify_s``); ``in_line_s``: with none.
    workers: int = 0
    in_line_s: float = 0.0

    @property
    def verify_per_s(self) -> float:
        """Entries verified per second (including the decision replay)."""
        return self.entries / self.verify_s

    @property
    def in_line_per_s(self) -> float:
        """Entries verified per second by the auditor's process alone."""
        return self.entries / self.in_line_s

    @property
    def replay_per_s(self) -> float:
        """Decisions replayed per second of the verification."""
        return self.decisions_replayed / self.verify_s


def measure(base: Path, entries: int) -> AuditFigures:
    """Write ``entries`` entries through the group commit under ``base``, export the store and
    verify the export (offline, pinning the trust root, as ``coalition audit verify`` does)."""
    now = time.time_ns() // 1_000_000
    bundle, signer, root_sha256 = _coalition(base, now)
    filled = asyncio.run(_fill(base / "data", signer, bundle, _entries(bundle, entries, now),
                               now))
    rate = filled.entries / filled.wall_s
    store = SqliteStore(base / "data" / "broker.sqlite")
    export_store(store, signer.name, base / "export")
    store.close()
    workers = default_workers(entries)
    timed = {}
    for count in sorted({0, workers}):
        start = time.perf_counter()
        report = verify_export(base / "export", pins=[root_sha256], quorum=0,
                               workers=count)
        timed[count] = time.perf_counter() - start, report
    elapsed, report = timed[workers]
    if report.to_map() != timed[0][1].to_map():
        raise RuntimeError(f"the report with {workers} workers differs from the one in line")
    return AuditFigures(entries=report.entries, commit_per_s=rate, verify_s=elapsed,
                        decisions_replayed=report.decisions_replayed,
                        problems=len(report.problems), workers=workers, in_line_s=timed[0][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp), args.entries)
    print(f"group commit   {figures.commit_per_s:10,.0f} entries/s (SQLite WAL, "
          f"synchronous=FULL, {args.entries} entries)")
    print(f"audit verify   {figures.verify_per_s:10,.0f} entries/s "
          f"({figures.decisions_replayed} decisions replayed, {figures.problems} "
          f"problems, {figures.verify_s:.2f} s, {figures.workers} worker processes)")
    print(f"  in line      {figures.in_line_per_s:10,.0f} entries/s (no workers)")


if __name__ == "__main__":
    main()
