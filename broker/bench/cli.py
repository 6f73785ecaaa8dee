"""The ``coalition bench`` subcommand (imports nothing heavy until it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

#: Every scenario, in the order they run (limits first: the others are compared with them).
SCENARIO_NAMES = ("limits", "throughput", "latency", "fanout", "policy", "auditor", "backlog",
                  "gateway", "peer")


def register(commands: Any) -> None:
    """Add ``bench`` to the ``coalition`` subcommands (``commands``: the subparsers action)."""
    bench = commands.add_parser(
        "bench", help="measure a real broker: throughput, latency, fan-out, policy scale, "
        "auditor, backlog, against the limits (and a peer) measured in the same run",
        description="Start real broker processes on 127.0.0.1 with throwaway coalitions and "
        "durable stores in a temporary directory, drive them from separate processes, print a "
        "table per scenario and the ratios to the limits (Ed25519 verify, unpack + verify + "
        "hash, aiohttp WebSocket echo) measured in the same run. See docs/performance.md.")
    bench.add_argument("--scenario", action="append", choices=SCENARIO_NAMES, default=None,
                       metavar="NAME", help="run this scenario (repeatable; default: all): "
                       + ", ".join(SCENARIO_NAMES) + "; the limits always run")
    bench.add_argument("--quick", action="store_true",
                       help="tiny counts, seconds in all (the smoke test); numbers meaningless")
    bench.add_argument("--out", type=Path, metavar="FILE.json", help="write the results here")
    bench.add_argument("--messages", type=int, help="throughput messages (default 30000)")
    bench.add_argument("--latency-messages", type=int, help="messages per latency point "
                       "(default 3000, fewer at low rates: at most 15 s per point)")
    bench.add_argument("--latency-fractions", type=_fractions, metavar="F,F…",
                       help="latency rates as fractions of the maximum (default 0.1,0.25,0.5)")
    bench.add_argument("--fanout-messages", type=int, help="messages per fan-out width "
                       "(default 6000)")
    bench.add_argument("--policy-messages", type=int, help="messages per coalition size "
                       "and round (default 6000)")
    bench.add_argument("--policy-rounds", dest="policy_broker_rounds", type=_positive,
                       help="rounds of the policy-scale scenario, the sizes taking turns; "
                       "each size's least disturbed round counts (default 3)")
    bench.add_argument("--audit-entries", type=int, help="auditor entries (default 50000)")
    bench.add_argument("--backlog", type=int, help="messages queued for the offline node "
                       "(default 100000)")
    bench.add_argument("--gateway-messages", type=int, help="messages a gateway consumes "
                       "per mode (default 3000)")
    bench.add_argument("--size", type=int, help="envelope bytes (default 1024)")
    bench.add_argument("--window", type=int, help="receipts a publisher may await (default 256)")
    bench.add_argument("--commit-delay-ms", type=int, metavar="MS",
                       help="the broker's audit.max_delay_ms (default: the configured default)")
    bench.add_argument("--verify-workers", type=int, metavar="N",
                       help="the broker's broker.verify_workers (default: the configured "
                       "default, 0: signatures checked on the event loop)")
    bench.add_argument("--writer", choices=("loop", "process"),
                       help="the broker's audit.writer (default: the configured default)")
    bench.add_argument("--log-level", help="broker log level (default info, as deployed)")
    bench.add_argument("--profile", type=Path, metavar="DIR",
                       help="profile every broker process into DIR (py-spy when installed, "
                       "else cProfile)")
    bench.add_argument("--workdir", type=Path, metavar="DIR",
                       help="keep coalitions, broker data and logs here")
    bench.set_defaults(run=_bench)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return value


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from exc
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError("fractions must be in (0, 1]")
    return values


_OVERRIDES = ("messages", "latency_messages", "latency_fractions", "fanout_messages",
              "policy_messages", "policy_broker_rounds", "audit_entries", "backlog",
              "gateway_messages", "size",
              "window", "log_level", "profile", "commit_delay_ms", "verify_workers", "writer")


def _bench(args: argparse.Namespace) -> int:
    from broker.bench.context import Options
    from broker.bench.runner import SCENARIOS, run_bench
    from broker.errors import ConfigError
    from broker.logs import configure

    if args.out is not None and not args.out.parent.is_dir():
        raise ConfigError(f"--out {args.out}: no such directory {args.out.parent}")
    configure(level="warning", json=False)  # the benchmark's own process: tables on stdout
    overrides = {name: getattr(args, name) for name in _OVERRIDES
                 if getattr(args, name) is not None}
    options = (Options.quick_options(**overrides) if args.quick else Options(**overrides))
    document = run_bench(options, args.scenario or SCENARIOS, out=args.out,
                         workdir=args.workdir)
    failed = [name for name, result in document["scenarios"].items()
              if result.get("status") == "failed"]
    return 1 if failed else 0
