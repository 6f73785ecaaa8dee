"""Signed trust documents: parse TOML bytes, check detached signatures, build the model.

A document is human-editable TOML; its signatures live in a detached ``NAME.toml.sig`` with one
line per signer: ``NATION ed25519:KEYID BASE64SIG``, each an Ed25519 signature over
``"coalition/v1/document\\n" + <exact file bytes>``. Trust rules apply to the bytes, never to a
re-serialisation. Everything here is pure (bytes in, model out); reading the files is the job of
:mod:`policies.loader`.

Every refusal is a :class:`PolicyDocumentError` naming the document, the field and, for
signatures, the missing signer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import nacl.signing

from broker import canonical, crypto
from broker.errors import PolicyDocumentError, ProtocolError
from policies.model import Accreditation, BrokerIdentity, Nation, NodeCert, TrustRoot

NATION_RE = re.compile(r"^[A-Z][A-Z0-9_-]{1,15}\Z")  # \Z: "$" would accept a final newline
NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SIG_LINE_RE = re.compile(r"^(\S+) ed25519:([0-9a-f]{16}) (\S+)$")
MAX_DOCUMENT_BYTES = 256 * 1024
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class SignatureLine:
    """One line of a ``.sig`` file."""

    signer: str
    key_id: str
    signature: bytes

    def to_line(self) -> str:
        """The line as written in the ``.sig`` file (no newline)."""
        return f"{self.signer} ed25519:{self.key_id} {crypto.b64encode(self.signature)}"


@dataclasses.dataclass(frozen=True)
class SignedDocument:
    """A document's exact bytes with its detached signature file, as stored or served."""

    name: str
    data: bytes
    sig: bytes

    def to_bytes(self) -> bytes:
        """Canonical msgpack ``{doc, name, sig}``: how certificates travel in ``directory``."""
        return canonical.encode({"doc": self.data, "name": self.name, "sig": self.sig})

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedDocument:
        """Inverse of :meth:`to_bytes`; raise :class:`PolicyDocumentError` when malformed."""
        try:
            obj = canonical.decode(data, max_bytes=2 * MAX_DOCUMENT_BYTES)
        except ProtocolError as exc:
            raise PolicyDocumentError(f"signed document: {exc.reason}") from exc
        if (
            not isinstance(obj, dict)
            or set(obj) != {"doc", "name", "sig"}
            or not isinstance(obj["doc"], bytes)
            or not isinstance(obj["sig"], bytes)
            or not isinstance(obj["name"], str)
        ):
            raise PolicyDocumentError("signed document must be {doc: bin, name: str, sig: bin}")
        return cls(name=obj["name"], data=obj["doc"], sig=obj["sig"])


# --- signatures -----------------------------------------------------------------------------


def sign_document(data: bytes, signer: str, key: nacl.signing.SigningKey) -> SignatureLine:
    """Sign a document's exact bytes as ``signer`` (a nation code)."""
    public = crypto.public_bytes(key)
    signature = crypto.sign(key, crypto.DOMAIN_DOCUMENT, data)
    return SignatureLine(signer=signer, key_id=crypto.key_id(public), signature=signature)


