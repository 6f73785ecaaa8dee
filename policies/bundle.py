"""A policy bundle: the set of signed documents in force, verified as one unit.

A bundle is built from document bytes (``{relative path: SignedDocument}``) in one go; any
document that fails refuses the whole bundle, so the broker never runs on half a policy. Its
``hash`` (SHA-256 over the sorted SHA-256 digests of the documents' bytes) is the policy version
logged with every decision. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

from broker.errors import PolicyDocumentError
from policies.documents import SignedDocument, verify_node_cert, verify_trust_root
from policies.model import NodeCert, TrustRoot

TRUST_ROOT = "trust-root.toml"
NODES_DIR = "nodes/"


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Verified documents in force, with their content hash."""

    trust_root: TrustRoot
    nodes: Mapping[str, NodeCert]
    documents: Mapping[str, SignedDocument]
    hash: bytes

    def nation_of(self, node: str) -> str | None:
        """The nation of a known node, else ``None``."""
        cert = self.nodes.get(node)
        return cert.nation if cert else None


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
    nodes: dict[str, NodeCert] = {}
    for name in sorted(documents):
        if name == TRUST_ROOT:
            continue
        if not name.startswith(NODES_DIR):
            raise PolicyDocumentError("unknown kind of document", document=name)
        cert = verify_node_cert(documents[name], root)
        if cert.node in nodes:
            raise PolicyDocumentError(f"a second certificate for node {cert.node}", document=name)
        nodes[cert.node] = cert
    return Bundle(trust_root=root, nodes=nodes, documents=dict(documents),
                  hash=bundle_hash(documents))
