"""Frozen model of the policy world: labels, accreditations, node certificates, the trust root.

Objects validate their own structure when built from maps or documents; *semantic* checks that
need other documents (is this level known in that scheme?) belong to :mod:`policies.decide`.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping
from typing import Any

from broker import canonical
from broker.canonical import is_sorted_unique
from broker.errors import ProtocolError

_LABEL_KEYS = frozenset({"policy", "class", "cats", "rel", "orig"})


def _frozen_cats(value: Any, where: str, code: str) -> Mapping[str, tuple[str, ...]]:
    """Check a ``{tag: [values]}`` map whose value lists are canonical sets."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a map of tag to values", code=code)
    out: dict[str, tuple[str, ...]] = {}
    for tag, values in value.items():
        if not isinstance(tag, str) or not tag:
            raise ProtocolError(f"{where}: tag names must be non-empty str", code=code)
        out[tag] = _frozen_set(values, f"{where}.{tag}", code)
    return out


def _frozen_set(value: Any, where: str, code: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ProtocolError(f"{where} must be an array of non-empty str", code=code)
    if not is_sorted_unique(value):
        raise ProtocolError(f"{where} must be sorted and unique", code=code)
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Label:
    """The security label carried (signed, and bound to the ciphertext) by every envelope.

    ``policy`` names the scheme (the sender's national scheme or the common one), ``cls`` the
    classification level in it, ``cats`` the category tags and their values, ``rel`` the audience
    (nations and communities of interest), ``orig`` the originating nation.
    """

    policy: str
    cls: str
    cats: Mapping[str, tuple[str, ...]]
    rel: tuple[str, ...]
    orig: str

    @functools.cached_property
    def canonical_map(self) -> dict[str, Any]:
        """:meth:`to_map` in canonical order (computed once per label object; not to be
        mutated), for :func:`broker.canonical.encode_ordered`."""
        normalised: dict[str, Any] = canonical.normalised(self.to_map())
        return normalised

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of the label's canonical encoding (computed once per label object)."""
        return hashlib.sha256(canonical.encode_ordered(self.canonical_map)).digest()

    @classmethod
    def from_map(cls, value: Any) -> Label:
        """Build from the wire map; raise :class:`ProtocolError` ``invalid_label`` if malformed."""
        code = "invalid_label"
        if not isinstance(value, dict):
            raise ProtocolError("label must be a map", code=code)
        unknown = set(value) - _LABEL_KEYS
        if unknown:
            raise ProtocolError(f"label has unknown field(s) {sorted(unknown)}", code=code)
        for key in ("policy", "class", "orig"):
            if not isinstance(value.get(key), str) or not value[key]:
                raise ProtocolError(f"label.{key} must be a non-empty str", code=code)
        if "rel" not in value:
            raise ProtocolError("label.rel is missing", code=code)
        return cls(
            policy=value["policy"],
            cls=value["class"],
            cats=_frozen_cats(value.get("cats", {}), "label.cats", code),
            rel=_frozen_set(value["rel"], "label.rel", code),
            orig=value["orig"],
        )

    @classmethod
    def from_canonical_map(cls, value: Any) -> Label:
        """:meth:`from_map` for a map decoded from canonical bytes (an envelope's label). When
        it has all five fields it is already the label's canonical map, kept as such (not to
        be mutated), so the label is not normalised again per envelope."""
        label = cls.from_map(value)
        if len(value) == len(_LABEL_KEYS):
            label.__dict__["canonical_map"] = value  # what functools.cached_property would set
        return label

    def to_map(self) -> dict[str, Any]:
        """The wire map (all five fields; sets as sorted arrays)."""
        return {
            "policy": self.policy,
            "class": self.cls,
            "cats": {tag: list(values) for tag, values in self.cats.items()},
            "rel": list(self.rel),
            "orig": self.orig,
        }


@dataclasses.dataclass(frozen=True)
class Accreditation:
    """What a node may hold: a maximum level (in its nation's scheme) and category values."""

    max: str
    cats: Mapping[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class NodeCert:
    """A gateway node's certificate, signed by its nation's policy authority.

    Times are Unix milliseconds; the window is ``not_before`` inclusive, ``not_after`` exclusive.
    ``serial`` orders a node's successive certificates (key rotation): a broker never goes back
    to a lower one. ``signed`` is the certificate as served in the ``directory`` frame
    (document + signatures).
    """

    node: str
    nation: str
    sign_key: bytes
    enc_key: bytes
    not_before: int
    not_after: int
    accreditation: Accreditation
    signed: bytes = dataclasses.field(default=b"", compare=False, repr=False)
    serial: int = 1

    def is_valid_at(self, now_ms: int) -> bool:
        """True inside the validity window."""
        return self.not_before <= now_ms < self.not_after


@dataclasses.dataclass(frozen=True)
class Revocation:
    """A nation withdrew one of its node certificates (the one with ``sign_key``), for good."""

    nation: str
    node: str
    sign_key: bytes
    reason: str
    revoked_at: int

    def applies_to(self, cert: NodeCert) -> bool:
        """True for the revoked certificate: same nation, node and signing key (a nation can
        only revoke its own nodes' certificates)."""
        return (cert.nation, cert.node, cert.sign_key) == (self.nation, self.node, self.sign_key)


@dataclasses.dataclass(frozen=True)
class Nation:
    """A coalition member: its code and the Ed25519 keys of its policy authority."""

    code: str
    authority_keys: tuple[bytes, ...]


@dataclasses.dataclass(frozen=True)
class BrokerIdentity:
    """A broker the nations recognise: its name and Ed25519 checkpoint-signing key."""

    name: str
    key: bytes


@dataclasses.dataclass(frozen=True)
class TrustRoot:
    """The root of trust, signed by ``threshold`` of the nations it lists (like a TUF root)."""

    version: int
    common_scheme: str
    threshold: int
    witness_quorum: int
    nations: Mapping[str, Nation]
    communities: Mapping[str, tuple[str, ...]]
    brokers: tuple[BrokerIdentity, ...]

    def expand_audience(self, rel: tuple[str, ...]) -> frozenset[str]:
        """Nations named in ``rel``, with communities of interest expanded.

        Names that are neither a nation nor a community contribute nothing (fail closed).
        """
        out: set[str] = set()
        for name in rel:
            if name in self.communities:
                out.update(self.communities[name])
            elif name in self.nations:
                out.add(name)
        return frozenset(out)


# --- schemes and agreements -------------------------------------------------------------------

RESTRICTIVE = "restrictive"
PERMISSIVE = "permissive"
INFORMATIVE = "informative"
TAG_TYPES = (RESTRICTIVE, PERMISSIVE, INFORMATIVE)


@dataclasses.dataclass(frozen=True)
class Tag:
    """A category tag of a scheme.

    ``restrictive``: a holder needs *every* value on the label; ``permissive``: a holder needs
    *at least one*; ``informative``: never decides release.
    """

    name: str
    type: str
    values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A classification scheme: levels (low → high), tags, and the equivalence to the common one.

    ``level_map`` maps a level of this scheme to a level of the common scheme, ``tag_map`` a tag
    to a common tag, ``value_map[tag][value]`` a value to common values (of the mapped tag).
    Anything not listed is unmappable (deny). The common scheme itself has empty maps: it is its
    own identity (see :meth:`is_identity`).
    """

    name: str
    levels: tuple[str, ...]
    tags: Mapping[str, Tag]
    level_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tag_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    value_map: Mapping[str, Mapping[str, tuple[str, ...]]] = dataclasses.field(
        default_factory=dict)
    identity: bool = False
    #: Orders a scheme's successive documents: a broker never goes back to a lower version,
    #: and a changed scheme must raise it (:func:`policies.bundle.check_succession`).
    version: int = 1

    def rank(self, level: str) -> int | None:
        """Position of ``level`` (0 = lowest), or ``None`` when the scheme does not know it."""
        try:
            return self.levels.index(level)
        except ValueError:
            return None

    def common_level(self, level: str) -> str | None:
        """The common level ``level`` maps to, or ``None`` (unmappable)."""
        if self.identity:
            return level if level in self.levels else None
        return self.level_map.get(level)

    def common_tag(self, tag: str) -> str | None:
        """The common tag ``tag`` maps to, or ``None`` (unmappable)."""
        if self.identity:
            return tag if tag in self.tags else None
        return self.tag_map.get(tag)

    def common_values(self, tag: str, value: str) -> tuple[str, ...] | None:
        """The common values ``tag=value`` maps to, or ``None`` (unmappable)."""
        if self.identity:
            known = tag in self.tags and value in self.tags[tag].values
            return (value,) if known else None
        return self.value_map.get(tag, {}).get(value)


@dataclasses.dataclass(frozen=True)
class Tier:
    """A group of member nations of an agreement and what may be released to them.

    ``ceiling`` is a common level. ``categories`` (``None``: no restriction) is an allow-list
    per restrictive common tag; a tag it does not name is not restricted by it, and an empty list
    admits no value of that tag. ``topics`` (``None``: any topic) are subscription-style patterns.
    """

    name: str
    members: tuple[str, ...]
    ceiling: str
    categories: Mapping[str, tuple[str, ...]] | None = None
    topics: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Agreement:
    """A data-sharing agreement, signed by every party; active in ``[not_before, not_after)``."""

    id: str
    version: int
    purpose: str
    parties: tuple[str, ...]
    not_before: int
    not_after: int
    tiers: tuple[Tier, ...]

    @property
    def ref(self) -> str:
        """``ID@VERSION``, as decisions name it."""
        return f"{self.id}@{self.version}"

    def is_active_at(self, now_ms: int) -> bool:
        """True inside the validity window (``not_before`` inclusive, ``not_after`` exclusive)."""
        return self.not_before <= now_ms < self.not_after