def parse_sig_file(text: bytes, *, document: str) -> list[SignatureLine]:
    """Parse a ``.sig`` file; blank lines and ``#`` comments are ignored."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyDocumentError("signature file is not UTF-8", document=document) from exc
    lines = []
    for number, raw in enumerate(decoded.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SIG_LINE_RE.match(line)
        if match is None:
            raise PolicyDocumentError(
                f"signature line {number} is not 'NATION ed25519:KEYID BASE64SIG'",
                document=document,
            )
        try:
            signature = crypto.b64decode(match.group(3), what="signature")
        except ValueError as exc:
            raise PolicyDocumentError(f"signature line {number}: {exc}", document=document) from exc
        lines.append(SignatureLine(match.group(1), match.group(2), signature))
    return lines


def valid_signers(
    data: bytes, lines: Iterable[SignatureLine], nations: Mapping[str, Nation]
) -> frozenset[str]:
    """Nations with at least one valid signature over ``data`` by one of their authority keys."""
    signers: set[str] = set()
    for line in lines:
        nation = nations.get(line.signer)
        if nation is None:
            continue
        for key in nation.authority_keys:
            if crypto.key_id(key) == line.key_id and crypto.check_signature(
                key, crypto.DOMAIN_DOCUMENT, data, line.signature
            ):
                signers.add(line.signer)
    return frozenset(signers)


def verify_signed_by(
    doc: SignedDocument, required: Iterable[str], nations: Mapping[str, Nation]
) -> None:
    """Raise unless every nation in ``required`` validly signed the document."""
    lines = parse_sig_file(doc.sig, document=doc.name)
    present = valid_signers(doc.data, lines, nations)
    missing = sorted(set(required) - present)
    if missing:
        raise PolicyDocumentError(
            f"missing or invalid signature by {', '.join(missing)}", document=doc.name,
            code="unsigned",
        )


# --- TOML helpers ---------------------------------------------------------------------------


def parse_toml(doc: SignedDocument) -> dict[str, Any]:
    """Parse the document bytes as TOML (UTF-8), bounded in size."""
    if len(doc.data) > MAX_DOCUMENT_BYTES:
        raise PolicyDocumentError(f"larger than {MAX_DOCUMENT_BYTES} bytes", document=doc.name)
    try:
        return tomllib.loads(doc.data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PolicyDocumentError(f"not valid TOML: {exc}", document=doc.name) from exc
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        raise PolicyDocumentError("not valid TOML: nested too deeply", document=doc.name) from exc


def field(table: Mapping[str, Any], key: str, kind: type, doc: str, where: str = "") -> Any:
    """A required field of the given type, or an error naming the document and the field."""
    name = f"{where}{key}"
    if key not in table:
        raise PolicyDocumentError(f"field '{name}' is missing", document=doc)
    value = table[key]
    if kind is int and isinstance(value, bool):
        raise PolicyDocumentError(f"field '{name}' must be an integer", document=doc)
    if not isinstance(value, kind):
        raise PolicyDocumentError(f"field '{name}' must be {kind.__name__}", document=doc)
    return value


def timestamp_ms(table: Mapping[str, Any], key: str, doc: str) -> int:
    """A TOML offset date-time field as Unix milliseconds (local times are refused)."""
    value = field(table, key, dt.datetime, doc)
    if value.tzinfo is None:
        raise PolicyDocumentError(f"field '{key}' needs a UTC offset (e.g. Z)", document=doc)
    # Integer arithmetic, not ``timestamp() * 1000``: a float can land one millisecond early,
    # and validity windows are compared to the millisecond.
    elapsed: dt.timedelta = value - _EPOCH
    return elapsed // dt.timedelta(milliseconds=1)


def ordered_list(value: Any, doc: str, where: str) -> tuple[str, ...]:
    """A non-empty array of unique non-empty strings, in the order written (e.g. levels)."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v for v in value)):
        raise PolicyDocumentError(f"field '{where}' must be a non-empty array of strings",
                                  document=doc)
    if len(set(value)) != len(value):
        raise PolicyDocumentError(f"field '{where}' has duplicates", document=doc)
    return tuple(value)


def table_field(table: Mapping[str, Any], key: str, doc: str, where: str = "") -> dict[str, Any]:
    """An optional sub-table (absent = empty)."""
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise PolicyDocumentError(f"field '{where}{key}' must be a table", document=doc)
    return value


