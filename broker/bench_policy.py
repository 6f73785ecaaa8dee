"""Benchmark of the release decision: ``python -m broker.bench_policy``.

Measures, on a small coalition (3 nations, 2 agreements) and a large one (100 nations, 300
agreements), both generated and signed in memory:

- ``decide()`` on a cache miss (the pure function, called directly), for a permit whose label
  releases to one nation, the same label released to a community of every nation, and a deny;
- :class:`policies.cache.DecisionCache` on a hit and on a miss (key, ``decide()``, validity
  interval, insertion and eviction);
- the policy cost of one publish: the candidate recipients (``router.candidate_recipients``) and
  a decision for each (:func:`broker.release.decide_recipient`, as the hub makes it), with two
  subscribers (alone, and among every other node subscribed to another topic) and with every
  node subscribed, cold (empty cache) and warm; each message has its own label object, as each
  envelope is parsed into one.

Timing uses :func:`time.perf_counter`; each figure is the best of several rounds (the least
disturbed by other processes), reported as operations per second and microseconds per operation.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import sys
import time
from collections.abc import Callable, Sequence

from broker import router
from broker.coalition import (
    DAY_MS,
    CoalitionDocuments,
    NodeSpec,
    coalition_documents,
    default_common_scheme,
)
from broker.release import decide_recipient
from clients.gateway import label
from policies.bundle import Bundle
from policies.cache import DecisionCache, label_digest
from policies.decide import decide
from policies.model import Agreement, Label, NodeCert, Tier

NOW = 1_800_000_000_000
ALL = "ALL"
TOPIC = "maritime.tracks"
COMMON = default_common_scheme("NATO")


@dataclasses.dataclass(frozen=True)
class Measure:
    """One benchmark figure."""

    coalition: str
    name: str
    ops: int
    seconds: float
    recipients: int = 0  # for a publish: decisions per message

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.ops * 1e6

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def us_per_recipient(self) -> float | None:
        return self.us_per_op / self.recipients if self.recipients else None


def nation_codes(count: int) -> list[str]:
    return [f"N{i:03d}" for i in range(count)]


def synthetic_agreements(nations: Sequence[str], count: int, seed: int = 7, *,
                         now_ms: int = NOW) -> list[Agreement]:
    """``count`` agreements of a few parties each (an inner tier up to SECRET for most, a
    partner tier up to RESTRICTED without NTK for the rest). The first two cover the benchmark's
    sender (``nations[0]``), its peer (``nations[1]``, inner tier) and a partner
    (``nations[2]``, partner tier only); the others are drawn among the remaining nations, so
    the measured pairs have the same candidates at every coalition size."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        if index < 2:
            parties = list(nations[:3])
        else:
            others = list(nations[3:]) or list(nations)
            parties = sorted(rng.sample(others, min(len(others), rng.randint(3, 8))))
        inner, partners = parties[:-1], parties[-1:]
        if index == 1:
            inner, partners = list(nations[:2]), [nations[2]]
        out.append(Agreement(
            id=f"DSA-{index:04d}", version=1, purpose="synthetic", parties=tuple(sorted(parties)),
            not_before=now_ms - DAY_MS, not_after=now_ms + 365 * DAY_MS,
            tiers=(Tier("inner", tuple(sorted(inner)), "SECRET", topics=("maritime.>",)),
                   Tier("partners", tuple(sorted(partners)), "RESTRICTED",
                        categories={"NTK": ()})),
        ))
    return out


def synthetic_documents(nations: int, agreements: int, *,
                        now_ms: int = NOW) -> CoalitionDocuments:
    """A coalition of ``nations`` (one gateway ``NATION-GW1`` each, a national scheme each, a
    community ``ALL`` of every nation) and ``agreements`` agreements, signed, with every
    validity window around ``now_ms``."""
    codes = nation_codes(nations)
    return coalition_documents(
        nations=codes, now_ms=now_ms, communities={ALL: codes}, common=COMMON,
        nodes=[NodeSpec(f"{c}-GW1", c, "SECRET", {"NTK": ["ALPHA", "BRAVO"]}) for c in codes],
        agreements=synthetic_agreements(codes, agreements, now_ms=now_ms),
    )


def synthetic_bundle(nations: int, agreements: int) -> Bundle:
    """:func:`synthetic_documents`, verified as the broker would load it."""
    return synthetic_documents(nations, agreements).bundle()


@dataclasses.dataclass(frozen=True)
class Case:
    """Something to time: ``run(ops)`` performs ``ops`` operations."""

    coalition: str
    name: str
    ops: int
    run: Callable[[int], None]
    recipients: int = 0


def time_once(case: Case) -> float:
    """One timing of ``case.run(case.ops)``, in seconds, with the garbage collector paused."""
    gc.disable()
    try:
        start = time.perf_counter()
        case.run(case.ops)
        return time.perf_counter() - start
    finally:
        gc.enable()


def measure_all(cases: Sequence[Case], rounds: int) -> list[Measure]:
    """Time every case ``rounds`` times, round-robin (so a burst of load from another process
    hits every case alike), and keep each case's fastest round."""
    best = [float("inf")] * len(cases)
    for _ in range(rounds):
        for index, case in enumerate(cases):
            best[index] = min(best[index], time_once(case))
    return [Measure(c.coalition, c.name, c.ops, seconds, c.recipients)
            for c, seconds in zip(cases, best, strict=True)]


def _loop(body: Callable[[], object]) -> Callable[[int], None]:
    def run(ops: int) -> None:
        for _ in range(ops):
            body()
    return run


