"""Latency at fixed rates: publish→deliver percentiles of the throughput plan, paced.

The three publishers send at a fixed total rate, a fraction of the maximum message rate
(the throughput scenario's, or a short probe's when it did not run), each pacing its own share
on its schedule with at most ``window`` receipts outstanding. Each publisher stamps every
``pub`` frame as it writes it and each subscriber every ``deliver`` frame as it reads it, with
``time.monotonic_ns()`` — ``CLOCK_MONOTONIC``, one clock for all processes on Linux — so the
difference is publish→deliver through the broker, including the durable commit that comes
before any delivery, both WebSocket hops and the load generators' own scheduling. Percentiles
are nearest-rank over every delivered copy (two per message).

Beside each point, the same load at the same rate through :mod:`broker.bench.relay`
(``floor``) and through the durable relay (``durable_floor``: the same, with the envelopes
written and ``fdatasync``-ed, grouped, before their frames leave, the one cost the design
puts before every delivery), the three in turn (each first in one point): what the machine gives
a server that only relays, and one that only relays durably, in the same minute. The broker's
latency above the durable floor is its own; the floors are the machine's. Beside each, the
share of the machine's CPU time the hypervisor took meanwhile (``steal_share``, from
``/proc/stat``): on a shared virtual machine, stolen time is a tail no program can avoid.
"""

from __future__ import annotations

from typing import Any

from broker.bench import throughput
from broker.bench.context import Run
from broker.bench.harness import BrokerProcess
from broker.bench.load import LoadResult, percentiles, run_load
from broker.bench.relay import Relay

POINTS = (50, 99, 99.9)
#: No point runs longer than this (the count shrinks at low rates).
MAX_POINT_SECONDS = 15.0
WARMUP_MESSAGES = 90


def run(bench: Run) -> dict[str, Any]:
    """Measure every configured fraction of the maximum rate on one broker."""
    options = bench.options
    max_rate = bench.max_message_rate()
    probed = max_rate is None
    if max_rate is None:
        max_rate = throughput.measure(bench, max(60, options.messages // 10),
                                      "latency-probe").messages_per_s
    points = []
    journal = bench.workdir / "latency-relay.journal"  # on the disk of the broker's store
    with bench.broker("latency") as broker, Relay() as relay, Relay(journal) as durable:
        if not options.quick:  # connections, caches and the store warmed up
            run_load(throughput.plan(bench, broker.url, WARMUP_MESSAGES), broker)
        servers: list[Relay | BrokerProcess] = [broker, relay, durable]
        for index, fraction in enumerate(options.latency_fractions):
            rate = max(1.0, fraction * max_rate)
            count = max(30, min(options.latency_messages, int(rate * MAX_POINT_SECONDS)))
            # The floors at the same rate, the machine in the same state: the three in turn,
            # so that none always runs on the heels of another.
            turn = index % len(servers)
            runs = {id(server): _paced(bench, server, count, rate)
                    for server in servers[turn:] + servers[:turn]}
            result, floor, durable_floor = (runs[id(s)] for s in servers)
            latencies, floor_ns = result.latencies_ns(), floor.latencies_ns()
            durable_ns = durable_floor.latencies_ns()
            points.append({
                "fraction": fraction, "target_rate": round(rate, 1),
                "achieved_rate": round(result.messages_per_s, 1), "messages": result.messages,
                "copies": len(latencies), **_percentiles(latencies),
                "publisher_max_lag_ms": round(max(p.max_lag_ms for p in result.publishers), 3),
                "broker_cpu_share": round(result.broker_cpu_share, 3),
                "errors": result.errors, "steal_share": result.steal_share,
                "broker": result.broker_metrics,
                "floor": {"copies": len(floor_ns), "errors": floor.errors,
                          "steal_share": floor.steal_share, **_percentiles(floor_ns)},
                "durable_floor": {"copies": len(durable_ns), "errors": durable_floor.errors,
                                  "steal_share": durable_floor.steal_share,
                                  **_percentiles(durable_ns)},
            })
    return {"status": "ok", "count": sum(p["copies"] for p in points),
            "max_rate": round(max_rate, 1), "max_rate_probed": probed, "points": points}


def _paced(bench: Run, server: Relay | BrokerProcess, count: int, rate: float) -> LoadResult:
    """The throughput plan's ``count`` messages to ``server`` at ``rate``, times recorded."""
    return run_load(throughput.plan(bench, server.url, count, rate=rate, record=True), server)


def _percentiles(latencies: list[int]) -> dict[str, float]:
    return {**{f"{name}_ms": value for name, value in percentiles(latencies, POINTS).items()},
            "max_ms": round(latencies[-1] / 1e6, 3) if latencies else 0.0}
