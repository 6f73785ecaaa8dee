"""Run a load plan against a broker process and sum up what the workers saw.

:func:`run_load` starts the subscriber processes (each connects, subscribes and says ready),
then the publisher processes (each builds its envelopes, connects and says ready), reads the
broker's CPU time and memory, says ``go`` to every publisher at once, and waits for every
receipt and every expected delivery. Throughput is counted from the first ``pub`` sent to the
last delivery received (or the last receipt, without subscribers): messages are receipts,
copies are unique deliveries.

Workers are started with the ``forkserver`` method (:func:`broker.bench.workers.mp_context`),
so they start fast and never inherit the threads of the process that runs the benchmark.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing.connection
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

from broker.bench.harness import machine_ticks, process_cpu_seconds, steal_share
from broker.bench.scrape import Snapshot, between
from broker.bench.workers import (
    PublisherResult,
    SubscriberResult,
    mp_context,
    publisher_main,
    subscriber_main,
)


class LoadError(RuntimeError):
    """A worker failed, or did not answer in time."""


class WorkerTimeout(LoadError):
    """A worker did not answer in time."""


class Measured(Protocol):
    """The server under load: its memory and CPU time are read before and after."""

    def rss_bytes(self) -> int: ...

    def cpu_seconds(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Publisher and subscriber processes to run (by default the node-protocol workers of
    :mod:`broker.bench.workers`; the peer comparison runs MQTT ones)."""

    publishers: Sequence[Any] = ()
    subscribers: Sequence[Any] = ()
    #: Seconds to wait for the publishers' receipts, then for the expected deliveries.
    timeout: float = 600.0
    publisher_main: Callable[[Any, Connection], None] = publisher_main
    subscriber_main: Callable[[Any, Connection], None] = subscriber_main


@dataclasses.dataclass
class LoadResult:
    """What one run of a plan measured."""

    messages: int
    copies: int
    elapsed_s: float
    statuses: dict[str, int]
    errors: dict[str, int]
    duplicates: int
    expected_copies: int
    envelope_bytes: int
    build_s: float
    broker_cpu_s: float
    rss_before: int
    rss_after: int
    publishers: list[PublisherResult]
    subscribers: list[SubscriberResult]
    #: The share of the machine's CPU time the hypervisor took from ``go`` to the last report
    #: (:func:`broker.bench.harness.steal_share`).
    steal_share: float = 0.0
    #: The broker's own account of the run (:func:`broker.bench.scrape.between`): its commits
    #: and its event loop's lag; ``None`` for a server without ``/metrics``.
    broker_metrics: dict[str, Any] | None = None
    #: CPU seconds of the worker processes (publishers and subscribers together) over the
    #: same span as ``broker_cpu_s``: what the load generators cost the machine.
    load_cpu_s: float = 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def copies_per_s(self) -> float:
        return self.copies / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def broker_cpu_share(self) -> float:
        """Broker CPU seconds per wall second (1.0 = one core busy)."""
        return self.broker_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def cpu_us_per(self, count: int) -> float:
        return self.broker_cpu_s / count * 1e6 if count else 0.0

    @property
    def load_cpu_us_per_message(self) -> float:
        """The load generators' CPU per message (µs)."""
        return self.load_cpu_s / self.messages * 1e6 if self.messages else 0.0

    def latencies_ns(self) -> list[int]:
        """publish→deliver of every delivered copy whose send time was recorded."""
        sent = {message_id: ns for p in self.publishers for message_id, ns in p.sends}
        return sorted(ns - sent[message_id] for s in self.subscribers
                      for message_id, ns in s.arrivals if message_id in sent)

    def summary(self) -> dict[str, Any]:
        """The JSON fields every scenario reports for a load run."""
        return {
            "messages": self.messages, "copies": self.copies,
            "expected_copies": self.expected_copies, "elapsed_s": round(self.elapsed_s, 3),
            "messages_per_s": round(self.messages_per_s, 1),
            "copies_per_s": round(self.copies_per_s, 1),
            "broker_cpu_s": round(self.broker_cpu_s, 3),
            "broker_cpu_share": round(self.broker_cpu_share, 3),
            "broker_cpu_us_per_message": round(self.cpu_us_per(self.messages), 1),
            "load_cpu_us_per_message": round(self.load_cpu_us_per_message, 1),
            "broker_rss_before": self.rss_before, "broker_rss_after": self.rss_after,
            "envelope_bytes": self.envelope_bytes, "build_s": round(self.build_s, 2),
            "statuses": self.statuses, "errors": self.errors, "duplicates": self.duplicates,
            **({} if self.broker_metrics is None else {"broker": self.broker_metrics}),
        }


