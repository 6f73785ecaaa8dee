"""``coalition policy check | decide | catalogue``: authority tooling.

* ``check DIR [--pin SHA256] [--against ACTIVE_DIR]``: what loads, who signed each document, what
  is missing, and what would change against the active policy. Exit 0 when the bundle loads, 2
  (the loader's error, verbatim) when it is refused.
* ``decide``: one release decision explained, every reason code with what it means. Exit 0 on
  PERMIT, 1 on DENY.
* ``catalogue``: what one nation may release to another now (:mod:`policies.catalogue`).

Every command also has ``--json`` output. (``coalition policy sign`` lives in :mod:`broker.cli`.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker import router
from broker.errors import ConfigError, PolicyDocumentError, ProtocolError
from broker.policy_changes import EPOCH, format_ms, policy_changes
from policies.bundle import (
    AGREEMENTS_DIR,
    NODES_DIR,
    SCHEMES_DIR,
    TRUST_ROOT,
    Bundle,
    build_bundle,
    bundle_hash,
    check_succession,
    document_hash,
)
from policies.catalogue import Catalogue, Releasable, label_catalogue
from policies.decide import decide
from policies.documents import (
    NATION_RE,
    SignedDocument,
    field,
    name_list,
    parse_node_cert,
    parse_sig_file,
    parse_toml,
    parse_trust_root,
    valid_signers,
)
from policies.loader import read_policy_dir
from policies.model import Label, TrustRoot
from policies.schemes import parse_scheme_body

#: One line per reason code of :mod:`policies.decide`: what failed, in an operator's words.
REASON_EXPLANATIONS: dict[str, str] = {
    "invalid_label": "the label is not valid in its scheme (the sender's or the common one): "
                     "unknown level, tag or value, or orig is not the sender's nation",
    "unmappable": "the sender's equivalence maps the label's level, a tag or a value to nothing "
                  "in the common scheme",
    "not_in_audience": "the recipient's nation is not in the label's rel list (communities "
                       "expanded)",
    "no_agreement": "no agreement has the sender's nation as a party and the recipient's nation "
                    "in a tier",
    "agreement_inactive": "the agreements that put the recipient's nation in a tier are all "
                          "outside their validity window now",
    "above_ceiling": "the label's common level is above the ceiling of the tiers that cover the "
                     "recipient's nation",
    "category_not_covered": "a category value on the label is not in the tier's allow-list",
    "topic_not_covered": "the topic matches none of the tier's topic patterns",
    "recipient_not_accredited": "the recipient node's accreditation, in common terms, does not "
                                "dominate the label (level or category values)",
    "node_inactive": "a certificate is outside its validity window or not the bundle's own, "
                     "or the node is suspended",
    "no_key_for_recipient": "permitted, but the envelope holds no sealed key for the recipient "
                            "(added by the broker)",
}



def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the policy subcommands to ``coalition policy``."""
    check = commands.add_parser("check", help="what a policy directory loads, who signed, "
                                              "what is missing, what would change")
    check.add_argument("directory", type=Path)
    check.add_argument("--pin", metavar="SHA256", help="the trust root hash the broker pins")
    check.add_argument("--against", type=Path, metavar="ACTIVE_DIR",
                       help="the active policy directory to compare with")
    check.add_argument("--store", type=Path, metavar="DATA_DIR",
                       help="a broker's data directory (read only): would that broker take "
                       "this policy on reload (the bundle it has in force, and the highest of "
                       "every document of every bundle it ran)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(run=_check)

    explain = commands.add_parser("decide", help="explain one release decision")
    _policy_args(explain, "NODE")
    explain.add_argument("--topic", required=True)
    explain.add_argument("--label", required=True, metavar="JSON|@FILE",
                         help="the label map (policy, class, cats, rel, orig), sets sorted")
    explain.set_defaults(run=_decide)

    catalogue = commands.add_parser("catalogue", help="what one nation may release to another")
    _policy_args(catalogue, "NATION")
    catalogue.add_argument("--topic")
    catalogue.set_defaults(run=_catalogue)


def _policy_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--policy", type=Path, required=True, metavar="DIR")
    parser.add_argument("--pin", metavar="SHA256", help="the trust root hash the broker pins")
    parser.add_argument("--from", dest="origin", required=True, metavar=what)
    parser.add_argument("--to", dest="destination", required=True, metavar=what)
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="ISO8601", help="e.g. 2027-03-01T12:00:00Z (default: now)")
    when.add_argument("--at-ms", type=int, metavar="N", help="Unix milliseconds")
    parser.add_argument("--json", action="store_true")


