"""Throughput: three publisher processes → three subscribers, each message releasable to two.

Publishers ``USA-P1..3`` send pre-built envelopes of about 1 KiB labelled ``NATO SECRET REL
FRA, GBR`` on ``bench.tput``; ``GBR-S1``, ``FRA-S1`` and ``DEU-S1`` subscribe, so every message
has three candidates, two permits and one ``not_in_audience`` deny. Policy, the durable audit
log and the durable queues are all on (a real broker process with its SQLite store).
"""

from __future__ import annotations

from typing import Any

from broker.bench.context import Run
from broker.bench.harness import AUDIENCE, PUBLISHERS, SUBSCRIBERS, nation_of
from broker.bench.load import LoadPlan, LoadResult, run_load
from broker.bench.workers import PublisherSpec, SubscriberSpec

TOPIC = "bench.tput"


def plan(run: Run, url: str, messages: int, *, rate: float | None = None,
         record: bool = False) -> LoadPlan:
    """The three-by-three plan: ``messages`` over the three publishers, at ``rate`` messages
    per second in total (``None``: as fast as the broker takes them)."""
    keys = str(run.coalition.keys_dir)
    permitted = tuple(n for n in SUBSCRIBERS if nation_of(n) in AUDIENCE)
    share = [messages // len(PUBLISHERS) + (i < messages % len(PUBLISHERS))
             for i in range(len(PUBLISHERS))]
    publishers = [
        PublisherSpec(url=url, keys_dir=keys, node=node, topic=TOPIC, rel=AUDIENCE,
                      recipients=permitted, count=count, size=run.options.size,
                      window=run.options.window,
                      rate=rate / len(PUBLISHERS) if rate else None, record=record)
        for node, count in zip(PUBLISHERS, share, strict=True)]
    subscribers = [
        SubscriberSpec(url=url, keys_dir=keys, nodes=(node,), topic=TOPIC,
                       expected=(messages if node in permitted else 0,), record=record)
        for node in SUBSCRIBERS]
    return LoadPlan(publishers, subscribers)


def measure(run: Run, messages: int, name: str = "throughput") -> LoadResult:
    """One run of the plan at full speed against a fresh broker."""
    with run.broker(name) as broker:
        return run_load(plan(run, broker.url, messages), broker)


def run(bench: Run) -> dict[str, Any]:
    """The scenario's JSON result (ratios are added by the report)."""
    result = measure(bench, bench.options.messages)
    return {"status": "ok", "count": result.messages, "publishers": len(PUBLISHERS),
            "subscribers": len(SUBSCRIBERS), "copies_per_message": 2,
            **result.summary()}
