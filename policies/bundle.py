"""A policy bundle: the set of signed documents in force, verified as one unit.

A bundle is built from document bytes (``{relative path: SignedDocument}``) in one go; any
document that fails refuses the whole bundle, so the broker never runs on half a policy. Its
``hash`` (SHA-256 over the sorted SHA-256 digests of the documents' bytes) is the policy version
logged with every decision. Pure: no I/O.

Layout: ``trust-root.toml``, ``schemes/NAME.toml`` (the common scheme and one per nation),
``nodes/NODE.toml``, ``agreements/ID.toml``, ``revocations/NATION.toml``; a file's stem must be
the name it declares.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping

from broker import canonical
from broker.errors import PolicyDocumentError, ProtocolError
from policies.agreements import verify_agreement
from policies.documents import SignedDocument, verify_node_cert, verify_trust_root
from policies.model import Agreement, NodeCert, Revocation, Scheme, Tier, TrustRoot
from policies.revocations import (
    REVOCATIONS_DIR,
    revocation_of,
    revoked_index,
    succession_problems,
    verify_revocations,
)
from policies.schemes import check_accreditation, verify_common_scheme, verify_national_scheme

TRUST_ROOT = "trust-root.toml"
NODES_DIR = "nodes/"
SCHEMES_DIR = "schemes/"
AGREEMENTS_DIR = "agreements/"
_KNOWN_DIRS = (NODES_DIR, SCHEMES_DIR, AGREEMENTS_DIR, REVOCATIONS_DIR)

#: An (agreement, tier) pair that puts a recipient nation in a tier for an originating party.
Candidate = tuple[Agreement, Tier]


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Verified documents in force, with their content hash.

    ``schemes`` holds the common scheme and every national scheme, by name; ``agreements`` is
    sorted by id. ``nodes`` also holds revoked certificates (so that a revoked node is told why
    it is refused); :meth:`revocation_of` says which.
    """

    trust_root: TrustRoot
    nodes: Mapping[str, NodeCert]
    documents: Mapping[str, SignedDocument]
    hash: bytes
    schemes: Mapping[str, Scheme] = dataclasses.field(default_factory=dict)
    agreements: tuple[Agreement, ...] = ()
    revocations: tuple[Revocation, ...] = ()
    _index: Mapping[tuple[str, str], tuple[Candidate, ...]] = dataclasses.field(
        init=False, repr=False, compare=False)
    _revoked: Mapping[tuple[str, bytes], Revocation] = dataclasses.field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Indexed once per bundle so a decision costs the same at 3 or 100 nations.
        index: dict[tuple[str, str], list[Candidate]] = {}
        for agreement in self.agreements:
            for tier in agreement.tiers:
                for origin in agreement.parties:
                    for member in tier.members:
                        index.setdefault((origin, member), []).append((agreement, tier))
        object.__setattr__(self, "_index", {k: tuple(v) for k, v in index.items()})
        object.__setattr__(self, "_revoked", revoked_index(self.revocations))

    def revocation_of(self, cert: NodeCert) -> Revocation | None:
        """The revocation that withdrew ``cert``, if its nation revoked it."""
        return revocation_of(cert, self._revoked) if self._revoked else None

    def usable_certs(self) -> list[NodeCert]:
        """The certificates not revoked, sorted by node id (what the ``directory`` serves)."""
        return [cert for _, cert in sorted(self.nodes.items())
                if self.revocation_of(cert) is None]

    def nation_of(self, node: str) -> str | None:
        """The nation of a known node, else ``None``."""
        cert = self.nodes.get(node)
        return cert.nation if cert else None

    @property
    def common_scheme(self) -> Scheme | None:
        """The common scheme named by the trust root (``None`` only in a hand-built bundle)."""
        return self.schemes.get(self.trust_root.common_scheme)

    def candidates(self, origin: str, recipient: str) -> tuple[Candidate, ...]:
        """Every (agreement, tier) with ``origin`` a party and ``recipient`` a tier member,
        whatever their validity window."""
        return self._index.get((origin, recipient), ())


def document_hash(doc: SignedDocument) -> bytes:
    """SHA-256 of a document's exact bytes (the signatures are not part of it)."""
    return hashlib.sha256(doc.data).digest()


def bundle_hash(documents: Mapping[str, SignedDocument]) -> bytes:
    """SHA-256 over the sorted list of document hashes."""
    return hashlib.sha256(b"".join(sorted(document_hash(d) for d in documents.values()))).digest()