# --- shared helpers ---------------------------------------------------------------------------


def _pin(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        pin = bytes.fromhex(text)
    except ValueError:
        pin = b""
    if len(pin) != 32:
        raise ConfigError(f"--pin {text!r} is not a hex SHA-256")
    return pin


def _at_ms(args: argparse.Namespace) -> int:
    if args.at_ms is not None:
        return int(args.at_ms)
    if args.at is None:
        return time.time_ns() // 1_000_000
    try:
        moment = dt.datetime.fromisoformat(args.at)
    except ValueError as exc:
        raise ConfigError(f"--at {args.at!r} is not an ISO 8601 date-time") from exc
    if moment.tzinfo is None:
        raise ConfigError(f"--at {args.at!r} needs a UTC offset (e.g. Z)")
    return (moment - EPOCH) // dt.timedelta(milliseconds=1)


def _load(directory: Path, pin: str | None) -> Bundle:
    return build_bundle(read_policy_dir(directory), pinned_root_sha256=_pin(pin))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False))


def _names(values: Any) -> str:
    return ", ".join(values) or "-"


# --- check ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Requirement:
    """Who must sign a document: ``count`` of ``signers``."""

    signers: tuple[str, ...]
    count: int

    def describe(self) -> str:
        """``needs GBR``, ``needs all of A, B``, ``needs 2 of A, B, C``."""
        if len(self.signers) == 1 and self.count == 1:
            return f"needs {self.signers[0]}"
        quantity = "all" if self.count == len(self.signers) else str(self.count)
        return f"needs {quantity} of {_names(self.signers)}"


@dataclasses.dataclass(frozen=True)
class DocumentReport:
    """One document: its hash, who validly signed it, who is required and missing, and why it
    could not be examined (``problem``), if so."""

    name: str
    sha256: str
    signed_by: tuple[str, ...] = ()
    bad_signatures: tuple[str, ...] = ()
    requirement: Requirement | None = None
    missing: tuple[str, ...] = ()
    problem: str | None = None

    def describe(self) -> str:
        if self.problem is not None:
            return self.problem
        parts = [f"signed by {_names(self.signed_by)}"]
        if self.requirement is not None:
            parts[0] += f" ({self.requirement.describe()})"
        if self.missing:
            parts.append(f"MISSING {_names(self.missing)}")
        if self.bad_signatures:
            parts.append(f"signature that does not verify: {_names(self.bad_signatures)}")
        return "; ".join(parts)


def _check(args: argparse.Namespace) -> int:
    documents = read_policy_dir(args.directory)
    bundle, error = _try_build(documents, _pin(args.pin))
    root = bundle.trust_root if bundle is not None else _parse_root(documents)
    reports = _document_reports(documents, root)
    report: dict[str, Any] = {
        "directory": str(args.directory), "loads": bundle is not None,
        "policy": bundle_hash(documents).hex(),
        "documents": [dataclasses.asdict(r) for r in reports],
    }
    if error is not None:
        report["error"] = {"code": error.code, "document": error.document or "",
                           "reason": error.reason}
    if root is not None:
        report["trust_root"] = {"version": root.version, "common_scheme": root.common_scheme,
                                "threshold": root.threshold, "nations": sorted(root.nations)}
    if bundle is not None:
        report["nodes"] = sorted(bundle.nodes)
        report["agreements"] = [a.ref for a in bundle.agreements]
    if args.against is not None:
        active = read_policy_dir(args.against)
        active_bundle = _try_build(active, None)[0]
        report["changes"] = policy_changes(active, active_bundle, documents, bundle)
        report["against"] = str(args.against)
        if bundle is not None and active_bundle is not None:
            # The succession check a broker running ACTIVE_DIR makes on reload (it also checks
            # the high-water marks of every bundle it ran, which only its store holds).
            try:
                check_succession(active_bundle, bundle)
                report["follows"] = True
            except PolicyDocumentError as exc:
                report["follows"] = False
                report["error"] = {"code": exc.code, "document": exc.document or "",
                                   "reason": exc.reason}
                error = exc
    if args.store is not None and bundle is not None and error is None:
        error = _check_store(args.store, bundle, report)
    if args.json:
        _print_json(report)
    else:
        _print_check(report, reports)
    if error is not None:
        raise error
    return 0


