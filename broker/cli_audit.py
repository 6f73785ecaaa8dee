"""``coalition audit export | verify | prove``: the auditor's command line.

``verify`` exits 0 when everything verifies, 1 when it found problems (the report names the
first bad index), 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.audit import merkle
from broker.audit.leaves import RouteEntry, entry_from_bytes
from broker.audit.note import parse_note
from broker.config import load_config
from broker.errors import ConfigError, VerificationError
from broker.logs import configure

if TYPE_CHECKING:
    from clients.auditor import Report


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the audit subcommands to ``coalition audit``."""
    export = commands.add_parser("export", help="export the audit log for offline verification")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the broker's configuration file")
    source.add_argument("--data-dir", type=Path, help="the broker's data directory")
    export.add_argument("--origin", help="the log origin (broker name) when using --data-dir")
    export.add_argument("--out", type=Path, required=True)
    export.set_defaults(run=_export)

    verify = commands.add_parser("verify", help="verify an export; replay every decision")
    verify.add_argument("export", type=Path)
    verify.add_argument("--pin", action="append", required=True, metavar="SHA256",
                        help="SHA-256 of a trust root you accept (repeatable)")
    verify.add_argument("--checkpoint", action="append", type=Path, default=[],
                        help="a checkpoint note you saved earlier (repeatable)")
    verify.add_argument("--quorum", type=int, help="nations that must cosign (default: the "
                        "trust root's witness quorum)")
    verify.add_argument("--expiry-grace", type=float, default=300, metavar="SECONDS",
                        help="how long past its TTL a copy may still be outstanding at the end "
                        "of the log before it counts as dropped (default 300; more than the "
                        "broker's expiry_interval_ms)")
    verify.add_argument("--workers", type=_workers, metavar="N",
                        help="processes that parse entries and replay decisions beside this "
                        "one (default: one per CPU, up to 4, for a log of 20,000 entries or "
                        "more; 0: none)")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.set_defaults(run=_verify)

    prove = commands.add_parser("prove", help="inclusion proof of a message's route entry")
    prove.add_argument("export", type=Path)
    prove.add_argument("--id", required=True, help="the message id (hex)")
    prove.add_argument("--pin", action="append", required=True, metavar="SHA256")
    prove.set_defaults(run=_prove)


def _pins(values: list[str]) -> list[bytes]:
    try:
        pins = [bytes.fromhex(v) for v in values]
    except ValueError as exc:
        raise ConfigError("--pin takes the hex SHA-256 of trust-root.toml") from exc
    if any(len(p) != 32 for p in pins):
        raise ConfigError("--pin takes the hex SHA-256 of trust-root.toml (64 hex digits)")
    return pins


def _export(args: argparse.Namespace) -> int:
    from broker.store.sqlite import SqliteStore  # here, as below: a faster CLI start
    from clients.export import export_store

    if args.config is not None:
        config = load_config(args.config)
        data_dir, origin = config.broker.data_dir, config.broker.name
    else:
        data_dir, origin = args.data_dir, args.origin
    path = data_dir / "broker.sqlite"
    if not path.exists():
        raise ConfigError(f"no broker store at {path}")
    store = SqliteStore.open_read_only(path)  # the broker may be running: never write its store
    try:
        if origin is None:
            latest = store.latest_checkpoint()
            if latest is None:
                raise ConfigError("no checkpoint yet: pass --origin")
            origin = parse_note(latest.note).text.split("\n", 1)[0]
        summary = export_store(store, origin, args.out)
    finally:
        store.close()
    print(f"exported {summary.entries} entries, {summary.checkpoints} checkpoints, "
          f"{summary.bundles} policy bundles to {summary.out}")
    return 0


