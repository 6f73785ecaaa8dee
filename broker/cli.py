"""The ``coalition`` command: keys and certificates, the broker, the demo.

Errors of the project's own error tree are printed as ``error: CODE: reason`` with exit status 2;
nothing here prints key material except the public keys it is asked to show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from broker import cli_admin, cli_audit, cli_policy, cli_tls, crypto
from broker.bench.cli import register as register_bench
from broker.config import load_config
from broker.errors import BrokerError, ConfigError
from broker.logs import configure
from clients.identity import KeyFile
from policies import authoring
from policies.documents import SignedDocument, parse_node_cert
from policies.loader import load_bundle
from policies.model import Revocation
from policies.revocations import parse_revocations

DAY_MS = 24 * 3600 * 1000


#: Exit status when the reader of stdout went away (128 + SIGPIPE, as a shell reports a
#: command that the signal killed).
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script.

    Output piped to a reader that stops early (``coalition ... | head``) ends the command
    quietly with :data:`EXIT_BROKEN_PIPE`, as the Python documentation advises (note on
    SIGPIPE in :mod:`signal`): output still buffered goes to ``/dev/null``, no traceback."""
    try:
        try:
            status = _main(argv)
        except SystemExit:  # argparse: --help, or a usage error
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, not at exit, where a reader gone could not be handled
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket (say, a connection): not ours to hide
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has closed it."""
    if not hasattr(select, "poll"):  # Windows: trust the error, as the docs do
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor (replaced stdout), or closed
        return False


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coalition", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    keys = commands.add_parser("keys", help="generate keys, write and sign documents")
    keys_cmd = keys.add_subparsers(title="keys commands")
    gen = keys_cmd.add_parser("gen", help="generate a private key file (mode 0600)")
    gen.add_argument("--kind", choices=["authority", "node", "broker"], required=True)
    gen.add_argument("--name", required=True, help="nation code, node id or broker name")
    gen.add_argument("--out", type=Path, required=True)
    gen.set_defaults(run=_keys_gen)
    show = keys_cmd.add_parser("show", help="print the public keys of a key file")
    show.add_argument("keyfile", type=Path)
    show.set_defaults(run=_keys_show)
    cert = keys_cmd.add_parser("cert", help="write an (unsigned) node certificate")
    cert.add_argument("--node-key", type=Path, required=True, help="the node's key file")
    cert.add_argument("--nation", required=True)
    cert.add_argument("--max", required=True, help="highest level the node may hold")
    cert.add_argument("--cat", action="append", default=[], metavar="TAG=V1,V2",
                      help="category values the node may hold (repeatable)")
    cert.add_argument("--days", type=int, default=365, help="validity from now")
    cert.add_argument("--serial", type=int, default=None,
                      help="for a replacement (key rotation): higher than the certificate "
                           "it replaces (default: 1)")
    cert.add_argument("--out", type=Path, required=True)
    cert.set_defaults(run=_keys_cert)
    revoke = keys_cmd.add_parser("revoke", help="add a node certificate to its nation's "
                                 "(unsigned) revocation list")
    revoke.add_argument("certificate", type=Path, help="the node certificate to revoke")
    revoke.add_argument("--reason", required=True)
    revoke.add_argument("--out", type=Path, required=True,
                        help="the revocation list, revocations/NATION.toml (created or extended)")
    revoke.set_defaults(run=_keys_revoke)
    root = keys_cmd.add_parser("root", help="write an (unsigned) trust root")
    root.add_argument("--nation", action="append", required=True,
                      metavar="CODE=KEYFILE|ed25519:B64")
    root.add_argument("--community", action="append", default=[], metavar="NAME=A,B,C")
    root.add_argument("--broker", action="append", default=[], metavar="NAME=KEYFILE|ed25519:B64")
    root.add_argument("--threshold", type=int, required=True)
    root.add_argument("--witness-quorum", type=int, default=1)
    root.add_argument("--common-scheme", default="NATO")
    root.add_argument("--version", type=int, default=1)
    root.add_argument("--out", type=Path, required=True)
    root.set_defaults(run=_keys_root)
    policy_cmd = commands.add_parser("policy", help="policy documents").add_subparsers(
        title="policy commands")
    for holder, name in ((keys_cmd, "sign"), (policy_cmd, "sign")):
        sign = holder.add_parser(name, help="add a nation's signature to DOC.sig")
        sign.add_argument("document", type=Path)
        sign.add_argument("--key", type=Path, required=True, help="the nation's authority key")
        sign.set_defaults(run=_keys_sign)

    cli_policy.register(policy_cmd)

    broker = commands.add_parser("broker", help="run the broker")
    broker_cmd = broker.add_subparsers(title="broker commands")
    serve = broker_cmd.add_parser("serve", help="serve nodes until SIGINT/SIGTERM")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=_broker_serve)
    reload = broker_cmd.add_parser("reload", help="make a running broker load its policy "
                                   "directory again (SIGHUP)")
    reload.add_argument("--config", type=Path, required=True)
    reload.set_defaults(run=_broker_reload)
    backup = broker_cmd.add_parser("backup", help="copy the store to a file, also while the "
                                   "broker runs (consistent, integrity-checked)")
    backup.add_argument("--config", type=Path, required=True)
    backup.add_argument("--out", type=Path, required=True, help="a new file (never overwritten)")
    backup.set_defaults(run=_broker_backup)
    repair = broker_cmd.add_parser("repair-tree", help="recompute the audit log's leaf hashes "
                                   "and tree nodes from its entries, checked against the last "
                                   "signed checkpoint (the broker stopped)")
    repair.add_argument("--config", type=Path, required=True)
    repair.add_argument("--dry-run", action="store_true", help="report what differs; write "
                        "nothing")
    repair.add_argument("--json", action="store_true", help="machine-readable report")
    repair.set_defaults(run=_broker_repair_tree)
    check = broker_cmd.add_parser("check-config", help="validate a config and its policy")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(run=_broker_check)

    cli_audit.register(commands.add_parser("audit", help="export, verify and prove the audit log")
                       .add_subparsers(title="audit commands"))

    cli_tls.add_parser(commands)
    cli_admin.add_parser(commands)
    register_bench(commands)

    demo = commands.add_parser("demo", help="run the demo coalition end to end")
    demo.add_argument("--dir", type=Path, help="keep the generated coalition here")
    demo.add_argument("--verbose", action="store_true", help="show the broker's logs")
    demo.set_defaults(run=_demo)
    return parser


def _keys_gen(args: argparse.Namespace) -> int:
    key = KeyFile.generate(args.kind, args.name)
    try:
        key.write(args.out)
    except FileExistsError as exc:
        raise ConfigError(f"{args.out} exists; refusing to overwrite a key") from exc
    _print_public(key)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    _print_public(KeyFile.read(args.keyfile))
    return 0


def _print_public(key: KeyFile) -> None:
    print(f"{key.kind} {key.name}")
    print(f"  sign_key = {crypto.format_key('ed25519', key.sign_public)}")
    print(f"  key_id   = {crypto.key_id(key.sign_public)}")
    if key.enc_key is not None:
        print(f"  enc_key  = {crypto.format_key('x25519', key.enc_public)}")


def _keys_cert(args: argparse.Namespace) -> int:
    node = KeyFile.read(args.node_key)
    now = time.time_ns() // 1_000_000
    cats = {}
    for item in args.cat:
        tag, _, values = item.partition("=")
        if not tag or not values:
            raise ConfigError(f"--cat {item!r} must look like TAG=V1,V2")
        cats[tag] = sorted(set(values.split(",")))
    data = authoring.node_cert_toml(
        node=node.name, nation=args.nation, sign_key=node.sign_public, enc_key=node.enc_public,
        not_before_ms=now, not_after_ms=now + args.days * DAY_MS, max_level=args.max, cats=cats,
        serial=args.serial,
    )
    parse_node_cert(SignedDocument(args.out.name, data, b""))  # e.g. a serial below 1
    args.out.write_bytes(data)
    print(f"wrote {args.out}; sign it with: coalition keys sign {args.out} --key AUTHORITY.key")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    try:
        cert = parse_node_cert(SignedDocument(args.certificate.name,
                                              args.certificate.read_bytes(), b""))
        existing = args.out.read_bytes() if args.out.exists() else None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}") from exc
    entries: tuple[Revocation, ...] = ()
    if existing is not None:
        nation, entries = parse_revocations(SignedDocument(args.out.name, existing, b""))
        if nation != cert.nation:
            raise ConfigError(f"{args.out} is the revocation list of {nation}, and "
                              f"{cert.node} is a {cert.nation} node")
    if any((r.node, r.sign_key) == (cert.node, cert.sign_key) for r in entries):
        raise ConfigError(f"{cert.node}'s certificate with this key is already revoked")
    added = Revocation(nation=cert.nation, node=cert.node, sign_key=cert.sign_key,
                       reason=args.reason, revoked_at=time.time_ns() // 1_000_000)
    data = authoring.revocations_toml(cert.nation, [*entries, added])
    parse_revocations(SignedDocument(args.out.name, data, b""))  # e.g. an empty reason
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    args.out.with_name(args.out.name + ".sig").unlink(missing_ok=True)  # no longer valid
    print(f"wrote {args.out} ({len(entries) + 1} revoked); {cert.nation} signs it with: "
          f"coalition keys sign {args.out} --key AUTHORITY.key")
    return 0


def _public_key_arg(spec: str, what: str) -> tuple[str, bytes]:
    name, _, value = spec.partition("=")
    if not name or not value:
        raise ConfigError(f"{what} {spec!r} must look like NAME=KEYFILE or NAME=ed25519:BASE64")
    if value.startswith("ed25519:"):
        try:
            return name, crypto.parse_key(value, "ed25519")
        except ValueError as exc:
            raise ConfigError(f"{what} {name}: {exc}") from exc
    return name, KeyFile.read(Path(value)).sign_public


def _keys_root(args: argparse.Namespace) -> int:
    nations = dict(_public_key_arg(s, "--nation") for s in args.nation)
    brokers = dict(_public_key_arg(s, "--broker") for s in args.broker)
    communities = {}
    for item in args.community:
        name, _, members = item.partition("=")
        communities[name] = sorted(set(members.split(",")))
    data = authoring.trust_root_toml(
        version=args.version, common_scheme=args.common_scheme, threshold=args.threshold,
        witness_quorum=args.witness_quorum, nations={n: [k] for n, k in nations.items()},
        communities=communities, brokers=brokers,
    )
    args.out.write_bytes(data)
    print(f"wrote {args.out}; each of {args.threshold} nations signs it with "
          f"'coalition keys sign {args.out} --key AUTHORITY.key'")
    return 0


def _keys_sign(args: argparse.Namespace) -> int:
    key = KeyFile.read(args.key)
    if key.kind != "authority":
        raise ConfigError(f"{args.key} is a {key.kind} key; documents are signed by authorities")
    try:
        data = args.document.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.document}: {exc.strerror}") from exc
    if args.document.parent.name == "revocations" or b"\n[[revoked]]" in b"\n" + data:
        nation, _ = parse_revocations(SignedDocument(args.document.name, data, b""))
        if nation != key.name:
            raise ConfigError(f"{args.document} is {nation}'s revocation list; "
                              f"{key.name} cannot sign it")
    elif args.document.parent.name == "nodes" or b"\nnode = " in b"\n" + data:
        cert = parse_node_cert(SignedDocument(args.document.name, data, b""))
        if cert.nation != key.name:
            raise ConfigError(f"{args.document} certifies a {cert.nation} node; "
                              f"{key.name} cannot sign it")
    sig_path = args.document.with_name(args.document.name + ".sig")
    existing = sig_path.read_bytes() if sig_path.exists() else b""
    sig_path.write_bytes(authoring.add_signature(existing, data, key.name, key.signing_key))
    print(f"{key.name} signed {args.document} (key id {crypto.key_id(key.sign_public)}) "
          f"-> {sig_path}")
    return 0


def _broker_check(args: argparse.Namespace) -> int:
    from broker.server import BrokerServer, check_broker_key

    config = load_config(args.config)
    server = BrokerServer.from_config(config)
    bundle = server.bundle
    check_broker_key(bundle, server.name, server.key)
    print(f"config ok: broker {config.broker.name}, listen {config.listen.host}:"
          f"{config.listen.port}, policy bundle {bundle.hash.hex()} with {len(bundle.nodes)} "
          f"node certificate(s)")
    return 0


def _broker_reload(args: argparse.Namespace) -> int:
    from broker.serve import PID_FILE, read_pid

    config = load_config(args.config)
    # Check the new bundle here first, so the operator sees a refusal at once.
    bundle = load_bundle(config.policy.dir, pinned_root_sha256=config.policy.trust_root_sha256)
    pid_file = config.broker.data_dir / PID_FILE
    try:
        pid = read_pid(config.broker.data_dir)
        if pid is None:
            raise FileNotFoundError(f"no {pid_file}")
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no running broker for {args.config} ({pid_file}: {exc})") from exc
    print(f"asked broker {config.broker.name} (pid {pid}) to activate policy bundle "
          f"{bundle.hash.hex()}; its log says whether it did")
    return 0


def _broker_backup(args: argparse.Namespace) -> int:
    from broker.store.sqlite import backup_store

    config = load_config(args.config)
    backup_store(config.broker.data_dir, args.out)
    print(f"backed up {config.broker.data_dir} to {args.out} "
          f"({args.out.stat().st_size} bytes, integrity ok)")
    return 0


def _broker_repair_tree(args: argparse.Namespace) -> int:
    import json

    from broker.audit.note import Signer
    from broker.audit.repair import BrokerRunning, RepairRefused, repair_data_dir
    from broker.server import read_broker_key

    configure(level="warning", json=True)  # logs to stderr: stdout is the report
    config = load_config(args.config)
    key = read_broker_key(config)
    try:
        report = repair_data_dir(config.broker.data_dir,
                                 Signer.from_seed(config.broker.name, bytes(key.signing_key)),
                                 dry_run=args.dry_run)
    except (RepairRefused, BrokerRunning) as exc:  # exit 1: refused, nothing written
        if args.json:
            print(json.dumps({"status": "refused", "code": exc.code, "reason": exc.reason}))
        else:
            print(f"refused: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps(report.to_json()) if args.json else report.summary())
    return 0


def _broker_serve(args: argparse.Namespace) -> int:
    from broker.serve import serve

    configure(level=args.log_level, json=True)
    config = load_config(args.config)
    _use_uvloop()

    async def run() -> None:
        stop, reload = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload.set)
        await serve(config, stop=stop, reload=reload)

    asyncio.run(run())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from broker.demo import run_demo

    configure(level="info" if args.verbose else "error", json=False)
    _use_uvloop()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run_demo(sys.stdout, workdir=args.dir))


def _use_uvloop() -> None:
    """uvloop when installed (it is a dependency on Linux); asyncio's loop otherwise."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    sys.exit(main())