def _check_store(data_dir: Path, bundle: Bundle, report: dict[str, Any]) -> \
        PolicyDocumentError | None:
    """What the broker whose data directory this is would say on reload: ``bundle`` must
    follow the bundle it has in force and stay above the marks of every bundle it ran. A store
    that cannot be read raises (``StorageError``), as the broker would not start on it."""
    from broker.errors import StorageError
    from broker.store.sqlite import SqliteStore
    from broker.store.sqlite_files import FILE_NAME
    from broker.stored_bundle import stored_bundle, stored_high_water

    if not (data_dir / FILE_NAME).is_file():
        raise StorageError(f"--store {data_dir}: no broker store there (no {FILE_NAME})")
    store = SqliteStore.in_dir(data_dir, read_only=True)
    try:
        with store.snapshot():  # one commit of a running broker: both from the same state
            in_force = stored_bundle(store)
            marks = stored_high_water(store, in_force)
    finally:
        store.close()
    report["store"] = str(data_dir)
    try:
        marks.check_successor(in_force, bundle)
    except PolicyDocumentError as exc:
        report["follows_store"] = False
        report["error"] = {"code": exc.code, "document": exc.document or "",
                           "reason": exc.reason}
        return exc
    report["follows_store"] = True
    return None


def _try_build(documents: Mapping[str, SignedDocument],
               pin: bytes | None) -> tuple[Bundle | None, PolicyDocumentError | None]:
    try:
        return build_bundle(documents, pinned_root_sha256=pin), None
    except PolicyDocumentError as exc:
        return None, exc


def _parse_root(documents: Mapping[str, SignedDocument]) -> TrustRoot | None:
    """The trust root's content, whatever its signatures, to say who signed what."""
    doc = documents.get(TRUST_ROOT)
    if doc is None:
        return None
    try:
        return parse_trust_root(doc)
    except PolicyDocumentError:
        return None


def _document_reports(documents: Mapping[str, SignedDocument],
                      root: TrustRoot | None) -> list[DocumentReport]:
    return [_document_report(documents[name], root) for name in sorted(documents)]


def _document_report(doc: SignedDocument, root: TrustRoot | None) -> DocumentReport:
    base = DocumentReport(name=doc.name, sha256=document_hash(doc).hex())
    if root is None:
        return dataclasses.replace(base, problem="not examined: the trust root does not parse")
    try:
        lines = parse_sig_file(doc.sig, document=doc.name)
        requirement = required_signers(doc, root)
    except PolicyDocumentError as exc:
        return dataclasses.replace(base, problem=str(exc))
    present = valid_signers(doc.data, lines, root.nations)
    counted = present & set(requirement.signers)
    missing = (sorted(set(requirement.signers) - present)
               if len(counted) < requirement.count else [])
    return dataclasses.replace(
        base, signed_by=tuple(sorted(present)), requirement=requirement,
        missing=tuple(missing),
        bad_signatures=tuple(sorted({line.signer for line in lines} - present)))


