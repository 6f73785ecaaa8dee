"""The node certificates a gateway has verified, including the ones a rotation replaced.

A nation rotates a node's key by issuing a certificate with a higher ``serial``. Messages the
node signed before the switch may still be queued for an offline recipient; the broker accepted
them under the old key. A recipient therefore keeps a replaced certificate and accepts it for an
envelope created before its replacement became valid (``ts < new.not_before``), and for nothing
later: an envelope signed with the old key after the switch is refused.

The directory comes from the broker, which is not trusted: every certificate in it is signed
by its nation, but a broker could serve an older one, still within its validity, that its
nation has since replaced (say, after the old key leaked). So the book never steps back: a
certificate with a lower serial than the one it holds, the same serial with other contents, or
another nation for the node is refused, and the one held stays (the rule brokers apply between
bundles, :func:`policies.revocations.cert_step_back`). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from policies.model import NodeCert
from policies.revocations import cert_step_back

#: Replaced certificates kept per node (enough for several rotations in a backlog).
MAX_RETIRED = 4


class CertBook:
    """Current certificates by node id, and the ones they replaced."""

    def __init__(self) -> None:
        self.current: dict[str, NodeCert] = {}
        self._retired: dict[str, list[tuple[NodeCert, int]]] = {}

    def update(self, certs: Mapping[str, NodeCert]) -> list[str]:
        """Take a freshly verified directory; return why certificates in it were refused.

        A certificate replaced by one with a higher serial is retired until ``not_before`` of
        its successor; one that would step back is refused and the one held is kept; anything
        else not listed is dropped (revoked or removed: never trusted again)."""
        refused = []
        taken = dict(certs)
        for node, new in certs.items():
            old = self.current.get(node)
            if old is None or old == new:
                continue
            problem = cert_step_back(old, new)
            if problem is not None:
                refused.append(problem)
                taken[node] = old
            elif old.serial < new.serial:
                retired = self._retired.setdefault(node, [])
                retired.append((old, new.not_before))
                del retired[:-MAX_RETIRED]
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
