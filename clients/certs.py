"""The node certificates a gateway has verified, including the ones a rotation replaced.

A nation rotates a node's key by issuing a certificate with a higher ``serial``. Messages the
node signed before the switch may still be queued for an offline recipient; the broker accepted
them under the old key. A recipient therefore keeps a replaced certificate and accepts it for an
envelope created before its replacement became valid (``ts < new.not_before``), and for nothing
later: an envelope signed with the old key after the switch is refused.

The directory comes from the broker, which is not trusted: every certificate in it is signed
by its nation, but a broker could serve an older one, still within its validity, that its
nation has since replaced (say, after the old key leaked). So the book never steps back: a
certificate with a lower serial than the highest it ever took for the node, the same serial
with other contents, or another nation is refused (the rule brokers apply between bundles,
:func:`policies.revocations.cert_step_back`). Those highest certificates are the book's
*floor*; with a state directory, :class:`CertFloorFile` keeps it across restarts.

:class:`CertBook` is pure; :class:`CertFloorFile` does the file I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import structlog

from broker import canonical
from broker.errors import BrokerError, PolicyDocumentError, StorageError
from clients.dedup import StateReadFailed, StateWriteFailed
from clients.values import RoutePlan
from clients.witness import write_atomically
from policies.documents import SignedDocument, verify_node_cert
from policies.model import Label, NodeCert, TrustRoot
from policies.revocations import cert_step_back

log = structlog.get_logger("clients.certs")

#: Replaced certificates kept per node (enough for several rotations in a backlog).
MAX_RETIRED = 4

FLOOR_FILE = "cert-floor.msgpack"


class CertBook:
    """Current certificates by node id, the ones they replaced, and the floor."""

    def __init__(self, floor: Iterable[NodeCert] = ()) -> None:
        """``floor``: the highest certificate taken per node before (from a state file)."""
        self.current: dict[str, NodeCert] = {}
        self._retired: dict[str, list[tuple[NodeCert, int]]] = {}
        self._floor: dict[str, NodeCert] = {cert.node: cert for cert in floor}

    @property
    def floor(self) -> Mapping[str, NodeCert]:
        """The highest certificate ever taken per node, also of nodes no longer listed."""
        return self._floor

    def update(self, certs: Mapping[str, NodeCert]) -> list[str]:
        """Take a freshly verified directory; return why certificates in it were refused.

        A certificate replaced by one with a higher serial is retired until ``not_before`` of
        its successor; one that would step back from the floor is refused (the one held, if
        any, stays); anything else not listed is dropped (revoked or removed: never trusted
        again)."""
        refused = []
        taken: dict[str, NodeCert] = {}
        for node, new in certs.items():
            floor = self._floor.get(node)
            problem = None if floor is None or floor == new else cert_step_back(floor, new)
            if problem is not None:
                refused.append(problem)
                if node in self.current:
                    taken[node] = self.current[node]
                continue
            old = self.current.get(node)
            if old is not None and old != new:  # a step forward (checked above): retire it
                retired = self._retired.setdefault(node, [])
                retired.append((old, new.not_before))
                del retired[:-MAX_RETIRED]
            taken[node] = self._floor[node] = new
        for node in set(self._retired) - set(taken):
            del self._retired[node]
        self.current = taken
        return refused

    def get(self, node: str) -> NodeCert | None:
        """The current certificate of ``node``."""
        return self.current.get(node)

    def __contains__(self, node: object) -> bool:
        return node in self.current

    def for_envelope(self, node: str, ts: int) -> Iterator[NodeCert]:
        """The certificates that may have signed an envelope of ``node`` created at ``ts``:
        the current one, then replaced ones whose successor was not yet valid at ``ts``."""
        cert = self.current.get(node)
        if cert is None:
            return
        yield cert
        for old, until in reversed(self._retired.get(node, [])):
            if ts < until:
                yield old


class CertFloorFile:
    """The floor of a :class:`CertBook` in ``directory``: the certificates' signed documents,
    as one canonical msgpack array, replaced atomically when the floor changes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / FLOOR_FILE
        #: The signed documents the file holds (by node), as last read or written.
        self._saved: dict[str, bytes] = {}

    def load(self, trust_root: TrustRoot) -> list[NodeCert]:
        """The certificates kept, each verified again against ``trust_root``; one that no
        longer verifies (its nation's key was replaced since) is left out, with a warning."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateReadFailed(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            documents = canonical.decode(data)
        except BrokerError as exc:
            raise StateReadFailed(f"cannot read {self.path}: {exc.reason}") from exc
        if not isinstance(documents, list) or not all(type(d) is bytes for d in documents):
            raise StateReadFailed(f"{self.path} is not an array of certificates")
        floor = []
        for raw in documents:
            try:
                floor.append(verify_node_cert(SignedDocument.from_bytes(raw), trust_root))
            except BrokerError as exc:
                log.warning("cert_floor_entry_dropped", path=str(self.path), reason=exc.reason)
        self._saved = {cert.node: cert.signed for cert in floor}
        return floor

    def save(self, floor: Mapping[str, NodeCert]) -> None:
        """Replace the file with ``floor``; raise :class:`StateWriteFailed` if it cannot be."""
        documents = {node: cert.signed for node, cert in floor.items()}
        try:
            write_atomically(self.path, canonical.encode(sorted(documents.values())))
        except StorageError as exc:
            raise StateWriteFailed(exc.reason) from exc
        self._saved = documents

    def save_if_changed(self, floor: Mapping[str, NodeCert]) -> None:
        """:meth:`save` unless the file already holds exactly these signed documents. Compared
        by bytes, not certificate fields: a certificate re-signed unchanged (after its nation
        rotated its authority key) must replace the old signature, which will stop verifying.
        A save that failed is tried again on the next call."""
        if {node: cert.signed for node, cert in floor.items()} != self._saved:
            self.save(floor)


def certs_from_directory(raws: Iterable[bytes], trust_root: TrustRoot,
                         now_ms: int) -> dict[str, NodeCert]:
    """The certificates of a broker's ``directory`` answer that verify against the trust root
    and are valid at ``now_ms``, by node; the others are logged and left out, and so are both
    of two different certificates for one node id (say, one nation certifying a name another
    nation uses): trust neither rather than guess."""
    certs: dict[str, NodeCert] = {}
    duplicated: set[str] = set()
    for raw in raws:
        try:
            cert = verify_node_cert(SignedDocument.from_bytes(raw), trust_root)
        except PolicyDocumentError as exc:
            log.error("directory_cert_rejected", reason=exc.reason)
            continue
        if not cert.is_valid_at(now_ms):
            continue
        if cert.node in certs and certs[cert.node] != cert:
            duplicated.add(cert.node)
        certs[cert.node] = cert
    for node in duplicated:
        log.error("directory_conflicting_certs", node=node)
        del certs[node]
    return certs


def recipient_keys(plan: RoutePlan, label: Label, book: CertBook, trust_root: TrustRoot,
                   now_ms: int) -> dict[str, bytes]:
    """Encryption keys for the recipients the broker permitted, from verified certificates
    only (valid now), and only for nations in the label's own audience, whatever the broker's
    answer says; a key the broker gave that differs from the certificate's is logged, and the
    certificate's used."""
    audience = trust_root.expand_audience(label.rel) | {label.orig}
    keys = {}
    for node in plan.permitted:
        cert = book.get(node)
        if cert is None or not cert.is_valid_at(now_ms):  # kept over a rollback, expired since
            log.warning("recipient_without_certificate", node=node)
            continue
        if cert.nation not in audience:
            log.error("broker_permitted_outside_audience", node=node, nation=cert.nation)
            continue
        if plan.keys.get(node) != cert.enc_key:
            log.error("broker_key_mismatch", node=node)
        keys[node] = cert.enc_key
    return keys
