"""Auditor: group-commit rate, and the offline verify-and-replay rate of an export.

:func:`broker.bench_audit.measure` writes a realistic mix of ``route`` entries (three
candidates each) and ``deliver`` entries through the production audit log (SQLite,
``synchronous=FULL``, batches of up to 1024), exports the store, and runs
:func:`clients.auditor.verify_export` on it: every root recomputed, every checkpoint signature
checked, every decision replayed with the bundle that was in force, every delivery checked.
"""

from __future__ import annotations

from typing import Any

from broker import bench_audit
from broker.bench.context import Run


def run(bench: Run) -> dict[str, Any]:
    """Measure with ``audit_entries`` entries."""
    base = bench.workdir / "auditor"
    base.mkdir()
    figures = bench_audit.measure(base, bench.options.audit_entries)
    return {
        "status": "ok", "count": figures.entries, "entries": figures.entries,
        "group_commit_per_s": round(figures.commit_per_s, 1),
        "verify_entries_per_s": round(figures.verify_per_s, 1),
        "verify_workers": figures.workers,
        "verify_in_line_entries_per_s": round(figures.in_line_per_s, 1),
        "replay_decisions_per_s": round(figures.replay_per_s, 1),
        "decisions_replayed": figures.decisions_replayed, "verify_s": round(figures.verify_s, 3),
        "problems": figures.problems,
    }