def _progress(done: int, total: int) -> None:
    if total:
        width = 40
        filled = min(width, width * done // total)
        print(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="",
              file=sys.stderr, flush=True)


def _workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if not 0 <= count <= 64:
        raise argparse.ArgumentTypeError("--workers is a count from 0 to 64")
    return count


def _verify(args: argparse.Namespace) -> int:
    from clients.auditor import verify_export

    configure(level="warning", json=args.json)  # to stderr: stdout is the report
    progress = _progress if sys.stderr.isatty() and not args.json else None
    report = verify_export(args.export, pins=_pins(args.pin), saved=args.checkpoint,
                           quorum=args.quorum, progress=progress,
                           expiry_grace_ms=int(args.expiry_grace * 1000),
                           workers=args.workers)
    if progress is not None:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_map(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1


def print_report(report: Report, out: Any = None) -> None:
    """The human report."""
    out = out or sys.stdout
    print(f"audit log of {report.origin}", file=out)
    print(f"  entries            {report.entries}", file=out)
    print(f"  checkpoints        {report.checkpoints} (latest covers "
          f"{report.latest_checkpoint} entries)", file=out)
    print(f"  cosignatures       {report.cosignatures} (nations; the latest witnessed "
          f"checkpoint covers {report.witnessed_size} entries, cosigned by "
          f"{', '.join(report.witnessed_by) or 'nobody'}; {report.unwitnessed_entries} "
          f"newer entries not witnessed yet)", file=out)
    print(f"  policy bundles     {report.bundles}", file=out)
    print(f"  decisions replayed {report.decisions_replayed}", file=out)
    print(f"  deliveries checked {report.deliveries_checked}", file=out)
    print(f"  expiries checked   {report.expiries_checked}", file=out)
    print(f"  problems           {len(report.problems)}", file=out)
    for problem in report.problems[:50]:
        where = f"entry {problem.index}: " if problem.index is not None else ""
        print(f"    - {problem.what}: {where}{problem.detail}", file=out)
    if report.first_bad_index is not None:
        print(f"  FIRST BAD INDEX    {report.first_bad_index}", file=out)
    print("  verdict            " + ("OK" if report.ok else "FAILED"), file=out)


def _prove(args: argparse.Namespace) -> int:
    from clients.auditor import Report, load_bundles, log_verifiers, verified_checkpoint
    from clients.export import Export

    try:
        wanted = bytes.fromhex(args.id)
    except ValueError as exc:
        raise ConfigError("--id is the message id in hex") from exc
    export = Export.open(args.export)
    report = Report(origin=export.origin)
    bundles = load_bundles(export, _pins(args.pin), report)
    tree = merkle.MemoryTree()
    found: tuple[int, RouteEntry, bytes] | None = None
    for index, data in export.entries():
        tree.append(merkle.leaf_hash(data))
        if found is None:
            entry = entry_from_bytes(data)
            if isinstance(entry, RouteEntry) and entry.id == wanted:
                found = (index, entry, data)
    if found is None:
        raise VerificationError(f"no route entry for message {args.id}", code="bad_proof")
    index, entry, data = found
    notes = export.checkpoint_notes()
    if not notes:
        raise VerificationError("the export has no checkpoint", code="bad_proof")
    checkpoint = verified_checkpoint(notes[-1][1], log_verifiers(bundles, export.origin))
    if checkpoint.size <= index:
        raise VerificationError(f"entry {index} is not covered by the latest checkpoint "
                                f"(size {checkpoint.size}) yet", code="bad_proof")
    proof = tree.inclusion_proof(index, checkpoint.size)
    merkle.verify_inclusion(index, checkpoint.size, merkle.leaf_hash(data), proof,
                            checkpoint.root)
    print(f"message {args.id} is entry {index} of the checkpoint of size {checkpoint.size}")
    print(f"  from {entry.sender} topic {entry.topic}: " + ", ".join(
        f"{n} {d.status()}" for n, d in sorted(entry.decisions.items())))
    print(f"  leaf  {merkle.leaf_hash(data).hex()}")
    for step in proof:
        print(f"  proof {step.hex()}")
    print(f"  root  {checkpoint.root.hex()} (signed by {export.origin}): inclusion verified")
    return 0

