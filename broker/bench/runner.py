"""Run the selected scenarios in order, print each table, write the JSON document."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from broker.bench import goals, report
from broker.bench.cli import SCENARIO_NAMES
from broker.bench.context import Options, Run
from broker.bench.harness import load_average
from broker.errors import ConfigError

#: Every scenario, in the order they run (limits first: the others are compared with them).
SCENARIOS = SCENARIO_NAMES


def check_workdir(workdir: Path) -> None:
    """Raise ``ConfigError`` unless ``workdir`` is absent or an empty directory."""
    if not workdir.exists():
        return
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is not a directory")
    if any(workdir.iterdir()):
        raise ConfigError(f"--workdir {workdir} is not empty: a run writes new coalition keys "
                          "and broker data there; give a new directory or empty this one")


def run_bench(options: Options, scenarios: Sequence[str], *, out: Path | None = None,
              workdir: Path | None = None, stream: TextIO = sys.stdout) -> dict[str, Any]:
    """Run ``scenarios`` (the limits always run too) and return the JSON document.

    A scenario that raises is recorded as ``failed`` with its reason and the run goes on.
    ``workdir`` keeps the coalitions, broker data and logs (a temporary directory otherwise);
    it must be new or empty (``ConfigError`` otherwise, before anything runs): a run writes
    fresh keys and data directories and never mixes them with an earlier run's.
    """
    if workdir is not None:
        check_workdir(workdir)
    chosen = [name for name in SCENARIOS if name in scenarios or name == "limits"]
    document: dict[str, Any] = {"meta": report.meta(dataclasses.asdict(options), chosen)}
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="coalition-bench-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        if options.profile is not None:
            options.profile.mkdir(parents=True, exist_ok=True)
        run = Run(options, base)
        run.results = results
        for name in chosen:
            print(f"# {name}: running (load average {load_average()[0]})", file=sys.stderr,
                  flush=True)
            started = time.perf_counter()
            module: Any = importlib.import_module(f"broker.bench.{name}")
            try:
                result = module.run(run)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                          "count": 0}
            result["seconds"] = round(time.perf_counter() - started, 1)
            results[name] = result
            report.add_ratios(results)
            report.print_scenario(name, result, stream)
            stream.flush()
    document["goals"] = goals.check(results)
    goals.print_goals(document["goals"], stream)
    document["meta"]["finished"] = report.meta({}, [])["started"]
    document["meta"]["load_average_end"] = load_average()
    document["scenarios"] = results
    if out is not None:
        report.write_json(out, document)
        print(f"\nwrote {out}", file=stream)
    return document