def required_signers(doc: SignedDocument, root: TrustRoot) -> Requirement:
    """Who must sign ``doc`` under ``root`` (DESIGN §4), read from the document's own fields.

    Raise :class:`PolicyDocumentError` when the document is not of a known kind or the field
    that names its signers does not parse.
    """
    threshold = Requirement(tuple(sorted(root.nations)), root.threshold)
    if doc.name == TRUST_ROOT or doc.name == f"{SCHEMES_DIR}{root.common_scheme}.toml":
        return threshold
    if doc.name.startswith(SCHEMES_DIR):
        return Requirement((parse_scheme_body(doc)[0].name,), 1)
    if doc.name.startswith(NODES_DIR):
        return Requirement((parse_node_cert(doc).nation,), 1)
    if doc.name.startswith(AGREEMENTS_DIR):
        parties = name_list(field(parse_toml(doc), "parties", list, doc.name), doc.name,
                            "parties", NATION_RE)
        return Requirement(parties, len(parties))
    raise PolicyDocumentError("unknown kind of document", document=doc.name)


def _print_check(report: dict[str, Any], documents: list[DocumentReport]) -> None:
    verdict = "loads" if report["loads"] else "REFUSED"
    if report.get("follows") is False:
        verdict = f"loads, but REFUSED as a successor of {report['against']}"
    elif report.get("follows_store") is False:
        verdict = f"loads, but the broker of {report['store']} would REFUSE it"
    print(f"policy {report['directory']}: {verdict}")
    if "error" in report:
        error = report["error"]
        print(f"  {error['code']}: {error['reason']}")
    print(f"policy version {report['policy']}{'' if report['loads'] else ' (if it loaded)'}")
    if "trust_root" in report:
        root = report["trust_root"]
        print(f"trust root version {root['version']}, common scheme {root['common_scheme']}, "
              f"threshold {root['threshold']} of {len(root['nations'])}: "
              f"{_names(root['nations'])}")
    print(f"documents ({len(documents)}):")
    width = max((len(d.name) for d in documents), default=0)
    for doc in documents:
        print(f"  {doc.name:<{width}}  {doc.describe()}")
    if "agreements" in report:
        print(f"nodes: {_names(report['nodes'])}")
        print(f"agreements: {_names(report['agreements'])}")
    if "changes" in report:
        _print_changes(report["against"], report["changes"])


def _print_changes(against: str, changes: dict[str, Any]) -> None:
    print(f"changes against {against}:")
    policy = changes["policy"]
    print(f"  policy version {policy['old']} -> {policy['new']}")
    if "trust_root_version" in changes:
        versions = changes["trust_root_version"]
        if versions["old"] != versions["new"]:
            print(f"  trust root version {versions['old']} -> {versions['new']}")
    if "note" in changes:
        print(f"  ({changes['note']})")
    quiet = True
    for kind in ("documents", "nations", "schemes", "nodes", "agreements", "tiers"):
        found = changes.get(kind, {})
        for change in ("added", "removed", "changed"):
            if found.get(change):
                quiet = False
                print(f"  {kind} {change}: {_names(found[change])}")
        for name, fields in found.get("details", {}).items():
            print(f"    {name}: {'; '.join(fields)}")
    if quiet:
        print("  no document changes")


# --- decide -----------------------------------------------------------------------------------


def _decide(args: argparse.Namespace) -> int:
    bundle = _load(args.policy, args.pin)
    sender = _node(bundle, args.origin, "--from")
    recipient = _node(bundle, args.destination, "--to")
    topic = _topic(args.topic)
    label = _label_arg(args.label)
    now_ms = _at_ms(args)
    decision = decide(label, bundle.nodes[sender], bundle.nodes[recipient], topic, now_ms, bundle)
    report: dict[str, Any] = {
        "decision": "permit" if decision.permit else "deny",
        "reasons": [{"code": r, "explanation": REASON_EXPLANATIONS.get(r, "")}
                    for r in decision.reasons],
        "from": sender, "from_nation": bundle.nodes[sender].nation,
        "to": recipient, "to_nation": bundle.nodes[recipient].nation,
        "topic": topic, "at_ms": now_ms, "at": format_ms(now_ms), "label": label.to_map(),
        "policy": bundle.hash.hex(),
    }
    if decision.via is not None:
        report["via"] = decision.via
    if args.json:
        _print_json(report)
    else:
        _print_decision(report)
    return 0 if decision.permit else 1