def coalition_cases(nations: int, agreements: int, *, ops: int) -> list[Case]:
    """Every case for one coalition size (the bundle is built, signed and verified first)."""
    bundle = synthetic_bundle(nations, agreements)
    name = f"{nations} / {agreements}"
    codes = nation_codes(nations)
    sender, peer, partner = (bundle.nodes[f"{c}-GW1"] for c in codes[:3])
    to_one = label(codes[0], "SECRET", codes[0], [codes[1]], {"NTK": ["ALPHA"]})
    to_all = label(codes[0], "SECRET", codes[0], [ALL], {"NTK": ["ALPHA"]})
    to_partner = label(codes[0], "SECRET", codes[0], [codes[2]])
    assert decide(to_one, sender, peer, TOPIC, NOW, bundle).permit
    assert decide(to_partner, sender, partner, TOPIC, NOW, bundle).reasons == ("above_ceiling",)
    warm = DecisionCache()
    warm.decide(to_one, sender, peer, TOPIC, NOW, bundle)
    return [
        Case(name, "decide() miss: permit, REL one nation", ops,
             _loop(lambda: decide(to_one, sender, peer, TOPIC, NOW, bundle))),
        Case(name, f"decide() miss: permit, REL community of {nations}", ops,
             _loop(lambda: decide(to_all, sender, peer, TOPIC, NOW, bundle))),
        Case(name, "decide() miss: deny above_ceiling", ops,
             _loop(lambda: decide(to_partner, sender, partner, TOPIC, NOW, bundle))),
        Case(name, "DecisionCache hit", ops,
             _loop(lambda: warm.decide(to_one, sender, peer, TOPIC, NOW, bundle))),
        Case(name, "DecisionCache miss (decide + key + interval)", ops,
             _cache_misses(to_one, sender, peer, bundle)),
        Case(name, "label_digest() of a new label object", ops,
             _loop(lambda: label_digest(dataclasses.replace(to_one)))),
        *_publish_cases(bundle, name, to_all, ops),
    ]


def _cache_misses(lab: Label, sender: NodeCert, recipient: NodeCert,
                  bundle: Bundle) -> Callable[[int], None]:
    """Every call misses: a one-entry cache and two topics, alternating."""
    cache = DecisionCache(max_entries=1)
    topics = (TOPIC, TOPIC + "2")

    def run(ops: int) -> None:
        for i in range(ops):
            cache.decide(lab, sender, recipient, topics[i & 1], NOW, bundle)
    return run


def _publish_cases(bundle: Bundle, name: str, lab: Label, ops: int) -> list[Case]:
    """The policy cost of one publish from the first node: to two subscribers (alone, then with
    every other node subscribed to an unrelated topic) and to every node, cold and warm."""
    nodes = sorted(bundle.nodes)
    two = {node: {"maritime.>"} for node in nodes[1:3]}
    plans = [
        ("2 subscribers", two),
        (f"2 subscribers + {len(nodes) - 3} on other topics",
         {**{node: {"land.>"} for node in nodes[3:]}, **two}),
        (f"{len(nodes) - 1} subscribers", {node: {"maritime.>"} for node in nodes[1:]}),
    ]
    out = []
    for what, subscriptions in plans[:1] + [p for p in plans[1:] if len(nodes) > 3]:
        recipients = sum("maritime.>" in patterns for patterns in subscriptions.values())
        messages = max(5, ops // (5 * recipients))
        for warm in (False, True):
            run = _publish_run(bundle, nodes[0], lab, subscriptions, warm=warm)
            out.append(Case(name, f"publish to {what}, {'warm' if warm else 'cold'}", messages,
                            run, recipients))
    return out


def _publish_run(bundle: Bundle, sender: str, lab: Label, subscriptions: dict[str, set[str]],
                 *, warm: bool) -> Callable[[int], None]:
    """What the hub does per publish before queueing: candidates, then one decision each
    (through the decision cache, emptied before each message when ``warm`` is false)."""
    cert = bundle.nodes[sender]
    cache = DecisionCache()
    sealed = frozenset(subscriptions)

    def run(ops: int) -> None:
        for _ in range(ops):
            if not warm:
                cache.clear()
            message_label = dataclasses.replace(lab)  # a new object, as parsed per envelope
            for node in router.candidate_recipients(sender, TOPIC, (), subscriptions):
                decide_recipient(message_label, cert, node, TOPIC, NOW, bundle,
                                 sealed_for=sealed, cache=cache)
    return run


def report(measures: Sequence[Measure]) -> str:
    """A table: coalition, figure, µs per operation (or message), operations per second, and
    for a publish µs per recipient."""
    lines = [f"{'coalition':<10} {'measure':<51} {'µs/op':>8} {'ops/s':>9} {'µs/recipient':>13}"]
    for m in measures:
        per_recipient = "" if m.us_per_recipient is None else f"{m.us_per_recipient:.1f}"
        lines.append(f"{m.coalition:<10} {m.name:<51} {m.us_per_op:>8.1f} {m.ops_per_s:>9,.0f} "
                     f"{per_recipient:>13}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark for 3/2 and 100/300 and print the table."""
    parser = argparse.ArgumentParser(prog="python -m broker.bench_policy",
                                     description="Benchmark of the release decision.")
    parser.add_argument("--ops", type=int, default=2000, help="operations per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds (the fastest is kept)")
    args = parser.parse_args(argv)
    cases: list[Case] = []
    for nations, agreements in ((3, 2), (100, 300)):
        started = time.perf_counter()
        cases += coalition_cases(nations, agreements, ops=args.ops)
        print(f"# {nations} nations / {agreements} agreements: built, signed and verified in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(report(measure_all(cases, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
