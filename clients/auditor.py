"""Offline audit verification and decision replay: trust nothing the broker says without proof.

Given an export (:mod:`clients.export`) and the SHA-256 of the trust root(s) the auditor
accepts, :func:`verify_export`:

1. rebuilds every policy bundle from its signed documents (every signature checked, its hash
   recomputed, its trust root pinned);
2. reads every entry in order (no gap, canonical, well-formed), recomputes its leaf hash and the
   tree, and names the first entry that differs from the leaf hash recorded at append time;
3. checks every checkpoint: the broker's signature (key from the trust root), its root against
   the recomputed tree (so all checkpoints are consistent with one another and with the entries),
   every cosignature against the witness node's certified key, and the quorum of distinct nations
   on the latest one; checkpoints the auditor saved earlier must match too;
4. re-runs the release decision for every recipient of every ``route`` entry under the bundle
   recorded in it, and flags any difference; flags every ``deliver`` to a recipient the message
   was not released to;
5. checks that every released copy ends exactly once, delivered or expired, never expired
   before its TTL, and not left outstanding long past its TTL (a copy dropped silently);
6. checks that every ``policy`` entry's bundle is in the export and neither steps back from
   the one in force before nor goes below the highest of every document of all before (a
   rollback the broker must have refused; :mod:`policies.highwater`).

Problems are collected (not raised) so the report names all of them, first bad index first.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from broker.audit import merkle
from broker.audit.note import (
    SIG_COSIGNATURE_V1,
    Checkpoint,
    Verifier,
    parse_note,
    verify_cosignature,
)
from broker.audit.witness import verify_log_checkpoint
from broker.errors import BrokerError
from clients import replay_workers
from clients.export import Export
from clients.replay import Replay
from clients.replay_workers import Decider, default_workers
from policies.bundle import (
    TRUST_ROOT,
    Bundle,
    build_bundle,
    bundle_hash,
    document_hash,
    documents_from_content,
)
from policies.model import NodeCert

Progress = Callable[[int, int], None]

#: A copy still outstanding this long past its TTL at the end of the log was dropped (the
#: broker sweeps for expired copies every ``expiry_interval_ms``, 1 s by default).
DEFAULT_EXPIRY_GRACE_MS = 5 * 60 * 1000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing that does not verify; ``index`` is the entry it is about, when there is one."""

    what: str
    detail: str
    index: int | None = None

    def to_map(self) -> dict[str, Any]:
        return {"what": self.what, "detail": self.detail, "index": self.index}


