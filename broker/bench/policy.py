"""Policy scale: the broker's per-message cost at 3 nations / 2 agreements and at 100 / 300.

For each size, :func:`broker.bench_policy.synthetic_documents` generates and signs the
coalition (one gateway per nation, agreements of 3–8 parties; the measured pairs are covered by
the same two agreements at every size), which is written to disk and served by a fresh broker
process. ``N000-GW1`` publishes to ``N001-GW1`` (inner tier: permitted) and ``N002-GW1``
(partner tier up to RESTRICTED: ``above_ceiling``) with a ``SECRET REL ALL`` label. The figure
that matters is the broker's CPU time per message at each size. Beside it, the in-process
policy part of a publish (``broker.bench_policy``: candidates and decisions through the
decision cache, cold and warm) for the same sizes.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from broker import bench_policy
from broker.bench.context import Options, Run
from broker.bench.load import LoadPlan, LoadResult, run_load
from broker.bench.workers import PublisherSpec, SubscriberSpec
from broker.coalition import Coalition, write_documents, write_keys

TOPIC = "maritime.tracks"
SENDER, PERMITTED, DENIED = "N000-GW1", "N001-GW1", "N002-GW1"
#: bench_policy figures reported beside the broker's (name prefix → JSON key).
IN_PROCESS = {
    "decide() miss: permit, REL one nation": "decide_miss_us",
    "DecisionCache hit": "cache_hit_us",
    "publish to 2 subscribers, cold": "publish_policy_cold_us",
    "publish to 2 subscribers, warm": "publish_policy_warm_us",
}


def write_synthetic(bench: Run, nations: int, agreements: int) -> Coalition:
    """Generate, sign and write a synthetic coalition valid now."""
    made = bench_policy.synthetic_documents(nations, agreements,
                                            now_ms=time.time_ns() // 1_000_000)
    base = bench.workdir / f"coalition-{nations}-{agreements}"
    write_documents(made.documents, base / "policy")
    write_keys(made, base / "keys")
    return Coalition(base=base, policy_dir=base / "policy", keys_dir=base / "keys",
                     broker_name=made.broker_name, broker_key=made.broker_key,
                     authorities=made.authorities, nodes=made.nodes,
                     root_sha256=made.root_sha256)


def plan(bench: Run, coalition: Coalition, url: str, messages: int) -> LoadPlan:
    keys = str(coalition.keys_dir)
    publisher = PublisherSpec(url=url, keys_dir=keys, node=SENDER, topic=TOPIC,
                              rel=(bench_policy.ALL,), recipients=(PERMITTED,), count=messages,
                              size=bench.options.size, window=bench.options.window)
    subscriber = SubscriberSpec(url=url, keys_dir=keys, nodes=(PERMITTED, DENIED), topic=TOPIC,
                                expected=(messages, 0))
    return LoadPlan([publisher], [subscriber])


def in_process(nations: int, agreements: int, ops: int, rounds: int) -> dict[str, float]:
    """The policy part of a publish, measured in this process (µs per operation)."""
    measures = bench_policy.measure_all(bench_policy.coalition_cases(nations, agreements,
                                                                     ops=ops), rounds)
    out = {}
    for measure in measures:
        for prefix, key in IN_PROCESS.items():
            if measure.name.startswith(prefix):
                out[key] = round(measure.us_per_op, 2)
    return out


def run(bench: Run) -> dict[str, Any]:
    """Measure each configured coalition size, the sizes taking turns over
    ``policy_broker_rounds`` rounds (a fresh broker each time): each size reports its round with
    the least broker CPU per message. On a shared machine, disturbance only ever adds CPU time,
    and a slow spell then falls on one round of one size, not on a whole size."""
    options = bench.options
    coalitions = {size: write_synthetic(bench, *size) for size in options.policy_sizes}
    rounds: dict[tuple[int, int], list[LoadResult]] = {size: [] for size in coalitions}
    for number in range(options.policy_broker_rounds):
        order = list(coalitions) if number % 2 == 0 else list(coalitions)[::-1]
        for nations, agreements in order:  # turn about: no size always runs first
            with bench.broker(f"policy-{nations}-{agreements}",
                              coalitions[nations, agreements]) as broker:
                rounds[nations, agreements].append(run_load(
                    plan(bench, coalitions[nations, agreements], broker.url,
                         options.policy_messages), broker))
    sizes = [_size(nations, agreements, results, options)
             for (nations, agreements), results in rounds.items()]
    return summary(sizes, sum(r.messages for rs in rounds.values() for r in rs))


def summary(sizes: list[dict[str, Any]], count: int) -> dict[str, Any]:
    """The scenario's result from its sizes' figures (:func:`_size`): failed when a size has
    no complete round; the ratio of the largest size's CPU per message to the smallest's, or
    ``None`` when either is 0 µs, i.e. below the resolution of the kernel's CPU clock (10 ms:
    a quick run's few messages can cost less than one tick)."""
    incomplete = [f"{s['nations']} / {s['agreements']}" for s in sizes if not s["complete"]]
    if incomplete:
        return {"status": "failed", "count": 0, "sizes": sizes,
                "reason": "no round delivered every message without an error at "
                          + ", ".join(incomplete)}
    small, large = sizes[0]["broker_cpu_us_per_message"], sizes[-1]["broker_cpu_us_per_message"]
    ratio = round(large / small, 3) if small and large else None
    return {"status": "ok", "count": count, "sizes": sizes,
            "cpu_per_message_large_over_small": ratio}


def _size(nations: int, agreements: int, results: list[LoadResult],
          options: Options) -> dict[str, Any]:
    """One size's figures: its complete round (every message delivered, no error) with the
    least broker CPU per message (0 when no round was complete: ``complete`` false); errors of
    every round."""
    cpu = [round(r.cpu_us_per(r.messages), 1) for r in results]
    complete = [i for i, r in enumerate(results)
                if r.messages and not r.errors and r.copies == r.expected_copies]
    best = min(complete, key=cpu.__getitem__, default=None)
    result = results[-1 if best is None else best]
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r.errors)
    return {
        "nations": nations, "agreements": agreements, "messages": result.messages,
        "copies": result.copies, "messages_per_s": round(result.messages_per_s, 1),
        "complete": best is not None,
        "broker_cpu_us_per_message": 0.0 if best is None else cpu[best],
        "broker_cpu_us_per_message_rounds": cpu,
        "broker_cpu_share": round(result.broker_cpu_share, 3),
        "statuses": result.statuses, "errors": dict(errors),
        **in_process(nations, agreements, options.policy_ops, options.policy_rounds),
    }
