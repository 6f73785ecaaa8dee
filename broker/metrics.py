"""Prometheus metrics of one broker (served by the admin API at ``/metrics``).

Each broker has its own :class:`prometheus_client.CollectorRegistry` (not the process-global
one), so several brokers in one process — tests, the demo — never mix their numbers. Counters are
bumped by the hub as things happen; queue depths and ages, connections and the audit size are
read from the live state at scrape time by :class:`_StateCollector`, so they can never drift.
Labels carry reason codes, precedences and outcomes only: never node payloads, never ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.tls import REFUSAL_KINDS
from policies.decide import Decision

PRECEDENCE_NAMES = {3: "FLASH", 2: "IMMEDIATE", 1: "PRIORITY", 0: "ROUTINE"}


class QueueView(Protocol):
    """What the collector reads of a recipient queue (:class:`broker.delivery.RecipientQueue`)."""

    def depth_by_precedence(self) -> dict[int, int]: ...

    def oldest_by_precedence(self) -> dict[int, int]: ...


class LiveState(Protocol):
    """What the collector reads of the running broker."""

    @property
    def queues(self) -> Mapping[str, QueueView]: ...

    @property
    def peers(self) -> Mapping[str, object]: ...

    def audit_size(self) -> int: ...


class Metrics:
    """The broker's counters and histograms, and the registry they live in."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.publishes = Counter("coalition_publishes", "Publish requests by outcome "
                                 "(receipted, or the error code that refused them).",
                                 ["outcome"], registry=r)
        self.decisions = Counter("coalition_decisions", "Release decisions per candidate "
                                 "recipient: result permit/deny and, for a deny, each reason.",
                                 ["result", "reason"], registry=r)
        self.deliveries = Counter("coalition_deliveries", "Copies acknowledged by their "
                                  "recipient (a deliver entry each).", registry=r)
        self.expiries = Counter("coalition_expiries", "Copies dropped past their TTL (an "
                                "expire entry each).", registry=r)
        self.commit_seconds = Histogram(
            "coalition_audit_commit_seconds", "Time to make one audit batch durable.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r)
        self.loop_lag = Histogram(
            "coalition_event_loop_lag_seconds", "How late a timer on the broker's event loop "
            "fired (sampled every 0.1 s): how long the loop was busy without a break, a wait "
            "added to every publish and delivery.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.commit_entries = Counter("coalition_audit_committed_entries", "Audit entries made "
                                      "durable.", registry=r)
        self._receipted = self.publishes.labels("receipted")
        self._permits = self.decisions.labels("permit", "")
        self._denials: dict[str, Counter] = {}
        self.admin_actions = Counter("coalition_admin_actions", "Admin API mutations by action "
                                     "and outcome.", ["action", "outcome"], registry=r)
        self.tls_refusals = Counter("coalition_tls_handshakes_refused", "TLS handshakes on the "
                                    "node listener that failed, by kind (no_certificate, "
                                    "bad_certificate, not_tls, timeout, client_aborted, other).",
                                    ["kind"], registry=r)
        for kind in REFUSAL_KINDS:  # every kind exported from the start, at 0
            self.tls_refusals.labels(kind)

    def watch(self, state: LiveState, clock_ms: Callable[[], int]) -> None:
        """Read queue depths and ages, connections and the audit size from ``state``."""
        self.registry.register(_StateCollector(state, clock_ms))

    # --- events ---------------------------------------------------------------------------

    def published(self, decisions: Mapping[str, Decision]) -> None:
        # Children looked up once: ``labels()`` takes a lock and builds a key per call, and
        # this runs for every publish.
        self._receipted.inc()
        permits = sum(1 for decision in decisions.values() if decision.permit)
        if permits:
            self._permits.inc(permits)
        for decision in decisions.values():
            for reason in decision.reasons:
                child = self._denials.get(reason)
                if child is None:  # reason codes are a fixed, small set
                    child = self._denials[reason] = self.decisions.labels("deny", reason)
                child.inc()

    def refused(self, code: str) -> None:
        self.publishes.labels(code).inc()

    def tls_refused(self, kind: str) -> None:
        """Count one failed TLS handshake; a kind outside the fixed set counts as ``other``."""
        self.tls_refusals.labels(kind if kind in REFUSAL_KINDS else "other").inc()

    def committed(self, seconds: float, entries: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_entries.inc(entries)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, state: LiveState, clock_ms: Callable[[], int]) -> None:
        self.state = state
        self.clock_ms = clock_ms

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("coalition_queue_depth", "Copies owed (queued or in flight), "
                                  "all recipients, by precedence.", labels=["precedence"])
        age = GaugeMetricFamily("coalition_queue_oldest_age_seconds", "Age of the oldest copy "
                                "owed, by precedence.", labels=["precedence"])
        totals = dict.fromkeys(PRECEDENCE_NAMES, 0)
        oldest: dict[int, int] = {}
        for queue in list(self.state.queues.values()):
            for prec, count in queue.depth_by_precedence().items():
                totals[prec] = totals.get(prec, 0) + count
            for prec, queued_ms in queue.oldest_by_precedence().items():
                oldest[prec] = min(oldest.get(prec, queued_ms), queued_ms)
        now = self.clock_ms()
        for prec, name in PRECEDENCE_NAMES.items():
            depth.add_metric([name], totals.get(prec, 0))
            age.add_metric([name], max(0, now - oldest[prec]) / 1000 if prec in oldest else 0)
        yield depth
        yield age
        yield GaugeMetricFamily("coalition_connections", "Authenticated node connections.",
                                value=len(self.state.peers))
        yield GaugeMetricFamily("coalition_audit_entries", "Entries in the audit log.",
                                value=self.state.audit_size())
