"""The goals of issue 7, judged from one run's results: each ``met``, ``not met`` or ``not
measured`` (its scenario did not run, failed, or ran too small to say), with the figure it was
judged on. Pure: results in, verdicts out.

- throughput ≥ 0.8 × the single-core verify rate (``throughput`` ÷ the ``limits``' verify;
  the machine's budget, :mod:`broker.bench.budget`, is shown beside it: the highest ratio any
  broker doing the same parts could reach here);
- p99 ≤ 5 ms at 25 % of the maximum rate (``latency``; the floors measured beside it, plain
  and durable, are shown, not judged: the goal is the broker's);
- broker CPU per message flat (±10 %) from 3 nations / 2 agreements to 100 / 300 (``policy``);
- 100,000 messages queued for an offline node within 256 MiB of broker RSS (``backlog``; a run
  that queued fewer does not say).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, TextIO

from broker.bench.report import table

Results = Mapping[str, Mapping[str, Any]]

VERIFY_RATIO = 0.8
P99_MS, P99_FRACTION = 5.0, 0.25
FLAT = 0.10
BACKLOG_MESSAGES, BACKLOG_MIB = 100_000, 256.0


def check(results: Results) -> list[dict[str, Any]]:
    """One verdict per goal, in the order of the module docstring."""
    return [_throughput(results), _latency(results), _policy(results), _backlog(results)]


def _ok(results: Results, name: str) -> Mapping[str, Any] | None:
    result = results.get(name)
    return result if result is not None and result.get("status") == "ok" else None


def _verdict(goal: str, value: Any, met: bool | None, note: str = "") -> dict[str, Any]:
    status = "not measured" if met is None else "met" if met else "not met"
    return {"goal": goal, "value": value, "status": status, "note": note}


def _throughput(results: Results) -> dict[str, Any]:
    goal = f"throughput ≥ {VERIFY_RATIO} × single-core verify"
    result = _ok(results, "throughput")
    ratio = (result.get("ratios") or {}).get("vs_verify") if result else None
    if ratio is None:
        return _verdict(goal, None, None, "needs the throughput scenario and the limits")
    note = f"{result['messages_per_s']:,.0f} msg/s" if result else ""
    bound = ((_ok(results, "limits") or {}).get("budget") or {}).get("bound_vs_verify")
    if bound is not None:
        note += f"; the machine's budget allows ≤ {bound:.2f}"
    return _verdict(goal, ratio, ratio >= VERIFY_RATIO, note)


def _latency(results: Results) -> dict[str, Any]:
    goal = f"p99 ≤ {P99_MS:g} ms at {P99_FRACTION:.0%} of max"
    result = _ok(results, "latency")
    points = [p for p in (result or {}).get("points", ())
              if abs(p["fraction"] - P99_FRACTION) < 1e-9]
    if not points:
        return _verdict(goal, None, None, f"needs a latency point at {P99_FRACTION:.0%}")
    point = points[0]
    floor = point.get("floor", {}).get("p99_ms")
    durable = point.get("durable_floor", {}).get("p99_ms")
    note = "; ".join(f"{name} p99 {value} ms" for name, value in
                     (("floor", floor), ("durable floor", durable)) if value is not None)
    return _verdict(goal, point["p99_ms"], point["p99_ms"] <= P99_MS, note)


def _policy(results: Results) -> dict[str, Any]:
    goal = f"CPU per message flat (±{FLAT:.0%}) from 3 to 100 nations"
    result = _ok(results, "policy")
    ratio = result.get("cpu_per_message_large_over_small") if result else None
    if ratio is None:
        return _verdict(goal, None, None, "needs the policy scenario with measurable CPU")
    return _verdict(goal, ratio, abs(ratio - 1) <= FLAT)


def _backlog(results: Results) -> dict[str, Any]:
    goal = f"{BACKLOG_MESSAGES:,} queued within {BACKLOG_MIB:g} MiB RSS"
    result = _ok(results, "backlog")
    if result is None:
        return _verdict(goal, None, None, "needs the backlog scenario")
    rss, queued = result["broker_rss_queued_mib"], result["queued"]
    if queued < BACKLOG_MESSAGES:
        return _verdict(goal, rss, None, f"only {queued:,} queued")
    return _verdict(goal, rss, rss <= BACKLOG_MIB, f"{queued:,} queued")


def print_goals(verdicts: list[dict[str, Any]], out: TextIO = sys.stdout) -> None:
    """The verdicts as a table."""
    table("the goals of issue 7 (this run)", ["goal", "value", "verdict", "note"],
          [[v["goal"], v["value"], v["status"], v["note"]] for v in verdicts], out)
