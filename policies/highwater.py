"""The highest of every document any bundle in force ever held: what a new bundle may not go
below, even where the bundle in force no longer has the document. Pure: no I/O.

:func:`policies.bundle.check_succession` compares a new bundle with the one in force. A document
*removed* in one reload (a node with its certificate, an agreement, a nation's scheme) is then
no longer compared, and the same document in an older, validly signed copy could come back in a
later reload. :class:`HighWater` remembers, across every bundle ever activated, each node's
highest certificate serial, every revocation, and each agreement's, each scheme's and the trust
root's highest version, each with the document bytes seen at that height;
:meth:`HighWater.problems` applies the succession rules against those. The broker folds in every
bundle it stored (``Hub.restore``) and each one it activates.

The marks are stored with the bundles (:meth:`HighWater.to_bytes`, written in the same commit as
each activation), so a start reads them instead of verifying every bundle ever stored again
(~0.4 s each at 100 nations). A store written before they were stored has them rebuilt from its
bundles once.

Several texts at one height (stored before a changed document had to raise its version) are all
remembered and all allowed: the marks are built from the stored bundles in no particular order,
and refusing the one in force at the next reload would be worse than the history it keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, cast

import msgpack

from broker.errors import PolicyDocumentError
from policies.bundle import (
    AGREEMENTS_DIR,
    SCHEMES_DIR,
    TRUST_ROOT,
    Bundle,
    check_succession,
    document_text,
    kept_revocations,
)
from policies.model import Revocation
from policies.revocations import document_bytes


@dataclasses.dataclass(frozen=True)
class Mark:
    """A document's highest version (a certificate's serial) and the texts seen at it (empty:
    not known, e.g. a bundle built without its documents; then any text is allowed)."""

    version: int
    texts: frozenset[bytes] = frozenset()

    def raised_by(self, version: int, text: bytes | None) -> Mark:
        """This mark after a document at ``version`` with ``text`` was in force."""
        texts = frozenset() if text is None else frozenset((text,))
        if version > self.version:
            return Mark(version, texts)
        if version == self.version:
            return Mark(version, self.texts | texts)
        return self

    def to_list(self) -> list[Any]:
        return [self.version, sorted(self.texts)]

    @classmethod
    def from_list(cls, value: object) -> Mark:
        match value:
            case [int(version), list(texts)] if (type(version) is int
                                                  and all(type(t) is bytes for t in texts)):
                return cls(version, frozenset(texts))
        raise ValueError(f"not a mark: {_short(value)}")

    def step_back(self, what: str, version: int, text: bytes | None,
                  noun: str = "version") -> str | None:
        """Why ``what`` at ``version`` with ``text`` goes below this mark (``None``: it does
        not); ``noun`` names the version in the reason."""
        if version < self.version:
            return f"{what}: {noun} {version} is lower than {self.version}, in force before"
        if (version == self.version and text is not None and self.texts
                and text not in self.texts):
            return f"{what} differs from the one in force before at the same {noun} {version}"
        return None


@dataclasses.dataclass(frozen=True)
class HighWater:
    """See the module docstring. Build with :meth:`of`, grow with :meth:`merge`."""

    #: Per node: its nation and the mark of its certificate serial.
    nodes: Mapping[str, tuple[str, Mark]] = dataclasses.field(default_factory=dict)
    revocations: Mapping[tuple[str, str, bytes], Revocation] = dataclasses.field(
        default_factory=dict)
    agreements: Mapping[str, Mark] = dataclasses.field(default_factory=dict)
    schemes: Mapping[str, Mark] = dataclasses.field(default_factory=dict)
    root: Mark | None = None
    #: The hashes of the bundles folded in: a start folds in the stored bundles not among
    #: them (stored by a broker that did not store the marks).
    bundles: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, bundles: Iterable[Bundle]) -> HighWater:
        """The high-water marks of ``bundles`` (in any order)."""
        marks = cls()
        for bundle in bundles:
            marks = marks.merge(bundle)
        return marks

    def merge(self, bundle: Bundle) -> HighWater:
        """These marks raised by what ``bundle`` holds."""
        nodes = dict(self.nodes)
        for name, cert in bundle.nodes.items():
            nation, mark = nodes.get(name, (cert.nation, Mark(0)))
            nodes[name] = nation, mark.raised_by(cert.serial, document_bytes(cert))
        revocations = dict(self.revocations)
        for r in bundle.revocations:
            revocations.setdefault((r.nation, r.node, r.sign_key), r)
        agreements = dict(self.agreements)
        for a in bundle.agreements:
            agreements[a.id] = agreements.get(a.id, Mark(0)).raised_by(
                a.version, document_text(bundle, f"{AGREEMENTS_DIR}{a.id}.toml"))
        schemes = dict(self.schemes)
        for name, scheme in bundle.schemes.items():
            schemes[name] = schemes.get(name, Mark(0)).raised_by(
                scheme.version, document_text(bundle, f"{SCHEMES_DIR}{name}.toml"))
        root = (self.root or Mark(0)).raised_by(bundle.trust_root.version,
                                                document_text(bundle, TRUST_ROOT))
        return HighWater(nodes=nodes, revocations=revocations, agreements=agreements,
                         schemes=schemes, root=root, bundles=self.bundles | {bundle.hash})

    def problems(self, new: Bundle) -> list[str]:
        """Every way ``new`` goes below these marks (empty: it does not)."""
        problems = []
        for name, cert in sorted(new.nodes.items()):
            if name in self.nodes:
                nation, mark = self.nodes[name]
                if cert.nation != nation:
                    problems.append(f"node {name}: certified by {cert.nation}, but by {nation} "
                                    "before (a node id does not change nation)")
                problems.append(mark.step_back(f"node {name}", cert.serial,
                                               document_bytes(cert), "certificate serial") or "")
        kept = {(r.nation, r.node, r.sign_key) for r in new.revocations}
        problems += [f"revocation of {r.node} by {r.nation} was dropped (revocations are "
                     "permanent)" for r in kept_revocations(self.revocations.values(), new)
                     if (r.nation, r.node, r.sign_key) not in kept]
        for a in new.agreements:
            if a.id in self.agreements:
                problems.append(self.agreements[a.id].step_back(
                    f"agreement {a.id}", a.version,
                    document_text(new, f"{AGREEMENTS_DIR}{a.id}.toml")) or "")
        for name, scheme in sorted(new.schemes.items()):
            if name in self.schemes:
                problems.append(self.schemes[name].step_back(
                    f"scheme {name}", scheme.version,
                    document_text(new, f"{SCHEMES_DIR}{name}.toml")) or "")
        if self.root is not None:
            problems.append(self.root.step_back("trust root", new.trust_root.version,
                                                document_text(new, TRUST_ROOT)) or "")
        return [problem for problem in problems if problem]

    def to_bytes(self) -> bytes:
        """The marks as msgpack (a map of lists, sorted: equal marks give equal bytes)."""
        data: bytes = msgpack.packb({
            "format": _FORMAT,
            "nodes": [[name, nation, *mark.to_list()]
                      for name, (nation, mark) in sorted(self.nodes.items())],
            "revocations": [[r.nation, r.node, r.sign_key, r.reason, r.revoked_at]
                            for _, r in sorted(self.revocations.items())],
            "agreements": [[name, *m.to_list()] for name, m in sorted(self.agreements.items())],
            "schemes": [[name, *m.to_list()] for name, m in sorted(self.schemes.items())],
            "root": None if self.root is None else self.root.to_list(),
            "bundles": sorted(self.bundles),
        })
        return data

    @classmethod
    def from_bytes(cls, data: bytes) -> HighWater:
        """The marks :meth:`to_bytes` wrote; ``ValueError`` for anything else."""
        try:
            value = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"not msgpack: {exc}") from exc
        found = value.get("format") if isinstance(value, dict) else None
        if type(found) is int and found > _FORMAT:
            raise ValueError(f"format {found}, written by a newer broker (this one reads "
                             f"{_FORMAT})")
        if type(found) is int and found == 1 and set(value) == _KEYS - {"bundles"}:
            value["bundles"] = []  # format 1 named no bundles: a start folds in all of them
        elif not (found == _FORMAT and type(found) is int and set(value) == _KEYS):
            raise ValueError(f"not high-water marks of format {_FORMAT}")
        nodes: dict[str, tuple[str, Mark]] = {}
        for row in _rows(value["nodes"]):
            match row:
                case [str(name), str(nation), version, texts] if name not in nodes:
                    nodes[name] = nation, Mark.from_list([version, texts])
                case _:
                    raise ValueError(f"not a node mark, or twice: {_short(row)}")
        revocations = {}
        for row in _rows(value["revocations"]):
            match row:
                case [str(nation), str(node), bytes(key), str(reason), int(at)] if (
                        type(at) is int and (nation, node, key) not in revocations):
                    revocations[(nation, node, key)] = Revocation(nation, node, key, reason, at)
                case _:
                    raise ValueError(f"not a revocation, or twice: {_short(row)}")
        bundles = _rows(value["bundles"])
        if (not all(type(b) is bytes and len(b) == 32 for b in bundles)
                or len(set(bundles)) != len(bundles)):
            raise ValueError("not a list of distinct bundle hashes")
        return cls(nodes=nodes, revocations=revocations,
                   agreements=_named_marks(value["agreements"]),
                   schemes=_named_marks(value["schemes"]),
                   root=None if value["root"] is None else Mark.from_list(value["root"]),
                   bundles=frozenset(cast(list[bytes], bundles)))

    def check_successor(self, in_force: Bundle | None, new: Bundle) -> None:
        """The rule for a bundle put in force, the one place it is written down: ``new``
        follows ``in_force`` (:func:`check_succession`, when that is another bundle) and goes
        below none of these marks. Raises ``PolicyDocumentError`` (``rollback``)."""
        if in_force is not None and in_force.hash != new.hash:
            check_succession(in_force, new)
        self.check(new)

    def check(self, new: Bundle) -> None:
        """Raise ``PolicyDocumentError`` (``rollback``) if ``new`` goes below these marks."""
        problems = self.problems(new)
        if problems:
            raise PolicyDocumentError("goes back to documents older than ones in force before: "
                                      + "; ".join(problems), code="rollback")


#: Raised when the encoding changes (a broker then reads the formats before its own too).
#: 2: the hashes of the bundles folded in (format 1 had none, and is read as covering none).
_FORMAT = 2
_KEYS = {"format", "nodes", "revocations", "agreements", "schemes", "root", "bundles"}


def _rows(value: object) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"not a list: {_short(value)}")
    return value


def _named_marks(value: object) -> dict[str, Mark]:
    marks: dict[str, Mark] = {}
    for row in _rows(value):
        match row:
            case [str(name), version, texts] if name not in marks:
                marks[name] = Mark.from_list([version, texts])
            case _:
                raise ValueError(f"not a named mark, or twice: {_short(row)}")
    return marks


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
