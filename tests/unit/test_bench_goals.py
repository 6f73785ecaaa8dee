"""The goals of issue 7 judged from a run's results (broker/bench/goals.py): met, not met, or
not measured when the scenario did not run, failed, or ran too small to say."""

from __future__ import annotations

import io
from typing import Any

from broker.bench import goals


def _results(**changes: Any) -> dict[str, Any]:
    results: dict[str, Any] = {
        "throughput": {"status": "ok", "messages_per_s": 3057.0,
                       "ratios": {"vs_verify": 0.252}},
        "latency": {"status": "ok", "points": [
            {"fraction": 0.1, "p99_ms": 6.0, "floor": {"p99_ms": 3.5}},
            {"fraction": 0.25, "p99_ms": 4.2, "floor": {"p99_ms": 13.0},
             "durable_floor": {"p99_ms": 14.5}}]},
        "policy": {"status": "ok", "cpu_per_message_large_over_small": 0.925},
        "backlog": {"status": "ok", "queued": 100_000, "broker_rss_queued_mib": 168.2},
    }
    results.update(changes)
    return results


def test_each_goal_is_judged_on_its_own_figure() -> None:
    verdicts = goals.check(_results())
    assert [(v["value"], v["status"]) for v in verdicts] == [
        (0.252, "not met"), (4.2, "met"), (0.925, "met"), (168.2, "met")]
    # The floors are shown beside, not judged.
    assert verdicts[1]["note"] == "floor p99 13.0 ms; durable floor p99 14.5 ms"
    assert verdicts[0]["note"] == "3,057 msg/s"


def test_the_edges_of_each_goal() -> None:
    edges = goals.check(_results(
        throughput={"status": "ok", "messages_per_s": 1.0, "ratios": {"vs_verify": 0.8}},
        latency={"status": "ok", "points": [{"fraction": 0.25, "p99_ms": 5.001}]},
        policy={"status": "ok", "cpu_per_message_large_over_small": 1.11},
        backlog={"status": "ok", "queued": 100_000, "broker_rss_queued_mib": 256.5}))
    assert [v["status"] for v in edges] == ["met", "not met", "not met", "not met"]


def test_what_did_not_run_or_was_too_small_is_not_measured() -> None:
    verdicts = goals.check(_results(
        throughput={"status": "failed", "reason": "x"},
        latency={"status": "ok", "points": [{"fraction": 0.5, "p99_ms": 1.0}]},
        policy={"status": "ok", "cpu_per_message_large_over_small": None},
        backlog={"status": "ok", "queued": 200, "broker_rss_queued_mib": 92.7}))
    assert [v["status"] for v in verdicts] == ["not measured"] * 4
    assert verdicts[3]["note"] == "only 200 queued"
    assert [v["status"] for v in goals.check({})] == ["not measured"] * 4
    out = io.StringIO()
    goals.print_goals(verdicts, out)
    assert "the goals of issue 7 (this run)" in out.getvalue() and "not measured" in out.getvalue()


def test_the_throughput_verdict_shows_the_machines_budget_beside_it() -> None:
    limits = {"status": "ok", "budget": {"bound_vs_verify": 0.6123}}
    verdict = goals.check(_results(limits=limits))[0]
    assert verdict["status"] == "not met"  # judged on the ratio, not on the budget
    assert verdict["note"] == "3,057 msg/s; the machine's budget allows ≤ 0.61"
    failed = goals.check(_results(limits={"status": "failed", "budget": {"bound_vs_verify": 1}}))
    assert failed[0]["note"] == "3,057 msg/s"