def name_list(
    value: Any, doc: str, where: str, pattern: re.Pattern[str] | None = None
) -> tuple[str, ...]:
    """An array of unique non-empty strings, returned as a canonical (sorted) set."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyDocumentError(f"field '{where}' must be an array of strings", document=doc)
    if len(set(value)) != len(value):
        raise PolicyDocumentError(f"field '{where}' has duplicates", document=doc)
    if pattern is not None:
        for v in value:
            if not pattern.match(v):
                raise PolicyDocumentError(f"field '{where}': bad name {v!r}", document=doc)
    return tuple(canonical.canonical_set(value))


def key_field(table: Mapping[str, Any], key: str, kind: str, doc: str, where: str = "") -> bytes:
    """A ``kind:BASE64`` public key field."""
    text = field(table, key, str, doc, where)
    try:
        return crypto.parse_key(text, kind)
    except ValueError as exc:
        raise PolicyDocumentError(f"field '{where}{key}': {exc}", document=doc) from exc


def cats_field(value: Any, doc: str, where: str) -> dict[str, tuple[str, ...]]:
    """A ``{TAG = [values]}`` table."""
    if not isinstance(value, dict):
        raise PolicyDocumentError(f"field '{where}' must be a table of tag = [values]",
                                  document=doc)
    return {tag: name_list(values, doc, f"{where}.{tag}") if values else ()
            for tag, values in value.items()}


# --- trust root -----------------------------------------------------------------------------


def parse_trust_root(doc: SignedDocument) -> TrustRoot:
    """Parse (without checking signatures) a trust root document."""
    table = parse_toml(doc)
    name = doc.name
    nations_table = field(table, "nations", dict, name)
    nations: dict[str, Nation] = {}
    for code, entry in nations_table.items():
        if not NATION_RE.match(code):
            raise PolicyDocumentError(f"nation code {code!r} is not valid", document=name)
        if not isinstance(entry, dict):
            raise PolicyDocumentError(f"field 'nations.{code}' must be a table", document=name)
        keys = field(entry, "authority_keys", list, name, f"nations.{code}.")
        if not keys:
            raise PolicyDocumentError(f"nation {code} lists no authority key", document=name)
        parsed = tuple(key_field({"k": k}, "k", "ed25519", name, f"nations.{code}.authority_keys.")
                       for k in keys)
        nations[code] = Nation(code=code, authority_keys=parsed)
    communities = {
        cname: name_list(members, name, f"communities.{cname}", NATION_RE)
        for cname, members in table_field(table, "communities", name).items()
    }
    for cname, members in communities.items():
        if cname in nations:
            raise PolicyDocumentError(f"community {cname} has a nation's name", document=name)
        unknown = [m for m in members if m not in nations]
        if unknown:
            raise PolicyDocumentError(
                f"community {cname} names unknown nation(s) {unknown}", document=name
            )
    broker_entries = table.get("brokers", [])
    if not isinstance(broker_entries, list) or not all(isinstance(e, dict)
                                                       for e in broker_entries):
        raise PolicyDocumentError("field 'brokers' must be an array of tables", document=name)
    brokers = tuple(
        BrokerIdentity(
            name=field(entry, "name", str, name, "brokers."),
            key=key_field(entry, "key", "ed25519", name, "brokers."),
        )
        for entry in broker_entries
    )
    threshold = field(table, "threshold", int, name)
    if not 1 <= threshold <= len(nations):
        raise PolicyDocumentError(
            f"field 'threshold' must be between 1 and the number of nations ({len(nations)})",
            document=name,
        )
    quorum = table.get("witness_quorum", 1)
    if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 0:
        raise PolicyDocumentError("field 'witness_quorum' must be an integer ≥ 0", document=name)
    return TrustRoot(
        version=field(table, "version", int, name),
        common_scheme=field(table, "common_scheme", str, name),
        threshold=threshold,
        witness_quorum=quorum,
        nations=nations,
        communities=communities,
        brokers=brokers,
    )


def verify_trust_root(doc: SignedDocument, *, signed_by: TrustRoot | None = None) -> TrustRoot:
    """Parse a trust root and check it carries the threshold of signatures.

    The first root is self-signed: ``threshold`` of the nations it lists. A later root must
    also carry the threshold of the root it replaces (``signed_by``).
    """
    root = parse_trust_root(doc)
    lines = parse_sig_file(doc.sig, document=doc.name)
    for authority in (root, signed_by) if signed_by is not None else (root,):
        present = valid_signers(doc.data, lines, authority.nations)
        if len(present) < authority.threshold:
            missing = sorted(set(authority.nations) - present)
            raise PolicyDocumentError(
                f"{len(present)} valid signature(s), threshold is {authority.threshold}; "
                f"not signed by {', '.join(missing)}",
                document=doc.name, code="unsigned",
            )
    if signed_by is not None and root.version <= signed_by.version:
        raise PolicyDocumentError(
            f"version {root.version} does not follow {signed_by.version}", document=doc.name
        )
    return root


# --- node certificates ----------------------------------------------------------------------


def parse_node_cert(doc: SignedDocument) -> NodeCert:
    """Parse (without checking signatures) a node certificate."""
    table = parse_toml(doc)
    name = doc.name
    node = field(table, "node", str, name)
    if not NODE_RE.match(node):
        raise PolicyDocumentError(f"field 'node': {node!r} is not a valid node id", document=name)
    nation = field(table, "nation", str, name)
    accreditation = field(table, "accreditation", dict, name)
    not_before = timestamp_ms(table, "not_before", name)
    not_after = timestamp_ms(table, "not_after", name)
    if not_after <= not_before:
        raise PolicyDocumentError("not_after must be later than not_before", document=name)
    serial = field(table, "serial", int, name) if "serial" in table else 1
    if not 1 <= serial < 1 << 53:
        raise PolicyDocumentError("field 'serial' must be a positive integer", document=name)
    return NodeCert(
        node=node,
        nation=nation,
        sign_key=key_field(table, "sign_key", "ed25519", name),
        enc_key=key_field(table, "enc_key", "x25519", name),
        not_before=not_before,
        not_after=not_after,
        accreditation=Accreditation(
            max=field(accreditation, "max", str, name, "accreditation."),
            cats=cats_field(accreditation.get("cats", {}), name, "accreditation.cats"),
        ),
        signed=doc.to_bytes(),
        serial=serial,
    )


def verify_node_cert(doc: SignedDocument, root: TrustRoot) -> NodeCert:
    """Parse a node certificate and check its nation is known and signed it."""
    cert = parse_node_cert(doc)
    if cert.nation not in root.nations:
        raise PolicyDocumentError(
            f"field 'nation': {cert.nation} is not a nation of the trust root", document=doc.name
        )
    verify_signed_by(doc, [cert.nation], root.nations)
    return cert
