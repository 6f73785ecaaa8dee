"""Fan-out 1→N: one publisher, N subscribers, every message releasable to all of them.

``USA-P1`` publishes on ``bench.fanout.nN`` with a label releasable to the subscribers'
nations (GBR, FRA, DEU, POL in turn) and the content key sealed to each of the N. The payload
is the one of the throughput scenario's 1 KiB envelope, so the envelope grows by one sealed key
(about 90 bytes) per recipient. Subscribers are spread over up to four processes. One broker
serves every width; each width has its own topic, so earlier subscribers are not candidates.
"""

from __future__ import annotations

from typing import Any

from broker.bench import throughput
from broker.bench.context import Run
from broker.bench.harness import FANOUT, PUBLISHERS, nation_of
from broker.bench.load import LoadPlan, run_load
from broker.bench.workers import PublisherSpec, SubscriberSpec, payload_length

MAX_PROCESSES = 4


def plan(bench: Run, url: str, width: int, messages: int, payload: int) -> LoadPlan:
    """One publisher to the first ``width`` fan-out nodes."""
    keys = str(bench.coalition.keys_dir)
    nodes = FANOUT[:width]
    topic = f"bench.fanout.n{width}"
    rel = tuple(sorted({nation_of(n) for n in nodes}))
    publisher = PublisherSpec(url=url, keys_dir=keys, node=PUBLISHERS[0], topic=topic, rel=rel,
                              recipients=nodes, count=messages, payload=payload,
                              window=bench.options.window)
    groups = [nodes[i::MAX_PROCESSES] for i in range(min(width, MAX_PROCESSES))]
    subscribers = [SubscriberSpec(url=url, keys_dir=keys, nodes=group, topic=topic,
                                  expected=(messages,) * len(group)) for group in groups]
    return LoadPlan([publisher], subscribers)


def run(bench: Run) -> dict[str, Any]:
    """Measure each configured width."""
    options = bench.options
    payload = payload_length(throughput.plan(bench, "", len(PUBLISHERS)).publishers[0])
    points = []
    with bench.broker("fanout") as broker:
        for width in options.fanout:
            result = run_load(plan(bench, broker.url, width, options.fanout_messages, payload),
                              broker)
            points.append({
                "recipients": width, "messages": result.messages, "copies": result.copies,
                "expected_copies": result.expected_copies,
                "messages_per_s": round(result.messages_per_s, 1),
                "copies_per_s": round(result.copies_per_s, 1),
                "broker_cpu_us_per_message": round(result.cpu_us_per(result.messages), 1),
                "broker_cpu_us_per_copy": round(result.cpu_us_per(result.copies), 1),
                "broker_cpu_share": round(result.broker_cpu_share, 3),
                "envelope_bytes": result.envelope_bytes, "errors": result.errors,
                "duplicates": result.duplicates,
            })
    return {"status": "ok", "count": sum(p["copies"] for p in points), "payload_bytes": payload,
            "points": points}
