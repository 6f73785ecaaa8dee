"""Fuzz targets: one pure function per parser of untrusted bytes.

Each target takes ``bytes`` and returns ``True`` when the input parsed (and passed the target's
oracle, typically a canonical round trip) or ``False`` when the parser refused it with its
documented :class:`~broker.errors.BrokerError` subclass and one of its documented codes.
Anything else propagates: another exception type (``KeyError``, ``TypeError``,
``RecursionError``…), a documented class with an undocumented code, or a broken oracle
(:class:`FuzzInvariantError`). That is what the fuzzer reports as a crash.

The targets need no atheris: ``tests/unit/test_fuzz_targets.py`` runs them over the seeds and
random bytes, and the hypothesis tests in ``tests/property/test_fuzz_parsers.py`` call them too.

Structured targets decode their input without ``atheris.FuzzedDataProvider``:
``bundle_document`` reads a selector byte then document bytes, ``export`` and ``auditor``
split their input at :data:`EXPORT_SEPARATOR` into the files of an export directory.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from broker import canonical, wire
from broker.audit import leaves, note
from broker.envelope import Envelope
from broker.errors import BrokerError, PolicyDocumentError, ProtocolError, VerificationError
from clients import auditor as audit
from clients import export as export_reader
from policies import agreements, bundle, documents, schemes
from policies.documents import SignedDocument
from tests.fuzz.context import context, sign_all


class FuzzInvariantError(AssertionError):
    """A parser broke its contract: wrong error class or code, or a failed round trip."""


#: Which errors each target may raise, by class, with the codes that class may carry.
Documented = Mapping[type[BrokerError], frozenset[str]]

_CANONICAL = frozenset({"bad_frame", "non_canonical", "too_large"})
_POLICY = frozenset({"policy_document", "unsigned", "unpinned"})

DOCUMENTED: dict[str, Documented] = {
    "frame": {ProtocolError: _CANONICAL},
    "envelope": {ProtocolError: _CANONICAL | {"unsupported_version", "invalid_label",
                                              "invalid_topic"}},
    "signed_document": {PolicyDocumentError: _POLICY},
    "sig_file": {PolicyDocumentError: _POLICY},
    "trust_root": {PolicyDocumentError: _POLICY},
    "node_cert": {PolicyDocumentError: _POLICY},
    "scheme": {PolicyDocumentError: _POLICY},
    "agreement": {PolicyDocumentError: _POLICY},
    "bundle_content": {PolicyDocumentError: _POLICY},
    "bundle_document": {PolicyDocumentError: _POLICY},
    "entry": {ProtocolError: _CANONICAL | {"bad_entry", "invalid_label"}},
    "note": {ProtocolError: frozenset({"bad_frame", "too_large"}),
             VerificationError: frozenset({"bad_signature"})},
    "checkpoint": {ProtocolError: frozenset({"bad_frame", "too_large"})},
    "export": {ProtocolError: frozenset({"bad_frame", "too_large"})},
    "auditor": {ProtocolError: frozenset({"bad_frame"})},
}


def _refused(target: str, exc: BrokerError) -> bool:
    """``False`` if ``exc`` is documented for ``target``; else raise :class:`FuzzInvariantError`."""
    for kind, codes in DOCUMENTED[target].items():
        if isinstance(exc, kind):
            if exc.code not in codes:
                raise FuzzInvariantError(
                    f"{target}: {type(exc).__name__} with undocumented code {exc.code!r}") from exc
            return False
    raise FuzzInvariantError(f"{target}: undocumented error class {type(exc).__name__}") from exc


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise FuzzInvariantError(what)


def _guarded(target: str) -> Callable[[Callable[[bytes], None]], Callable[[bytes], bool]]:
    """Turn ``body`` (raises on refusal) into a target returning whether the input parsed."""

    def wrap(body: Callable[[bytes], None]) -> Callable[[bytes], bool]:
        @functools.wraps(body)
        def run(data: bytes) -> bool:
            try:
                body(data)
            except BrokerError as exc:
                return _refused(target, exc)
            return True

        return run

    return wrap


# --- wire and envelopes -----------------------------------------------------------------------


@_guarded("frame")
def frame(data: bytes) -> None:
    """``wire.decode_frame``; what parses re-encodes to the same bytes."""
    parsed = wire.decode_frame(data)
    _check(wire.encode_frame(parsed) == data, "frame: re-encoding changed the bytes")
    _check(wire.decode_frame(wire.encode_frame(parsed)) == parsed, "frame: not a fixed point")


@_guarded("envelope")
def envelope(data: bytes) -> None:
    """``Envelope.from_bytes``; the parsed envelope accounts for every byte of its body."""
    env = Envelope.from_bytes(data)
    _check(env.raw == data and canonical.encode([env.body, env.sig]) == data,
           "envelope: outer array does not re-encode")
    body = canonical.decode(env.body)
    label_map = body["label"]
    rebuilt = {
        "v": 1, "id": env.id, "from": env.sender, "ts": env.ts, "topic": env.topic,
        "prec": env.prec, "ttl": env.ttl, "label": label_map,
        "enc": {"alg": "xchacha20poly1305+sealedbox", "nonce": env.nonce, "ct": env.ct,
                "keys": dict(env.keys)},
    }
    if env.to:
        rebuilt["to"] = list(env.to)
    _check(canonical.encode(rebuilt) == env.body, "envelope: the model drops or alters a field")
    _check(env.label_bytes == canonical.encode(label_map), "envelope: label bytes differ")
    as_map = env.label.to_map()
    _check({k: v for k, v in as_map.items() if k in label_map or v} == label_map,
           "envelope: the parsed label differs from the label map")


# --- policy documents ---------------------------------------------------------------------------


@_guarded("signed_document")
def signed_document(data: bytes) -> None:
    """``SignedDocument.from_bytes`` (the ``directory`` certificate form); canonical round trip."""
    doc = SignedDocument.from_bytes(data)
    _check(doc.to_bytes() == data, "signed_document: re-encoding changed the bytes")


@_guarded("sig_file")
def sig_file(data: bytes) -> None:
    """``parse_sig_file`` (each line re-parses to itself), then the lines' signatures over the
    demo trust root checked against the demo authorities."""
    lines = documents.parse_sig_file(data, document="fuzz.toml.sig")
    for line in lines:
        again = documents.parse_sig_file(line.to_line().encode(), document="again")
        _check(again == [line], "sig_file: a parsed line does not re-parse to itself")
    nations = context().root.nations
    signers = documents.valid_signers(context().documents[bundle.TRUST_ROOT].data, lines, nations)
    _check(signers <= set(nations), "sig_file: a signer that is not a nation")


def _unsigned(name: str, data: bytes) -> SignedDocument:
    """``data`` as document ``name`` with no signature (what the ``parse_*`` functions read)."""
    return SignedDocument(name=name, data=data, sig=b"")


def _signed(name: str, data: bytes) -> SignedDocument:
    """``data`` as document ``name``, signed by every demo authority, so that the checks behind
    the signatures are reached. Targets sign only what parsed: signing is most of the cost."""
    return SignedDocument(name=name, data=data, sig=sign_all(data))


@_guarded("trust_root")
def trust_root(data: bytes) -> None:
    """``parse_trust_root`` and ``verify_trust_root`` (first root, and as a successor)."""
    root = documents.parse_trust_root(_unsigned(bundle.TRUST_ROOT, data))
    doc = _signed(bundle.TRUST_ROOT, data)
    _check(documents.verify_trust_root(doc) == root, "trust_root: verify differs from parse")
    if root.version > context().root.version:
        documents.verify_trust_root(doc, signed_by=context().root)


@_guarded("node_cert")
def node_cert(data: bytes) -> None:
    """``parse_node_cert``, ``verify_node_cert`` and the accreditation check."""
    cert = documents.parse_node_cert(_unsigned("nodes/FUZZ.toml", data))
    doc = _signed("nodes/FUZZ.toml", data)
    verified = documents.verify_node_cert(doc, context().root)
    _check(verified == cert, "node_cert: verify differs from parse")
    scheme = context().bundle.schemes.get(cert.nation)
    if scheme is not None:
        schemes.check_accreditation(cert, scheme, doc.name)
    _check(SignedDocument.from_bytes(verified.signed) == doc, "node_cert: signed form differs")


@_guarded("scheme")
def scheme(data: bytes) -> None:
    """A national scheme (equivalence included) or, named so, the common scheme."""
    body, _ = schemes.parse_scheme_body(_unsigned("schemes/FUZZ.toml", data))
    doc = _signed("schemes/FUZZ.toml", data)
    ctx = context()
    if body.name == ctx.root.common_scheme:
        schemes.verify_common_scheme(doc, ctx.root)
    else:
        schemes.verify_national_scheme(doc, ctx.root, ctx.common)


@_guarded("agreement")
def agreement(data: bytes) -> None:
    """``parse_agreement`` and ``verify_agreement`` against the demo root and common scheme."""
    ctx = context()
    parsed = agreements.parse_agreement(_unsigned("agreements/FUZZ.toml", data), ctx.common)
    doc = _signed("agreements/FUZZ.toml", data)
    _check(agreements.verify_agreement(doc, ctx.root, ctx.common) == parsed,
           "agreement: verify differs from parse")


@_guarded("bundle_content")
def bundle_content(data: bytes) -> None:
    """``documents_from_content`` then ``build_bundle`` (what the auditor does with an export)."""
    docs = bundle.documents_from_content(data)
    for name, doc in docs.items():
        _check(SignedDocument.from_bytes(doc.to_bytes()) == doc, f"bundle_content: {name}")
    built = bundle.build_bundle(docs, pinned_root_sha256=None)
    _check(bundle.bundle_content(built) == data, "bundle_content: re-encoding changed the bytes")


def _parse_alone(doc: SignedDocument) -> None:
    """What ``build_bundle`` parses first for a document of this kind (no signatures)."""
    if doc.name == bundle.TRUST_ROOT:
        documents.parse_trust_root(doc)
    elif doc.name.startswith(bundle.SCHEMES_DIR):
        schemes.parse_scheme_body(doc)
    elif doc.name.startswith(bundle.NODES_DIR):
        documents.parse_node_cert(doc)
    else:
        agreements.parse_agreement(doc, context().common)


def bundle_document_input(name: str, data: bytes) -> bytes:
    """The ``bundle_document`` input that puts ``data`` in place of core document ``name``."""
    return bytes([context().core_names.index(name)]) + data


@_guarded("bundle_document")
def bundle_document(data: bytes) -> None:
    """A core demo bundle (:attr:`Context.core_names`) with one document replaced and re-signed
    by every authority; ``build_bundle`` then checks it against the others.

    Input: one selector byte (the document, by :attr:`Context.core_names`, modulo their
    number), then the new document bytes.
    """
    if not data:
        return
    ctx = context()
    name = ctx.core_names[data[0] % len(ctx.core_names)]
    _parse_alone(_unsigned(name, data[1:]))
    docs = {n: ctx.documents[n] for n in ctx.core_names}
    docs[name] = _signed(name, data[1:])
    bundle.build_bundle(docs, pinned_root_sha256=None)


# --- audit log ----------------------------------------------------------------------------------


@_guarded("entry")
def entry(data: bytes) -> None:
    """``entry_from_bytes``; what parses re-encodes to the same bytes (the Merkle leaf)."""
    parsed = leaves.entry_from_bytes(data)
    _check(parsed.to_bytes() == data, "entry: re-encoding changed the bytes")


@_guarded("note")
def note_(data: bytes) -> None:
    """``parse_note`` (round trip) and ``verify_checkpoint`` with the demo broker and witnesses."""
    parsed = note.parse_note(data)
    _check(parsed.to_string().encode() == data, "note: re-serialising changed the text")
    ctx = context()
    checked = note.verify_checkpoint(data, ctx.log_verifier(), ctx.witness_verifiers(), 0)
    _check(checked.checkpoint.to_text() == checked.text, "note: checkpoint text round trip")


def checkpoint(data: bytes) -> bool:
    """``Checkpoint.from_text``, ``Verifier.from_string`` and ``parse_signature_line``, each on
    the input as text (invalid UTF-8 kept as lone surrogates, as a careless reader might).
    ``True`` when any of them parsed it."""
    text = data.decode("utf-8", "surrogateescape")
    parsed = False
    for parse in (_checkpoint_text, _verifier_key, _signature_line):
        try:
            parse(text)
        except BrokerError as exc:
            _refused("checkpoint", exc)
        else:
            parsed = True
    return parsed


def _checkpoint_text(text: str) -> None:
    parsed = note.Checkpoint.from_text(text)
    _check(parsed.to_text() == text, "checkpoint: text round trip")


def _verifier_key(text: str) -> None:
    verifier = note.Verifier.from_string(text)
    _check(verifier.to_string() == text, "checkpoint: verifier key round trip")


def _signature_line(text: str) -> None:
    sig = note.parse_signature_line(text)
    _check(sig.to_line() == text.removesuffix("\n"), "checkpoint: signature line round trip")


# --- the audit export reader --------------------------------------------------------------------

#: Separates the parts of an ``export`` input: manifest.json, entries.bin, leaves.bin, the name
#: of a checkpoint file, its content, and a bundle file.
EXPORT_SEPARATOR = b"\n\x00--8<--\x00\n"
_EXPORT_PARTS = 6


_EXPORT_PREFIX = "coalition-fuzz-export-"


@functools.cache
def _export_dir() -> Path:
    """This process's scratch export directory, on a memory file system when there is one
    (the reader is what is fuzzed, not the disk). libFuzzer ends the process without running
    ``atexit``, so directories left by processes that are gone are removed here."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for stale in parent.glob(f"{_EXPORT_PREFIX}*"):
        if stale.name.removeprefix(_EXPORT_PREFIX).isdigit() and not _alive(
                int(stale.name.removeprefix(_EXPORT_PREFIX))):
            shutil.rmtree(stale, ignore_errors=True)
    path = parent / f"{_EXPORT_PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    for sub in ("checkpoints", "bundles"):
        (path / sub).mkdir(parents=True)
    atexit.register(shutil.rmtree, path, True)
    return path


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 only checks; it sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _note_name(raw: bytes) -> str:
    """A usable file name from fuzz bytes (the reader must cope with any name it finds)."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "1"
    ok = name not in ("", ".", "..") and "/" not in name and "\x00" not in name
    return name if ok and len(name.encode()) <= 200 else "1"


def split_export(data: bytes) -> list[bytes]:
    """The six parts of an ``export`` input (missing ones empty)."""
    parts = data.split(EXPORT_SEPARATOR, _EXPORT_PARTS - 1)
    return parts + [b""] * (_EXPORT_PARTS - len(parts))


def _write_export(data: bytes, bundle_name: str) -> Path:
    """Write the export directory an ``export``/``auditor`` input describes; return it."""
    manifest, entries_bin, leaves_bin, name, note_bytes, bundle_bytes = split_export(data)
    base = _export_dir()
    for sub in ("checkpoints", "bundles"):
        for old in (base / sub).iterdir():  # the previous input's files
            old.unlink()
    (base / "manifest.json").write_bytes(manifest)
    (base / "entries.bin").write_bytes(entries_bin)
    (base / "leaves.bin").write_bytes(leaves_bin)
    (base / "checkpoints" / f"{_note_name(name)}.note").write_bytes(note_bytes)
    (base / "bundles" / f"{bundle_name}.msgpack").write_bytes(bundle_bytes)
    return base


@_guarded("export")
def export(data: bytes) -> None:
    """``clients.export.Export``: open the manifest, read every entry record, the recorded
    leaves, the checkpoint notes (and parse them) and the bundles of an export directory built
    from the input. ``True`` when all of it reads."""
    _, entries_bin, leaves_bin, _, _, bundle_bytes = split_export(data)
    opened = export_reader.Export.open(_write_export(data, "00"))
    recorded = list(opened.iter_recorded_leaves())
    _check(b"".join(recorded) == leaves_bin[:len(leaves_bin) - len(leaves_bin) % 32],
           "export: recorded leaves do not cover leaves.bin")
    notes = opened.checkpoint_notes()
    _check(len(notes) == 1, "export: the checkpoint note was not listed")
    for _, text in notes:  # as the auditor does with each note: parsed, or refused alone
        try:
            note.parse_note(text)
        except BrokerError as exc:
            _refused("export", exc)
    _check(opened.bundles() == {"00": bundle_bytes}, "export: bundles differ")
    records = list(opened.entries())
    header = struct.Struct(">QI")
    _check(b"".join(header.pack(i, len(b)) + b for i, b in records) == entries_bin,
           "export: the entry records do not account for entries.bin")


def _bundle_name(content: bytes) -> str:
    """What the exporter names a bundle file: the bundle's hash (``00`` if it has none)."""
    try:
        return bundle.bundle_hash(bundle.documents_from_content(content)).hex()
    except BrokerError:
        return "00"


