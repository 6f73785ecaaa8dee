"""Backlog: messages queued for an offline node (broker memory), then drained (rate).

``POL-OFF`` subscribes to ``bench.backlog`` and disconnects. The three publishers then send
``backlog`` envelopes of about 1 KiB releasable to POL only: every receipt says ``queued``, and
each message is a durable queue row and a ``route`` entry. The broker's resident memory
(``VmRSS``) is read before and after. The broker is then stopped (SIGTERM) and started again on
the same data directory: the time from start to listening, with the whole backlog to restore,
and its memory after the restart are measured. Then ``POL-OFF`` connects again and receives
everything from the restarted broker (in-flight window of the broker's default 64, acks in
batches of 16): the drain rate counts from its first delivery to its last, and memory is read
once more when it is done.
"""

from __future__ import annotations

import time
from typing import Any

from broker.bench.context import Run
from broker.bench.harness import OFFLINE, PUBLISHERS, BrokerError, nation_of
from broker.bench.load import LoadPlan, run_load
from broker.bench.workers import PublisherSpec, SubscriberSpec

TOPIC = "bench.backlog"
MiB = 1 << 20


def _subscriber(bench: Run, url: str, expected: int) -> SubscriberSpec:
    return SubscriberSpec(url=url, keys_dir=str(bench.coalition.keys_dir), nodes=(OFFLINE,),
                          topic=TOPIC, expected=(expected,))


def fill_plan(bench: Run, url: str, messages: int) -> LoadPlan:
    keys = str(bench.coalition.keys_dir)
    share = [messages // len(PUBLISHERS) + (i < messages % len(PUBLISHERS))
             for i in range(len(PUBLISHERS))]
    return LoadPlan([PublisherSpec(url=url, keys_dir=keys, node=node, topic=TOPIC,
                                   rel=(nation_of(OFFLINE),), recipients=(OFFLINE,), count=count,
                                   size=bench.options.size, window=bench.options.window)
                     for node, count in zip(PUBLISHERS, share, strict=True)])


def run(bench: Run) -> dict[str, Any]:
    """Queue, measure memory, restart, drain."""
    messages = bench.options.backlog
    with bench.broker("backlog") as broker:
        run_load(LoadPlan(subscribers=[_subscriber(bench, broker.url, 0)]), broker)
        rss_idle = broker.rss_bytes()
        fill = run_load(fill_plan(bench, broker.url, messages), broker)
        if (status := broker.stop()) != 0:
            raise BrokerError(f"the broker exited with status {status} when stopped")
        started = time.monotonic()
        broker.start()
        restart_s = time.monotonic() - started
        rss_restarted = broker.rss_bytes()
        drain = run_load(LoadPlan(subscribers=[_subscriber(bench, broker.url, fill.messages)]),
                         broker)
        rss_drained = broker.rss_bytes()
    queued = fill.statuses.get("queued", 0)
    grown = fill.rss_after - rss_idle
    return {
        "status": "ok", "count": fill.messages, "messages": fill.messages, "queued": queued,
        "envelope_bytes": fill.envelope_bytes,
        "fill_messages_per_s": round(fill.messages_per_s, 1),
        "fill_broker_cpu_us_per_message": round(fill.cpu_us_per(fill.messages), 1),
        "broker_rss_idle_mib": round(rss_idle / MiB, 1),
        "broker_rss_queued_mib": round(fill.rss_after / MiB, 1),
        "restart_s": round(restart_s, 3),
        "broker_rss_restarted_mib": round(rss_restarted / MiB, 1),
        "broker_rss_drained_mib": round(rss_drained / MiB, 1),
        "rss_bytes_per_queued_message": round(grown / queued) if queued else 0,
        "drained": drain.copies, "duplicates": drain.duplicates,
        "drain_messages_per_s": round(drain.copies_per_s, 1),
        "drain_broker_cpu_us_per_message": round(drain.cpu_us_per(drain.copies), 1),
        "drain_s": round(drain.elapsed_s, 3), "errors": fill.errors,
    }
