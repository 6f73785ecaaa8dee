"""Certificate revocation lists and the succession rules between two bundles. Pure: no I/O.

A nation withdraws a node certificate (a stolen key, a decommissioned gateway) by listing it in
``revocations/NATION.toml``, signed by that nation alone::

    nation = "USA"
    [[revoked]]
    node = "USA-GW2"
    sign_key = "ed25519:BASE64"        # the signing key of the certificate withdrawn
    reason = "key compromise"
    revoked_at = 2026-11-21T09:00:00Z

A revoked certificate is refused everywhere: at the handshake, in the ``directory`` frame and
as a recipient (``node_inactive``). A node gets back in only with a new certificate, with
another key and a higher ``serial``.

The broker is stateful where the documents are not: :func:`check_succession` refuses a bundle
that would take a step back from the one in force: a node certificate with a lower serial (or
the same serial with other bytes), a revocation dropped, an agreement version lowered (and, in
:func:`policies.bundle.check_succession`, a scheme or trust root lowered or changed at the same
version, or an agreement changed at the same version). An operator who holds old, validly
signed documents therefore cannot bring back a compromised key, a narrowed agreement or a
withdrawn equivalence in place of the one in force.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker.errors import PolicyDocumentError
from policies.documents import (
    NATION_RE,
    NODE_RE,
    SignedDocument,
    field,
    key_field,
    parse_toml,
    timestamp_ms,
    verify_signed_by,
)
from policies.model import Agreement, NodeCert, Revocation, TrustRoot

REVOCATIONS_DIR = "revocations/"
_ENTRY_KEYS = {"node", "sign_key", "reason", "revoked_at"}
_MAX_REASON = 256


def parse_revocations(doc: SignedDocument) -> tuple[str, tuple[Revocation, ...]]:
    """Parse (without checking signatures) a revocation list: its nation and its entries."""
    table = parse_toml(doc)
    name = doc.name
    unknown = set(table) - {"nation", "revoked"}
    if unknown:
        raise PolicyDocumentError(f"unknown field(s) {sorted(unknown)}", document=name)
    nation = field(table, "nation", str, name)
    if not NATION_RE.match(nation):
        raise PolicyDocumentError(f"field 'nation': {nation!r} is not a nation code",
                                  document=name)
    raw = table.get("revoked", [])
    if not isinstance(raw, list):
        raise PolicyDocumentError("field 'revoked' must be an array of tables ([[revoked]])",
                                  document=name)
    entries = []
    for i, item in enumerate(raw):
        where = f"revoked[{i}]."
        if not isinstance(item, dict):
            raise PolicyDocumentError(f"field 'revoked[{i}]' must be a table", document=name)
        extra = set(item) - _ENTRY_KEYS
        if extra:
            raise PolicyDocumentError(f"field 'revoked[{i}]': unknown field(s) {sorted(extra)}",
                                      document=name)
        node = field(item, "node", str, name, where)
        if not NODE_RE.match(node):
            raise PolicyDocumentError(f"field '{where}node': {node!r} is not a node id",
                                      document=name)
        reason = field(item, "reason", str, name, where)
        if not reason or len(reason) > _MAX_REASON:
            raise PolicyDocumentError(f"field '{where}reason' must be 1..{_MAX_REASON} chars",
                                      document=name)
        entries.append(Revocation(
            nation=nation, node=node, sign_key=key_field(item, "sign_key", "ed25519", name, where),
            reason=reason, revoked_at=timestamp_ms(item, "revoked_at", name)))
    keys = [(r.node, r.sign_key) for r in entries]
    if len(set(keys)) != len(keys):
        raise PolicyDocumentError("a certificate is listed twice", document=name)
    return nation, tuple(entries)


def verify_revocations(doc: SignedDocument,
                       root: TrustRoot) -> tuple[str, tuple[Revocation, ...]]:
    """Parse a revocation list and check that its nation is known and signed it; returns the
    nation (the bundle checks the file is named after it) and the entries."""
    nation, entries = parse_revocations(doc)
    if nation not in root.nations:
        raise PolicyDocumentError(f"field 'nation': {nation} is not a nation of the trust root",
                                  document=doc.name)
    verify_signed_by(doc, [nation], root.nations)
    return nation, entries


def revoked_index(revocations: tuple[Revocation, ...]) -> dict[tuple[str, bytes], Revocation]:
    """Revocations by ``(node, sign_key)``, for an O(1) check per certificate."""
    return {(r.node, r.sign_key): r for r in revocations}


def revocation_of(cert: NodeCert,
                  index: Mapping[tuple[str, bytes], Revocation]) -> Revocation | None:
    """The revocation withdrawing ``cert`` (from its own nation), if any."""
    found = index.get((cert.node, cert.sign_key))
    return found if found is not None and found.applies_to(cert) else None


# --- succession -------------------------------------------------------------------------------


def document_bytes(cert: NodeCert) -> bytes:
    """The certificate's document bytes, without its signatures: a nation may re-sign an
    unchanged certificate (say, after rotating its authority key) without a new serial."""
    return SignedDocument.from_bytes(cert.signed).data if cert.signed else b""


def cert_step_back(old: NodeCert, new: NodeCert) -> str | None:
    """Why ``new`` may not replace ``old``, the certificate of the same node in force (``None``:
    it may). The one rule for a broker taking a new bundle and a gateway taking a directory
    from the broker: a node keeps its nation, and a changed certificate raises its serial."""
    if new.nation != old.nation:
        return (f"node {new.node}: certified by {new.nation}, but by {old.nation} in force "
                "(a node id does not change nation)")
    if new.serial < old.serial:
        return (f"node {new.node}: certificate serial {new.serial} is lower than {old.serial} "
                "in force (a rolled-back certificate)")
    if new.serial == old.serial and document_bytes(new) != document_bytes(old):
        return f"node {new.node}: a changed certificate must raise its serial (still {new.serial})"
    return None


def succession_problems(
    *,
    old_nodes: Mapping[str, NodeCert],
    new_nodes: Mapping[str, NodeCert],
    old_revocations: tuple[Revocation, ...],
    new_revocations: tuple[Revocation, ...],
    old_agreements: tuple[Agreement, ...],
    new_agreements: tuple[Agreement, ...],
) -> list[str]:
    """Every way the new documents step back from the old ones (empty: a valid successor)."""
    problems = []
    for node, new in sorted(new_nodes.items()):
        old = old_nodes.get(node)
        problem = None if old is None else cert_step_back(old, new)
        if problem is not None:
            problems.append(problem)
    kept = {(r.nation, r.node, r.sign_key) for r in new_revocations}
    for r in old_revocations:
        if (r.nation, r.node, r.sign_key) not in kept:
            problems.append(f"revocation of {r.node} by {r.nation} was dropped "
                            "(revocations are permanent)")
    new_versions = {a.id: a.version for a in new_agreements}
    for a in old_agreements:
        version = new_versions.get(a.id)
        if version is not None and version < a.version:
            problems.append(f"agreement {a.id}: version {version} is lower than {a.version} "
                            "in force (a rolled-back agreement)")
    return problems