def build_bundle(
    documents: Mapping[str, SignedDocument], *, pinned_root_sha256: bytes | None
) -> Bundle:
    """Verify every document and return the bundle, or raise naming the first bad document.

    ``pinned_root_sha256`` is the hash of the trust root the operator's configuration pins;
    a trust root with other bytes is refused (``None`` skips the pin, for tools that only
    inspect a directory).
    """
    root_doc = documents.get(TRUST_ROOT)
    if root_doc is None:
        raise PolicyDocumentError("no trust root in the bundle", document=TRUST_ROOT)
    if pinned_root_sha256 is not None and document_hash(root_doc) != pinned_root_sha256:
        raise PolicyDocumentError(
            f"SHA-256 {document_hash(root_doc).hex()} differs from the pinned trust root "
            f"{pinned_root_sha256.hex()}", document=TRUST_ROOT, code="unpinned",
        )
    root = verify_trust_root(root_doc)
    for name in documents:
        if name != TRUST_ROOT and not name.startswith(_KNOWN_DIRS):
            raise PolicyDocumentError("unknown kind of document", document=name)
    schemes = _schemes(documents, root)
    nodes = _nodes(documents, root, schemes)
    common = schemes[root.common_scheme]
    agreements = []
    for name in _names(documents, AGREEMENTS_DIR):
        agreement = verify_agreement(documents[name], root, common)
        _check_stem(name, AGREEMENTS_DIR, agreement.id, "id")
        agreements.append(agreement)
    revocations = _revocations(documents, root)
    return Bundle(trust_root=root, nodes=nodes, documents=dict(documents),
                  hash=bundle_hash(documents), schemes=schemes,
                  agreements=tuple(sorted(agreements, key=lambda a: a.id)),
                  revocations=revocations)


def check_succession(old: Bundle, new: Bundle) -> None:
    """Raise ``PolicyDocumentError`` (``rollback``) if ``new`` steps back from ``old``: a node
    certificate with a lower serial, a revocation dropped, an agreement version lowered, a trust
    root or scheme version lowered, or a trust root, scheme or agreement changed without raising
    its version (see :mod:`policies.revocations`)."""
    problems = succession_problems(
        old_nodes=old.nodes, new_nodes=new.nodes,
        old_revocations=kept_revocations(old.revocations, new),
        new_revocations=new.revocations, old_agreements=old.agreements,
        new_agreements=new.agreements)
    problems += _same_version_problems(old, new)
    old_root, new_root = old.trust_root.version, new.trust_root.version
    if new_root < old_root:
        problems.append(f"trust root version {new_root} is lower than {old_root} in force")
    elif new_root == old_root and document_text(old, TRUST_ROOT) != document_text(new, TRUST_ROOT):
        problems.append(f"a changed trust root must raise its version (still {new_root})")
    elif new_root > old_root and TRUST_ROOT in new.documents:
        try:  # DESIGN §4: a later root carries the threshold of the root it replaces
            verify_trust_root(new.documents[TRUST_ROOT], signed_by=old.trust_root)
        except PolicyDocumentError as exc:
            problems.append(f"trust root version {new_root} is not signed by the threshold "
                            f"of version {old_root} in force ({exc.reason})")
    if problems:
        raise PolicyDocumentError(f"does not follow the bundle in force ({old.hash.hex()[:16]}): "
                                  + "; ".join(problems), code="rollback")


def kept_revocations(revocations: Iterable[Revocation], new: Bundle) -> tuple[Revocation, ...]:
    """The revocations ``new`` must still hold: those of nations in its trust root. A nation
    that left the root cannot sign its list any more, and none of its certificates can be in
    the bundle; were it to come back, the broker's high-water marks ask for them again."""
    return tuple(r for r in revocations if r.nation in new.trust_root.nations)


def _same_version_problems(old: Bundle, new: Bundle) -> list[str]:
    """A scheme is one nation's word (the common one, the root's threshold's) on what its labels
    mean: an older signed copy must not come back. So its ``version`` never goes down, and a
    changed document must raise it (the same bytes may stay at the same version). The same
    for an agreement changed at the same version (a lower one is refused by
    :func:`succession_problems`): ``dsa@version`` names what permitted a release in every
    decision, so one version must mean one text."""
    problems = []
    was_agreements = {a.id: a for a in old.agreements}
    for agreement in new.agreements:
        before = was_agreements.get(agreement.id)
        path = f"{AGREEMENTS_DIR}{agreement.id}.toml"
        if before is not None and before.version == agreement.version and document_text(
                old, path) != document_text(new, path):
            problems.append(f"agreement {agreement.id} changed: it must raise its version "
                            f"(still {agreement.version})")
    for name, scheme in sorted(new.schemes.items()):
        was, path = old.schemes.get(name), f"{SCHEMES_DIR}{name}.toml"
        if was is None:
            continue
        if scheme.version < was.version:
            problems.append(f"scheme {name}: version {scheme.version} is lower than "
                            f"{was.version} in force (a rolled-back scheme)")
        elif scheme.version == was.version and document_text(old, path) != document_text(
                new, path):
            problems.append(f"scheme {name} changed: it must raise its version (still "
                            f"{scheme.version})")
    return problems