def _node(bundle: Bundle, node: str, flag: str) -> str:
    if node not in bundle.nodes:
        raise ConfigError(f"{flag} {node}: no certificate for this node in the policy")
    return node


def _topic(topic: str) -> str:
    try:
        return router.validate_topic(topic)
    except ProtocolError as exc:
        raise ConfigError(f"--topic {topic!r}: {exc.reason}") from exc


def _label_arg(text: str) -> Label:
    """``--label``: a JSON map, or ``@FILE`` holding one; checked by :meth:`Label.from_map`."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--label {text}: cannot read: {exc.strerror}") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--label is not JSON: {exc}") from exc
    return Label.from_map(value)


def _print_decision(report: dict[str, Any]) -> None:
    if report["decision"] == "permit":
        print(f"PERMIT via {report['via']}" if "via" in report
              else "PERMIT (within one nation: no agreement needed)")
    else:
        print("DENY")
        width = max(len(r["code"]) for r in report["reasons"])
        for reason in report["reasons"]:
            print(f"  {reason['code']:<{width}}  {reason['explanation']}")
    label = report["label"]
    cats = "; ".join(f"{t}: {_names(v)}" for t, v in sorted(label["cats"].items()))
    print(f"  label   {label['policy']} {label['class']}{'; ' + cats if cats else ''}; "
          f"rel {_names(label['rel'])}; orig {label['orig']}")
    print(f"  route   {report['from']} ({report['from_nation']}) -> {report['to']} "
          f"({report['to_nation']}) on {report['topic']} at {report['at']}")
    print(f"  policy  {report['policy']}")


# --- catalogue --------------------------------------------------------------------------------


def _catalogue(args: argparse.Namespace) -> int:
    bundle = _load(args.policy, args.pin)
    for nation, flag in ((args.origin, "--from"), (args.destination, "--to")):
        if nation not in bundle.trust_root.nations:
            raise ConfigError(f"{flag} {nation}: not a nation of the trust root")
    topic = _topic(args.topic) if args.topic is not None else None
    catalogue = label_catalogue(bundle, args.origin, args.destination, now_ms=_at_ms(args),
                                topic=topic)
    if args.json:
        _print_json(catalogue.to_map())
    else:
        _print_catalogue(catalogue)
    return 0


def _print_catalogue(cat: Catalogue) -> None:
    scope = f"on topic {cat.topic}" if cat.topic is not None else "on any topic"
    print(f"catalogue {cat.origin} -> {cat.destination} at {format_ms(cat.at_ms)}, {scope}")
    print(f"  policy {cat.policy}")
    if cat.same_nation:
        print("within one nation: no agreement needed")
    for entry in cat.entries:
        topics = f"topics {_names(entry.topics)}" if entry.topics is not None else "any topic"
        print(f"{entry.via}  ({topics}; until {format_ms(entry.not_after)})")
        _print_releasable(entry.releasable, cat.common_scheme)
    if cat.inactive:
        print(f"not active now: {_names(cat.inactive)}")
    if cat.best is None:
        hint = ("; every tier above is limited to topics, give --topic"
                if cat.entries and cat.topic is None else "")
        print(f"nothing releasable to {cat.destination} {scope}{hint}")
        return
    print(f"best {scope}:")
    _print_releasable(cat.best, cat.common_scheme)
    if len(cat.entries) > 1:
        print("  (a label is released when one tier admits its level and all its values)")


def _print_releasable(what: Releasable, common: str) -> None:
    rows = [(common, f"up to {what.level}", what.categories)]
    if what.national_scheme is not None:
        level = (f"up to {what.national_level}" if what.national_level is not None
                 else f"no level maps at or below {what.level}")
        rows.append((what.national_scheme, level, what.national_categories))
    width = max(len(name) for name, _, _ in rows)
    for name, level, cats in rows:
        values = "; ".join(f"{tag}: {', '.join(v) or 'none'}" for tag, v in sorted(cats.items()))
        print(f"    {name:<{width}}  {level}{'; ' + values if values else ''}")
