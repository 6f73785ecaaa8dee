"""The benchmark's reading of a broker's /metrics (broker/bench/scrape.py): the broker's own
exposition parsed, differences over a run, quantiles as bucket bounds."""

from __future__ import annotations

import dataclasses

from broker.bench.scrape import Snapshot, between
from broker.metrics import Metrics


def _exposition(commits: list[tuple[float, int]], lags: list[float]) -> str:
    metrics = Metrics()
    for seconds, entries in commits:
        metrics.committed(seconds, entries)
    for lag in lags:
        metrics.loop_lag.observe(lag)
    return metrics.exposition().decode()


def test_the_brokers_own_exposition_is_read() -> None:
    snapshot = Snapshot.parse(_exposition([(0.010, 300), (0.030, 600)], [0.0004, 0.003]))
    assert (snapshot.commits, snapshot.entries) == (2, 900)
    assert abs(snapshot.commit_s - 0.040) < 1e-9
    assert dict(snapshot.lag)[0.001] == 1 and dict(snapshot.lag)[0.005] == 2
    assert snapshot.lag[-1] == (float("inf"), 2)


def test_a_run_is_the_difference_of_two_snapshots() -> None:
    before = Snapshot.parse(_exposition([(0.5, 1000)], [0.2] * 10))
    after = Snapshot.parse(_exposition([(0.5, 1000), (0.010, 300), (0.030, 600)],
                                       [0.2] * 10 + [0.0004] * 98 + [0.015, 0.3]))
    run = between(dataclasses.replace(before, at=10.0), dataclasses.replace(after, at=10.2))
    assert run["commits"] == 2 and run["entries"] == 900 and run["entries_per_commit"] == 450
    assert run["commit_ms_mean"] == 20 and run["commit_busy_share"] == 0.2
    # 100 samples in the run (the 10 before are not): 98 within 1 ms, then 20 and 500 ms.
    assert run["loop_lag_samples"] == 100
    assert run["loop_lag_p50_le_ms"] == 1
    assert run["loop_lag_p99_le_ms"] == 20


def test_nothing_measured_is_none_not_zero() -> None:
    empty = Snapshot.parse(_exposition([], []))
    run = between(empty, empty)
    assert run["commits"] == 0 and run["loop_lag_samples"] == 0
    assert run["entries_per_commit"] is run["commit_ms_mean"] is run["commit_busy_share"] is None
    assert run["loop_lag_p99_le_ms"] is None
    beyond = Snapshot.parse(_exposition([], [2.0, 3.0]))
    assert between(empty, beyond)["loop_lag_p99_le_ms"] is None  # past the 1 s bucket
    assert Snapshot.parse("") == Snapshot()
