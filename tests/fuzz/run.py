"""Run one fuzz target under atheris (coverage-guided, libFuzzer).

Usage::

    python -m tests.fuzz.run TARGET [--runs N] [--seconds S] [--max-len B] [--structured]
                                    [--artifacts DIR] [CORPUS_DIR ...] [-- LIBFUZZER_FLAG ...]
    python -m tests.fuzz.run --list

The first corpus directory receives the new interesting inputs libFuzzer finds; crash inputs go
to ``--artifacts`` (default ``/tmp/coalition-fuzz-artifacts/``, never the repository). Needs
the ``fuzz`` extra (``pip install -e '.[fuzz]'``); see ``tests/fuzz/README.md``.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

#: Packages whose code atheris instruments for coverage (``tomllib`` too: document targets
#: then learn TOML syntax from its branches).
INSTRUMENTED = ("broker", "policies", "clients", "tomllib", "tests.fuzz")
DEFAULT_ARTIFACTS = Path("/tmp/coalition-fuzz-artifacts")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; arguments after ``--`` are passed to libFuzzer as they are."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help="a target of tests/fuzz/targets.py")
    parser.add_argument("corpus", nargs="*", type=Path, help="corpus directories")
    parser.add_argument("--runs", type=int, help="stop after this many inputs")
    parser.add_argument("--seconds", type=int, help="stop after this many seconds")
    parser.add_argument("--max-len", type=int, help="longest input libFuzzer generates")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS,
                        help=f"where crash inputs are written (default {DEFAULT_ARTIFACTS})")
    parser.add_argument("--structured", action="store_true",
                        help="half of the mutations structure-aware (tests/fuzz/mutators.py)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)
    if not args.list and args.target is None:
        parser.error("a TARGET is required (or --list)")
    args.extra = extra
    return args


def libfuzzer_argv(args: argparse.Namespace) -> list[str]:
    """The argument vector handed to ``atheris.Setup`` (libFuzzer's own flags)."""
    out = [f"tests.fuzz.run:{args.target}", *(str(c) for c in args.corpus),
           f"-artifact_prefix={args.artifacts}/{args.target}-", "-print_final_stats=1"]
    if args.runs is not None:
        out.append(f"-runs={args.runs}")
    if args.seconds is not None:
        out.append(f"-max_total_time={args.seconds}")
    if args.max_len is not None:
        out.append(f"-max_len={args.max_len}")
    return [*out, *args.extra]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, instrument the parsers, and fuzz one target (does not return
    when libFuzzer runs: it exits the process)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import atheris  # type: ignore[import-untyped]  # the ``fuzz`` extra, needed only here

    # Instrument before anything imports broker/policies/clients: modules imported earlier
    # would run without coverage feedback.
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        from tests.fuzz import context, targets
    if args.list:
        print("\n".join(targets.TARGETS))
        return 0
    if args.target not in targets.TARGETS:
        print(f"unknown target {args.target!r}; one of: {', '.join(targets.TARGETS)}",
              file=sys.stderr)
        return 2
    context.context()  # read the demo coalition before fuzzing, not on the first input
    for folder in (args.artifacts, *args.corpus):
        if not folder.exists():  # a file argument is one input to run (e.g. a crash)
            folder.mkdir(parents=True)
    target: Callable[[bytes], bool] = targets.TARGETS[args.target]

    def test_one_input(data: bytes) -> None:
        target(data)

    if not args.structured:
        atheris.Setup(libfuzzer_argv(args), test_one_input)
    else:
        from tests.fuzz import mutators  # not instrumented: its branches are not the parsers'

        def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
            rnd = random.Random(seed)
            if rnd.random() < 0.5:
                out = mutators.mutate(args.target, data, rnd)
                if out is not None and len(out) <= max_size:
                    return out
            mutated: bytes = atheris.Mutate(data, max_size)
            return mutated

        atheris.Setup(libfuzzer_argv(args), test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
