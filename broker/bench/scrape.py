"""The broker's own account of a load run: its audit commits and its event loop's lag.

A benchmark broker serves its admin API on loopback with a viewer token; around each load run
the harness reads ``/metrics`` (:func:`fetch`) and reports the difference (:func:`between`):
how many commits, how large, how long, what share of the run a commit was running (the stage
that runs back to back at saturation, docs/performance.md session 17), and the event loop's
lag (``coalition_event_loop_lag_seconds``: what every frame and delivery waited for the loop).
Quantiles of a histogram are read from its buckets: "≤ the bucket's bound".
"""

from __future__ import annotations

import dataclasses
import http.client
import math
import time
import urllib.error
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

COMMIT = "coalition_audit_commit_seconds"
ENTRIES = "coalition_audit_committed_entries"
LAG = "coalition_event_loop_lag_seconds"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The counters read once: commit count and seconds, entries, lag buckets (cumulative)."""

    commits: float = 0.0
    commit_s: float = 0.0
    entries: float = 0.0
    lag: tuple[tuple[float, float], ...] = ()  # (upper bound in s, cumulative count)
    #: When it was read (``time.monotonic()``; 0 when parsed from text alone).
    at: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """From the Prometheus text format; metrics it does not find stay 0."""
        commits = commit_s = entries = 0.0
        lag: list[tuple[float, float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == f"{COMMIT}_count":
                    commits = sample.value
                elif sample.name == f"{COMMIT}_sum":
                    commit_s = sample.value
                elif sample.name == f"{ENTRIES}_total":
                    entries = sample.value
                elif sample.name == f"{LAG}_bucket":
                    lag.append((float(sample.labels["le"]), sample.value))
        return cls(commits, commit_s, entries, tuple(sorted(lag)))


def fetch(url: str, token: str, timeout: float = 10.0) -> Snapshot | None:
    """``/metrics`` of the admin API at ``url``; ``None`` if it does not answer (the report
    then leaves the fields out rather than stopping the benchmark)."""
    request = urllib.request.Request(f"{url}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
        return None
    return dataclasses.replace(Snapshot.parse(text), at=time.monotonic())


def between(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What the broker did from ``before`` to ``after`` (read at their ``at`` times)."""
    elapsed_s = after.at - before.at
    commits = after.commits - before.commits
    commit_s = after.commit_s - before.commit_s
    entries = after.entries - before.entries
    counts = {bound: count for bound, count in before.lag}
    lag = [(bound, count - counts.get(bound, 0.0)) for bound, count in after.lag]
    return {
        "commits": int(commits), "entries": int(entries),
        "entries_per_commit": round(entries / commits, 1) if commits else None,
        "commit_ms_mean": round(commit_s / commits * 1e3, 3) if commits else None,
        "commit_busy_share": round(commit_s / elapsed_s, 3) if elapsed_s > 0 else None,
        "loop_lag_samples": int(lag[-1][1]) if lag else 0,
        "loop_lag_p50_le_ms": _quantile_bound(lag, 0.5),
        "loop_lag_p99_le_ms": _quantile_bound(lag, 0.99),
    }


def _quantile_bound(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound (ms) of the first bucket holding the ``q`` quantile; ``None`` without
    samples or beyond the last finite bucket (1 s: ``loop_lag_samples`` tells which)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    wanted = q * buckets[-1][1]
    for bound, count in buckets:
        if count >= wanted:
            return round(bound * 1e3, 3) if math.isfinite(bound) else None
    return None
