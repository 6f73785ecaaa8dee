"""What every scenario gets: the options, a work directory, the benchmark coalition, a way to
start a fresh broker, and the results of the scenarios that ran before it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from broker.admin.auth import new_token
from broker.bench.harness import BrokerProcess, bench_coalition, free_port, write_config
from broker.coalition import Coalition


@dataclasses.dataclass(frozen=True)
class Options:
    """The knobs of a run (``coalition bench --help``); :meth:`quick` shrinks every count."""

    #: Messages of the throughput scenario (over all publishers).
    messages: int = 30_000
    #: Messages per point of the latency scenario.
    latency_messages: int = 3_000
    #: Latency rates as fractions of the measured maximum message rate.
    latency_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    #: Messages per fan-out point, and the fan-out widths.
    fanout_messages: int = 6_000
    fanout: tuple[int, ...] = (1, 4, 16)
    #: Messages per coalition size in the policy-scale scenario, per round: the sizes take
    #: turns, each on a fresh broker, and each size's least disturbed round counts.
    policy_messages: int = 6_000
    policy_sizes: tuple[tuple[int, int], ...] = ((3, 2), (100, 300))
    policy_broker_rounds: int = 3
    #: Operations per round of the in-process policy benchmark (broker.bench_policy), and its
    #: rounds (not the broker rounds above).
    policy_ops: int = 2_000
    policy_rounds: int = 5
    #: Audit entries written, exported and verified by the auditor scenario.
    audit_entries: int = 50_000
    #: Messages queued for the offline node.
    backlog: int = 100_000
    #: Messages a gateway consumes in each mode of the gateway scenario.
    gateway_messages: int = 3_000
    #: Seconds each single-process limit is measured for.
    limit_seconds: float = 2.0
    #: Target envelope size in bytes (the payload is sized to reach it).
    size: int = 1024
    #: ``pub`` frames a publisher may have outstanding (receipt not yet received).
    window: int = 256
    #: The audit log's group-commit delay in ms (``audit.max_delay_ms``; None: the default).
    commit_delay_ms: int | None = None
    #: The broker's signature workers (``broker.verify_workers``; None: the default).
    verify_workers: int | None = None
    #: Who commits the audit log (``audit.writer``: "loop" or "process"; None: the default).
    writer: str | None = None
    #: Log level of the broker processes (``info`` is what operators run).
    log_level: str = "info"
    #: Directory for cProfile statistics of each broker process (``None``: no profiling).
    profile: Path | None = None
    quick: bool = False

    @classmethod
    def quick_options(cls, **overrides: Any) -> Options:
        """Tiny counts, enough to exercise every code path in seconds (the smoke test)."""
        values: dict[str, Any] = dict(
            messages=60, latency_messages=40, latency_fractions=(0.25,), fanout_messages=20,
            policy_messages=20, policy_ops=20, policy_rounds=1, policy_broker_rounds=1,
            audit_entries=200, backlog=200, gateway_messages=30,
            limit_seconds=0.05, quick=True)
        values.update(overrides)
        return cls(**values)


class Run:
    """One ``coalition bench`` run: shared state of the scenarios."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.results: dict[str, dict[str, Any]] = {}
        self._coalition: Coalition | None = None
        self._brokers = 0

    @property
    def coalition(self) -> Coalition:
        """The benchmark coalition (written on first use)."""
        if self._coalition is None:
            self._coalition = bench_coalition(self.workdir / "coalition")
        return self._coalition

    def broker(self, name: str, coalition: Coalition | None = None) -> BrokerProcess:
        """A new (not yet started) broker process with a fresh data directory."""
        self._brokers += 1
        where = self.workdir / f"broker-{self._brokers:02d}-{name}"
        where.mkdir(parents=True)
        port = free_port()
        admin_port = free_port()
        while admin_port == port:
            admin_port = free_port()
        admin = (admin_port, new_token())  # /metrics around each load run
        config = write_config(where / "broker.toml", coalition or self.coalition, where / "data",
                              port, commit_delay_ms=self.options.commit_delay_ms,
                              verify_workers=self.options.verify_workers,
                              writer=self.options.writer, admin=admin)
        profile = (self.options.profile / f"broker-{self._brokers:02d}-{name}"
                   if self.options.profile is not None else None)
        return BrokerProcess(config, data_dir=where / "data", port=port,
                             log=where / "broker.log", log_level=self.options.log_level,
                             profile=profile, admin=admin)

    def max_message_rate(self) -> float | None:
        """The throughput scenario's messages/s, if it ran in this run."""
        rate = self.results.get("throughput", {}).get("messages_per_s")
        return float(rate) if rate else None
