"""The highest of every document any bundle in force ever held: what a new bundle may not go
below, even where the bundle in force no longer has the document. Pure: no I/O.

:func:`policies.bundle.check_succession` compares a new bundle with the one in force. A document
*removed* in one reload (a node with its certificate, an agreement, a nation's scheme) is then
no longer compared, and the same document in an older, validly signed copy could come back in a
later reload. :class:`HighWater` remembers, across every bundle ever activated, each node's
certificate with the highest serial, every revocation, and each agreement's, each scheme's and
the trust root's highest version with its bytes; :meth:`HighWater.problems`
applies the same rules as the succession check against those. The broker folds in every bundle
it stored (``Hub.restore``) and each one it activates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from broker.errors import PolicyDocumentError
from policies.bundle import AGREEMENTS_DIR, SCHEMES_DIR, TRUST_ROOT, Bundle
from policies.model import NodeCert, Revocation
from policies.revocations import succession_problems

#: A version and the document bytes that carried it (``None``: not known, e.g. a bundle built
#: without its documents).
Versioned = tuple[int, bytes | None]


@dataclasses.dataclass(frozen=True)
class HighWater:
    """See the module docstring. Build with :meth:`of`, grow with :meth:`merge`."""

    nodes: Mapping[str, NodeCert] = dataclasses.field(default_factory=dict)
    revocations: Mapping[tuple[str, str, bytes], Revocation] = dataclasses.field(
        default_factory=dict)
    agreements: Mapping[str, Versioned] = dataclasses.field(default_factory=dict)
    schemes: Mapping[str, Versioned] = dataclasses.field(default_factory=dict)
    root: Versioned | None = None

    @classmethod
    def of(cls, bundles: list[Bundle]) -> HighWater:
        """The high-water marks of ``bundles`` (in any order)."""
        marks = cls()
        for bundle in bundles:
            marks = marks.merge(bundle)
        return marks

    def merge(self, bundle: Bundle) -> HighWater:
        """These marks raised by what ``bundle`` holds."""
        nodes = dict(self.nodes)
        for name, cert in bundle.nodes.items():
            if name not in nodes or cert.serial > nodes[name].serial:
                nodes[name] = cert
        revocations = dict(self.revocations)
        for r in bundle.revocations:
            revocations.setdefault((r.nation, r.node, r.sign_key), r)
        agreements = dict(self.agreements)
        for a in bundle.agreements:
            if a.id not in agreements or a.version > agreements[a.id][0]:
                agreements[a.id] = (a.version, _bytes(bundle, f"{AGREEMENTS_DIR}{a.id}.toml"))
        schemes = dict(self.schemes)
        for name, scheme in bundle.schemes.items():
            if name not in schemes or scheme.version > schemes[name][0]:
                schemes[name] = (scheme.version, _bytes(bundle, f"{SCHEMES_DIR}{name}.toml"))
        root = self.root
        if root is None or bundle.trust_root.version > root[0]:
            root = (bundle.trust_root.version, _bytes(bundle, TRUST_ROOT))
        return HighWater(nodes=nodes, revocations=revocations, agreements=agreements,
                         schemes=schemes, root=root)

    def problems(self, new: Bundle) -> list[str]:
        """Every way ``new`` goes below these marks (empty: it does not)."""
        problems = succession_problems(
            old_nodes=self.nodes, new_nodes=new.nodes,
            old_revocations=tuple(self.revocations.values()), new_revocations=new.revocations,
            old_agreements=(), new_agreements=())
        versioned = [(f"agreement {a.id}", self.agreements.get(a.id),
                      (a.version, _bytes(new, f"{AGREEMENTS_DIR}{a.id}.toml")))
                     for a in new.agreements]
        versioned += [(f"scheme {name}", self.schemes.get(name),
                       (scheme.version, _bytes(new, f"{SCHEMES_DIR}{name}.toml")))
                      for name, scheme in sorted(new.schemes.items())]
        for what, mark, now in versioned:
            problem = None if mark is None else _step_back(what, mark, now)
            if problem is not None:
                problems.append(problem)
        if self.root is not None:
            problem = _step_back("trust root", self.root,
                                 (new.trust_root.version, _bytes(new, TRUST_ROOT)))
            if problem is not None:
                problems.append(problem)
        return problems

    def check(self, new: Bundle) -> None:
        """Raise ``PolicyDocumentError`` (``rollback``) if ``new`` goes below these marks."""
        problems = self.problems(new)
        if problems:
            raise PolicyDocumentError("goes back to documents older than ones in force before: "
                                      + "; ".join(dict.fromkeys(problems)), code="rollback")


def _step_back(what: str, mark: Versioned, new: Versioned) -> str | None:
    (high, high_bytes), (version, data) = mark, new
    if version < high:
        return f"{what}: version {version} is lower than {high}, in force before"
    if version == high and None not in (data, high_bytes) and data != high_bytes:
        return f"{what} differs from the one in force before at the same version {version}"
    return None


def _bytes(bundle: Bundle, name: str) -> bytes | None:
    doc = bundle.documents.get(name)
    return doc.data if doc is not None else None