def document_text(bundle: Bundle, name: str) -> bytes | None:
    """The bytes of document ``name`` in ``bundle`` (``None``: a bundle built without it)."""
    doc = bundle.documents.get(name)
    return doc.data if doc is not None else None


def _revocations(documents: Mapping[str, SignedDocument],
                 root: TrustRoot) -> tuple[Revocation, ...]:
    out: list[Revocation] = []
    for name in _names(documents, REVOCATIONS_DIR):
        nation, revocations = verify_revocations(documents[name], root)
        _check_stem(name, REVOCATIONS_DIR, nation, "nation")
        for revocation in revocations:
            # An entry for another nation's node has no effect (Revocation.applies_to): refusing
            # the bundle would let one nation block another's node for good (a revocation may
            # not be dropped), by listing a node id before its nation certifies it.
            out.append(revocation)
    return tuple(out)


def _names(documents: Mapping[str, SignedDocument], prefix: str) -> list[str]:
    return sorted(name for name in documents if name.startswith(prefix))


def _check_stem(name: str, prefix: str, declared: str, key: str) -> None:
    """A file must be named after what it declares, so a reviewer reading the directory is not
    misled (and two files cannot declare the same thing)."""
    if name != f"{prefix}{declared}.toml":
        raise PolicyDocumentError(f"field '{key}': {declared!r} does not match the file name",
                                  document=name)


def _schemes(documents: Mapping[str, SignedDocument], root: TrustRoot) -> dict[str, Scheme]:
    """The common scheme first (national equivalences point into it), then the national ones."""
    common_name = f"{SCHEMES_DIR}{root.common_scheme}.toml"
    if common_name not in documents:
        raise PolicyDocumentError(
            f"the common scheme {root.common_scheme} named by the trust root is missing",
            document=common_name)
    common = verify_common_scheme(documents[common_name], root)
    schemes = {common.name: common}
    for name in _names(documents, SCHEMES_DIR):
        if name == common_name:
            continue
        scheme = verify_national_scheme(documents[name], root, common)
        _check_stem(name, SCHEMES_DIR, scheme.name, "scheme")
        schemes[scheme.name] = scheme
    return schemes


def _nodes(documents: Mapping[str, SignedDocument], root: TrustRoot,
           schemes: Mapping[str, Scheme]) -> dict[str, NodeCert]:
    nodes: dict[str, NodeCert] = {}
    for name in _names(documents, NODES_DIR):
        cert = verify_node_cert(documents[name], root)
        if cert.node in nodes:
            raise PolicyDocumentError(f"a second certificate for node {cert.node}", document=name)
        scheme = schemes.get(cert.nation)
        if scheme is None:
            raise PolicyDocumentError(
                f"field 'accreditation': nation {cert.nation} has no scheme in the bundle",
                document=name)
        check_accreditation(cert, scheme, name)
        nodes[cert.node] = cert
    return nodes


def bundle_content(bundle: Bundle) -> bytes:
    """Every document of ``bundle`` with its signatures, as one canonical msgpack map
    ``{name: SignedDocument bytes}``: what the audit log keeps so a bundle can be rebuilt."""
    return canonical.encode({name: doc.to_bytes() for name, doc in bundle.documents.items()})


def documents_from_content(content: bytes) -> dict[str, SignedDocument]:
    """Inverse of :func:`bundle_content` (verify them with :func:`build_bundle`)."""
    try:
        value = canonical.decode(content, max_bytes=256 << 20)
    except ProtocolError as exc:
        raise PolicyDocumentError(f"bundle content: {exc.reason}") from exc
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, bytes) for k, v in value.items()):
        raise PolicyDocumentError("bundle content must be {name: signed document bytes}")
    documents = {name: SignedDocument.from_bytes(data) for name, data in value.items()}
    for name, doc in documents.items():
        if doc.name != name:
            raise PolicyDocumentError("named differently inside its content", document=name)
    return documents