@_guarded("auditor")
def auditor(data: bytes) -> None:
    """``clients.auditor.verify_export`` over an ``export`` input, the demo trust root pinned:
    whatever the export holds, the auditor returns a report (a problem is a finding in it,
    not an exception); only an export it cannot open at all is refused."""
    bundle_bytes = split_export(data)[5]
    base = _write_export(data, _bundle_name(bundle_bytes))
    pin = bundle.document_hash(context().documents[bundle.TRUST_ROOT])
    report = audit.verify_export(base, pins=[pin])
    _check(isinstance(report, audit.Report), "auditor: no report")
    json.dumps(report.to_map())  # what `coalition audit verify --json` prints


#: Every target by name (the ``TARGET`` argument of ``python -m tests.fuzz.run``).
TARGETS: dict[str, Callable[[bytes], bool]] = {
    "frame": frame,
    "envelope": envelope,
    "signed_document": signed_document,
    "sig_file": sig_file,
    "trust_root": trust_root,
    "node_cert": node_cert,
    "scheme": scheme,
    "agreement": agreement,
    "bundle_content": bundle_content,
    "bundle_document": bundle_document,
    "entry": entry,
    "note": note_,
    "checkpoint": checkpoint,
    "export": export,
    "auditor": auditor,
}
assert set(TARGETS) == set(DOCUMENTED)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How many inputs of a batch parsed and how many were refused (documented errors)."""

    parsed: int = 0
    refused: int = 0


def run_all(target: str, inputs: list[bytes]) -> Outcome:
    """Run ``target`` over ``inputs`` (crashes propagate); count what parsed."""
    parsed = sum(TARGETS[target](data) for data in inputs)
    return Outcome(parsed=parsed, refused=len(inputs) - parsed)