def percentiles(values: Sequence[int], points: Sequence[float]) -> dict[str, float]:
    """Nearest-rank percentiles of sorted ``values`` (ns), in ms: ``{"p50": …}``."""
    out = {}
    for point in points:
        name = f"p{point:g}"
        if not values:
            out[name] = 0.0
            continue
        rank = min(len(values) - 1, max(0, int(-(-point * len(values) // 100)) - 1))
        out[name] = round(values[rank] / 1e6, 3)
    return out


class _Workers:
    """The parent's side of the worker processes."""

    def __init__(self) -> None:
        self.context = mp_context()
        self.conns: list[Connection] = []
        self.processes: list[Any] = []
        self._got: dict[str, dict[Connection, Any]] = {}

    def start(self, target: Any, spec: Any) -> Connection:
        parent: Connection
        parent, child = self.context.Pipe()
        process = self.context.Process(target=target, args=(spec, child), daemon=True)
        process.start()
        child.close()
        self.conns.append(parent)
        self.processes.append(process)
        return parent

    def expect(self, conns: Sequence[Connection], kind: str, timeout: float) -> list[Any]:
        """Wait for ``(kind, payload)`` from each of ``conns``; return the payloads."""
        got = self._got.setdefault(kind, {})  # kept: a second call after a timeout
        waiting = {conn for conn in conns if conn not in got}
        deadline = time.monotonic() + timeout
        while waiting:
            ready = multiprocessing.connection.wait(list(waiting),
                                                    max(0.0, deadline - time.monotonic()))
            if not ready:
                raise WorkerTimeout(f"{len(waiting)} worker(s) did not say {kind!r} within "
                                f"{timeout:g} s")
            for conn in ready:
                assert isinstance(conn, Connection)
                try:
                    said, payload = conn.recv()
                except EOFError:
                    raise LoadError("a worker exited unexpectedly") from None
                if said == "failed":
                    raise LoadError(f"a worker failed:\n{payload}")
                if said == kind:
                    got[conn] = payload
                    waiting.discard(conn)
        return [got[conn] for conn in conns]

    def tell(self, conns: Sequence[Connection], command: str) -> None:
        for conn in conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(command)

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds so far of each worker process still running, by pid."""
        out: dict[int, float] = {}
        for process in self.processes:
            with contextlib.suppress(OSError, ValueError):
                out[process.pid] = process_cpu_seconds(process.pid)
        return out

    def close(self) -> None:
        self.tell(self.conns, "exit")
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
        for conn in self.conns:
            conn.close()


def run_load(plan: LoadPlan, broker: Measured) -> LoadResult:
    """Run ``plan`` against ``broker``; see the module docstring."""
    workers = _Workers()
    try:
        return _run(plan, broker, workers)
    finally:
        workers.close()


def _run(plan: LoadPlan, broker: Measured, workers: _Workers) -> LoadResult:
    rss_before, cpu_before = broker.rss_bytes(), broker.cpu_seconds()
    subs = [workers.start(plan.subscriber_main, spec) for spec in plan.subscribers]
    workers.expect(subs, "ready", 120)
    pubs = [workers.start(plan.publisher_main, spec) for spec in plan.publishers]
    build_s = max(workers.expect(pubs, "ready", plan.timeout), default=0.0)
    ticks = machine_ticks()
    scrape: Callable[[], Snapshot | None] = getattr(broker, "metrics_snapshot", lambda: None)
    metrics_before = scrape()
    load_before = workers.cpu_seconds()
    if pubs:
        rss_before, cpu_before = broker.rss_bytes(), broker.cpu_seconds()
        ticks, load_before = machine_ticks(), workers.cpu_seconds()
        workers.tell(pubs, "go")
    published: list[PublisherResult] = [
        r for rs in workers.expect(pubs, "done", plan.timeout) for r in rs]
    short = any(p.errors or p.receipts < p.sent for p in published)
    try:  # when publishes failed, the expected deliveries will not all come: do not wait long
        received: list[SubscriberResult] = [
            r for rs in workers.expect(subs, "done", 10 if short else plan.timeout) for r in rs]
    except WorkerTimeout:
        workers.tell(subs, "report")  # report what arrived: the summary shows what is missing
        received = [r for rs in workers.expect(subs, "done", 30) for r in rs]
    stolen = steal_share(ticks, machine_ticks())
    cpu_after, rss_after = broker.cpu_seconds(), broker.rss_bytes()
    load_after = workers.cpu_seconds()
    metrics_after = scrape()
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for p in published:
        statuses.update(p.statuses)
        errors.update(p.errors)
    starts = [p.first_send_ns for p in published] or [s.first_ns for s in received if s.first_ns]
    ends = [s.last_ns for s in received if s.last_ns] + [p.last_receipt_ns for p in published]
    elapsed = (max(ends) - min(starts)) / 1e9 if starts and ends else 0.0
    return LoadResult(
        messages=sum(p.receipts for p in published), copies=sum(s.received for s in received),
        elapsed_s=elapsed, statuses=dict(statuses), errors=dict(errors),
        duplicates=sum(s.duplicates for s in received),
        expected_copies=sum(s.expected for s in received),
        envelope_bytes=max((p.envelope_bytes for p in published), default=0), build_s=build_s,
        broker_cpu_s=cpu_after - cpu_before, rss_before=rss_before, rss_after=rss_after,
        publishers=published, subscribers=received, steal_share=stolen,
        load_cpu_s=sum(load_after[pid] - load_before[pid] for pid in load_after
                       if pid in load_before),
        broker_metrics=(between(metrics_before, metrics_after)
                        if metrics_before is not None and metrics_after is not None else None))