@dataclasses.dataclass
class Report:
    """The outcome of :func:`verify_export`."""

    origin: str
    entries: int = 0
    checkpoints: int = 0
    cosignatures: int = 0
    decisions_replayed: int = 0
    deliveries_checked: int = 0
    expiries_checked: int = 0
    bundles: int = 0
    latest_checkpoint: int | None = None
    witnessed_size: int | None = None
    witnessed_by: tuple[str, ...] = ()
    unwitnessed_entries: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_index(self) -> int | None:
        indexes = [p.index for p in self.problems if p.index is not None]
        return min(indexes) if indexes else None

    def add(self, what: str, detail: str, index: int | None = None) -> None:
        self.problems.append(Problem(what, detail, index))

    def to_map(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["problems"] = [p.to_map() for p in self.problems]
        out["witnessed_by"] = list(self.witnessed_by)
        out.update(ok=self.ok, first_bad_index=self.first_bad_index)
        return out


def load_bundles(export: Export, pins: Iterable[bytes], report: Report) -> dict[bytes, Bundle]:
    """Every bundle of the export whose documents verify under a pinned trust root."""
    pinned = set(pins)
    bundles: dict[bytes, Bundle] = {}
    for name, content in export.bundles().items():
        try:
            documents = documents_from_content(content)
            digest = bundle_hash(documents)
            if digest.hex() != name:
                raise ValueError(f"its documents hash to {digest.hex()}")
            root = documents.get(TRUST_ROOT)
            if root is None or document_hash(root) not in pinned:
                raise ValueError("its trust root is not one the auditor pinned")
            bundles[digest] = build_bundle(documents, pinned_root_sha256=document_hash(root))
        except (BrokerError, ValueError) as exc:
            report.add("bundle", f"bundle {name}: {exc}")
    report.bundles = len(bundles)
    return bundles


class _Runs:
    """The export's entries in runs of ``size`` (or fewer, of RUN_BYTES), up to the first
    gap or unreadable record (kept in :attr:`missing` / :attr:`failure` for the report)."""

    def __init__(self, export: Export, size: int) -> None:
        self.export = export
        self.size = size
        self.missing: tuple[int, int] | None = None  # (position, the next stored index)
        self.failure: str | None = None

    def __iter__(self) -> Iterator[list[tuple[int, bytes]]]:
        run: list[tuple[int, bytes]] = []
        size = 0
        try:
            for position, (index, data) in enumerate(self.export.entries()):
                if index != position:
                    self.missing = (position, index)
                    break
                run.append((index, data))
                size += len(data)
                if len(run) == self.size or size >= replay_workers.RUN_BYTES:
                    yield run
                    run, size = [], 0
        except BrokerError as exc:
            self.failure = exc.reason
        if run:
            yield run


def check_entries(export: Export, decider: Decider, report: Report, progress: Progress | None,
                  total: int, sizes: Iterable[int] = ()) -> tuple[merkle.RootsAt, int | None]:
    """Walk every entry: order, format, recorded leaf hash, replay (its decisions from
    ``decider``, applied in order to ``decider.replay``). Returns the tree's roots at ``sizes``
    (the checkpoints'; memory stays small however long the log) and the first index whose entry
    differs from the leaf hash recorded at append time (if any)."""
    tree = merkle.RootsAt(sizes)
    first_mismatch: int | None = None
    recorded = export.iter_recorded_leaves()
    runs = _Runs(export, replay_workers.CHUNK)
    replay = decider.replay
    for run, steps in decider.steps(iter(runs)):
        for (index, data), step in zip(run, steps, strict=True):
            leaf = merkle.leaf_hash(data)
            expected = next(recorded, None)
            if expected is not None and expected != leaf:
                first_mismatch = index if first_mismatch is None else first_mismatch
                report.add("entries", "the entry differs from the one appended at this index "
                           "(its recorded leaf hash does not match)", index)
            tree.append(leaf)
            replay.apply(step)
            if progress is not None and index % 4096 == 0:
                progress(index, total)
    recorded.close()
    if runs.missing is not None:
        position, index = runs.missing
        report.add("entries", f"entry {position} is missing (next stored index is {index})",
                   position)
    if runs.failure is not None:
        report.add("entries", f"entries.bin: {runs.failure}", tree.size)
    report.entries = tree.size
    count = export.recorded_leaf_count()
    if count != tree.size:
        report.add("entries", f"{count} leaf hashes recorded for {tree.size} entries",
                   min(count, tree.size))
        if count < tree.size:  # the entries past the recorded leaves are unconfirmed
            first_mismatch = count if first_mismatch is None else min(first_mismatch, count)
    return tree, first_mismatch


def _node_certs(bundles: Mapping[bytes, Bundle]) -> dict[str, list[NodeCert]]:
    """Witness certificates from every bundle, less those any bundle revoked: revocations are
    permanent, and a stolen, revoked key must not cosign a forked log."""
    revoked = {(cert.node, cert.sign_key) for bundle in bundles.values()
               for cert in bundle.nodes.values() if bundle.revocation_of(cert) is not None}
    certs: dict[str, list[NodeCert]] = {}
    for bundle in bundles.values():
        for cert in bundle.nodes.values():
            if (cert.node, cert.sign_key) in revoked:
                continue
            if cert not in certs.setdefault(cert.node, []):
                certs[cert.node].append(cert)
    return certs


def log_verifiers(bundles: Mapping[bytes, Bundle], origin: str) -> list[Verifier]:
    keys = {b.key for bundle in bundles.values() for b in bundle.trust_root.brokers
            if b.name == origin}
    return [Verifier(origin, key) for key in sorted(keys)]


def verified_checkpoint(note: str, verifiers: list[Verifier]) -> Checkpoint:
    error: BrokerError | None = None
    for verifier in verifiers:
        try:
            return verify_log_checkpoint(note, verifier)
        except BrokerError as exc:
            error = exc
    raise error or BrokerError("the trust root lists no key for this broker", code="bad_signature")


def _witnesses(note: str, certs: Mapping[str, list[NodeCert]], origin: str) -> dict[str, str]:
    """``{node: nation}`` of the cosignatures on ``note`` that verify."""
    parsed = parse_note(note)
    found = {}
    for sig in parsed.signatures:
        if sig.name == origin:
            continue
        for cert in certs.get(sig.name, ()):
            try:
                verify_cosignature(parsed.text, sig,
                                   Verifier(cert.node, cert.sign_key, SIG_COSIGNATURE_V1))
            except BrokerError:
                continue
            found[cert.node] = cert.nation
    return found


def checkpoint_sizes(notes: Iterable[str]) -> set[int]:
    """The sizes the notes claim, unverified: where the entry walk keeps the tree's root (a
    note that does not parse names none, and fails its verification later)."""
    sizes = set()
    for note in notes:
        try:
            sizes.add(Checkpoint.from_text(parse_note(note).text).size)
        except (BrokerError, ValueError):
            continue
    return sizes


def check_checkpoints(notes: Iterable[tuple[str, str]], tree: merkle.RootsAt,
                      bundles: Mapping[bytes, Bundle], saved: Iterable[tuple[str, str]],
                      quorum: int | None, report: Report,
                      first_mismatch: int | None = None) -> None:
    """Signatures, roots against the recomputed tree, cosignatures and the quorum, for the
    exported ``notes`` and the ``saved`` ones (``(name, note)`` each): ``tree`` kept the roots
    at their sizes (:func:`checkpoint_sizes`)."""
    verifiers = log_verifiers(bundles, report.origin)
    certs = _node_certs(bundles)
    required = quorum if quorum is not None else max(
        (b.trust_root.witness_quorum for b in bundles.values()), default=1)
    witnessed: tuple[Checkpoint, list[str]] | None = None
    for source, name, note in [*(("export", n, t) for n, t in notes),
                               *(("saved", n, t) for n, t in saved)]:
        try:
            checkpoint = verified_checkpoint(note, verifiers)
        except BrokerError as exc:
            report.add("checkpoint", f"{source} {name}: {exc.reason}")
            continue
        if checkpoint.size > tree.size:
            report.add("checkpoint", f"{source} {name}: signed over {checkpoint.size} entries, "
                       f"the log has {tree.size} (entries were removed)", tree.size)
            continue
        if tree.root(checkpoint.size) != checkpoint.root:
            # The entry that no longer matches its recorded leaf, if the recorded leaves are
            # themselves intact; else only the range up to this checkpoint is known.
            first = (first_mismatch if first_mismatch is not None
                     and first_mismatch < checkpoint.size else None)
            report.add("checkpoint", f"{source} {name}: the entries do not hash to its root "
                       f"(the log was rewritten)", first)
            continue
        if source == "export":
            nations = sorted(set(_witnesses(note, certs, report.origin).values()))
            report.checkpoints += 1
            report.cosignatures += len(nations)
            report.latest_checkpoint = max(report.latest_checkpoint or 0, checkpoint.size)
            if len(nations) >= required and (witnessed is None
                                              or checkpoint.size >= witnessed[0].size):
                witnessed = (checkpoint, nations)
    if witnessed is None:
        if tree.size:
            report.add("quorum", f"no checkpoint is cosigned by the {required} nation(s) the "
                       "quorum requires: nothing in this log is witnessed")
        report.unwitnessed_entries = tree.size
        return
    report.witnessed_by = tuple(witnessed[1])
    report.witnessed_size = witnessed[0].size
    # Entries after the last witnessed checkpoint are reported, not failed: the nations cosign
    # a checkpoint only once their gateways have seen it (e.g. the one signed at shutdown).
    report.unwitnessed_entries = tree.size - witnessed[0].size


def verify_export(path: Path, *, pins: Iterable[bytes], saved: Iterable[Path] = (),
                  quorum: int | None = None, progress: Progress | None = None,
                  expiry_grace_ms: int = DEFAULT_EXPIRY_GRACE_MS,
                  workers: int | None = None) -> Report:
    """Verify an export directory; see the module docstring for what is checked.

    ``expiry_grace_ms``: how long past its TTL a copy may still be outstanding at the end of
    the log before it counts as dropped (more than the broker's ``expiry_interval_ms``).
    ``workers``: processes that parse entries and replay their decisions (0: all in this one;
    ``None``: one per CPU for a large log, :func:`clients.replay_workers.default_workers`)."""
    export = Export.open(path)
    report = Report(origin=export.origin)
    bundles = load_bundles(export, pins, report)
    if not bundles:
        report.add("bundle", "no policy bundle verifies under the pinned trust root(s)")
    total = _count_hint(path)
    exported = {digest: content for name, content in export.bundles().items()
                if (digest := _hex_or_none(name)) is not None}
    replay = Replay(report.add, bundles, exported=exported.keys())
    contents = {digest: content for digest, content in exported.items() if digest in bundles}
    count = default_workers(total) if workers is None else workers
    notes = export.checkpoint_notes()
    saved_notes, unreadable = [], []
    for note_path in saved:
        try:
            saved_notes.append((note_path.name, note_path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            unreadable.append(f"saved checkpoint {note_path.name!r} cannot be read: {exc}")
    sizes = checkpoint_sizes(note for _, note in [*notes, *saved_notes])
    with Decider(bundles, contents, replay, count) as decider:
        tree, first_mismatch = check_entries(export, decider, report, progress, total, sizes)
    replay.finish(expiry_grace_ms)
    report.decisions_replayed = replay.decisions_replayed
    report.deliveries_checked = replay.deliveries_checked
    report.expiries_checked = replay.expiries_checked
    for problem in unreadable:
        report.add("checkpoint", problem)
    check_checkpoints(notes, tree, bundles, saved_notes, quorum, report, first_mismatch)
    report.problems.sort(key=lambda p: (p.index is None, p.index or 0))
    return report


def _hex_or_none(name: str) -> bytes | None:
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def _count_hint(path: Path) -> int:
    try:
        return int(json.loads((path / "manifest.json").read_text())["size"])
    except (OSError, ValueError, KeyError):
        return 0
