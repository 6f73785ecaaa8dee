"""The label catalogue: what a nation may release to another nation now, and under which tier.

For an origin nation O, a destination nation R, an instant and (optionally) a topic, the
catalogue lists every tier of an *active* agreement that has O as a party and R as a member,
with what that tier lets through: the highest common-scheme level and, per common category tag,
the values it admits. It also names the agreements that would cover the pair but are outside
their validity window, and summarises the ``best`` over the tiers that apply.

What a tier admits is derived by asking the rules of :mod:`policies.decide` (``tier_failures``
for the ceiling, the category allow-lists and a given topic; ``map_label`` for the national
scheme) rather than by re-interpreting the tier fields, so the catalogue follows the decision.

Reading it:

* An entry is exact: a label is admitted by that tier if and only if its common level is at or
  below the entry's ``level`` and each of its values is in the entry's ``categories``.
* ``best`` is the union over the applicable entries (any one agreement permits): its ``level``
  is the highest releasable level (for a label without category values), and its ``categories``
  are the values *some* tier admits. A label that combines values admitted by different tiers,
  or a high level with a value only a lower tier admits, is released only if one tier admits it
  all — check the entries for combinations.
* Without a topic, every active tier is listed with its topic patterns, but ``best`` counts only
  the tiers open to every topic, so it never overstates what can be sent on an arbitrary topic.
* Categories cover every common tag that can decide release (restrictive and permissive);
  informative tags never restrict release and are not listed. Agreements restrict nations; the
  receiving node's accreditation (DESIGN §5 rule 5) and the label's audience still apply.
* Within one nation (O = R) no agreement is needed: ``same_nation`` is set, there are no
  entries, and ``best`` is the whole common scheme.

Pure: no I/O, no clock (``now_ms`` is a parameter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from policies.bundle import Bundle
from policies.decide import (
    TOPIC_NOT_COVERED,
    CommonLabel,
    map_label,
    tier_failures,
)
from policies.model import INFORMATIVE, Agreement, Label, Scheme, Tag, Tier

#: A topic no pattern needs to match: rule-4 probes below ignore topic failures anyway.
_NO_TOPIC = "catalogue.probe"


@dataclasses.dataclass(frozen=True)
class Releasable:
    """What may be released: a common level and the admitted values per common tag, and the
    same expressed in the origin nation's scheme where its equivalence allows.

    ``national_level`` is the highest level of ``national_scheme`` that maps at or below
    ``level`` (``None``: none does, or the origin has no scheme); ``national_categories`` lists,
    per national tag that can decide release, the values whose translation is admitted.
    """

    level: str
    categories: Mapping[str, tuple[str, ...]]
    national_scheme: str | None = None
    national_level: str | None = None
    national_categories: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        """A canonical-msgpack-friendly map (str keys, sorted lists, absent instead of nil)."""
        out: dict[str, Any] = {
            "level": self.level,
            "categories": _sorted_cats(self.categories),
            "national_categories": _sorted_cats(self.national_categories),
        }
        if self.national_scheme is not None:
            out["national_scheme"] = self.national_scheme
        if self.national_level is not None:
            out["national_level"] = self.national_level
        return out


@dataclasses.dataclass(frozen=True)
class CatalogueEntry:
    """One tier of one active agreement that covers the pair, and what it lets through.

    ``topics`` is ``None`` when the tier is open to every topic.
    """

    agreement: str
    tier: str
    not_before: int
    not_after: int
    topics: tuple[str, ...] | None
    releasable: Releasable

    @property
    def via(self) -> str:
        """``ID@VERSION/TIER``, as a PERMIT names it."""
        return f"{self.agreement}/{self.tier}"

    def to_map(self) -> dict[str, Any]:
        """A canonical-msgpack-friendly map."""
        out: dict[str, Any] = {
            "agreement": self.agreement,
            "tier": self.tier,
            "via": self.via,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "releasable": self.releasable.to_map(),
        }
        if self.topics is not None:
            out["topics"] = sorted(self.topics)
        return out


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """What ``origin`` may release to ``destination`` at ``at_ms`` under the bundle ``policy``
    (its hash, hex); see the module documentation for how to read ``best``."""

    origin: str
    destination: str
    at_ms: int
    topic: str | None
    policy: str
    common_scheme: str
    same_nation: bool
    entries: tuple[CatalogueEntry, ...]
    inactive: tuple[str, ...]
    best: Releasable | None

    def to_map(self) -> dict[str, Any]:
        """A canonical-msgpack-friendly map (entries in ``via`` order)."""
        out: dict[str, Any] = {
            "origin": self.origin,
            "destination": self.destination,
            "at_ms": self.at_ms,
            "policy": self.policy,
            "common_scheme": self.common_scheme,
            "same_nation": self.same_nation,
            "entries": [e.to_map() for e in sorted(self.entries, key=lambda e: e.via)],
            "inactive": sorted(self.inactive),
        }
        if self.topic is not None:
            out["topic"] = self.topic
        if self.best is not None:
            out["best"] = self.best.to_map()
        return out


def label_catalogue(bundle: Bundle, origin: str, destination: str, *, now_ms: int,
                    topic: str | None = None) -> Catalogue:
    """The catalogue of what ``origin`` may release to ``destination`` at ``now_ms``.

    With ``topic``, only tiers whose topic patterns cover it are listed (and count for
    ``best``); without, every active tier is listed and ``best`` counts the topic-free ones.
    Unknown nations, or a pair no agreement covers, give no entries and no ``best``.
    """
    common = bundle.common_scheme
    empty = Catalogue(origin=origin, destination=destination, at_ms=now_ms, topic=topic,
                      policy=bundle.hash.hex(), common_scheme=bundle.trust_root.common_scheme,
                      same_nation=origin == destination, entries=(), inactive=(), best=None)
    nations = bundle.trust_root.nations
    if common is None or origin not in nations or destination not in nations:
        return empty
    national = bundle.schemes.get(origin)
    if origin == destination:
        whole = _Region(common.levels[-1], {tag: frozenset(spec.values)
                                            for tag, spec in _deciding_tags(common)})
        return dataclasses.replace(empty, best=_releasable(whole, common, national))
    entries: list[CatalogueEntry] = []
    inactive: set[str] = set()
    counted: list[_Region] = []
    for agreement, tier in bundle.candidates(origin, destination):
        if not agreement.is_active_at(now_ms):
            inactive.add(agreement.ref)
            continue
        if topic is not None and not _tier_covers_topic(tier, common, topic):
            continue
        region = _tier_region(tier, common)
        if region is None:
            continue
        entries.append(_entry(agreement, tier, region, common, national))
        if topic is not None or tier.topics is None:
            counted.append(region)
    best = _union(counted, common)
    return dataclasses.replace(
        empty, entries=tuple(sorted(entries, key=lambda e: e.via)),
        inactive=tuple(sorted(inactive)),
        best=_releasable(best, common, national) if best is not None else None)


# --- regions: a level and the admitted values per tag, in common terms ------------------------


@dataclasses.dataclass(frozen=True)
class _Region:
    level: str
    cats: Mapping[str, frozenset[str]]


def _deciding_tags(scheme: Scheme) -> list[tuple[str, Tag]]:
    """The tags of ``scheme`` that can decide release (not informative), by name."""
    return [(name, spec) for name, spec in sorted(scheme.tags.items())
            if spec.type != INFORMATIVE]


def _admits(tier: Tier, common: Scheme, level: str, cats: Mapping[str, frozenset[str]]) -> bool:
    """Whether rule 4 lets this tier cover a common label, topics aside."""
    failures = tier_failures(tier, CommonLabel(level=level, cats=cats), common, _NO_TOPIC)
    return not failures - {TOPIC_NOT_COVERED}


def _tier_covers_topic(tier: Tier, common: Scheme, topic: str) -> bool:
    probe = CommonLabel(level=common.levels[0], cats={})
    return TOPIC_NOT_COVERED not in tier_failures(tier, probe, common, topic)


def _tier_region(tier: Tier, common: Scheme) -> _Region | None:
    """The highest level the tier admits (no values) and each value it admits (lowest level).

    A tier's allow-list is a subset test, so a set of values is admitted exactly when each of
    its values is; levels are compared by rank, so the admitted levels are a prefix.
    """
    admitted = [level for level in common.levels if _admits(tier, common, level, {})]
    if not admitted:
        return None
    lowest = common.levels[0]
    cats = {tag: frozenset(v for v in spec.values
                           if _admits(tier, common, lowest, {tag: frozenset({v})}))
            for tag, spec in _deciding_tags(common)}
    return _Region(level=admitted[-1], cats=cats)


def _union(regions: Iterable[_Region], common: Scheme) -> _Region | None:
    """The highest level and, per tag, every value admitted by any of ``regions``."""
    chosen = list(regions)
    if not chosen:
        return None
    level = max((r.level for r in chosen), key=common.levels.index)
    cats: dict[str, frozenset[str]] = {}
    for region in chosen:
        for tag, values in region.cats.items():
            cats[tag] = cats.get(tag, frozenset()) | values
    return _Region(level=level, cats=cats)


def _entry(agreement: Agreement, tier: Tier, region: _Region, common: Scheme,
           national: Scheme | None) -> CatalogueEntry:
    return CatalogueEntry(agreement=agreement.ref, tier=tier.name,
                          not_before=agreement.not_before, not_after=agreement.not_after,
                          topics=tier.topics, releasable=_releasable(region, common, national))


# --- the origin's national scheme -------------------------------------------------------------


def _releasable(region: _Region, common: Scheme, national: Scheme | None) -> Releasable:
    common_cats = {tag: tuple(sorted(values)) for tag, values in region.cats.items()}
    if national is None:
        return Releasable(level=region.level, categories=common_cats)
    level = _national_level(region, common, national)
    cats = _national_categories(region, common, national, level)
    return Releasable(level=region.level, categories=common_cats, national_scheme=national.name,
                      national_level=level, national_categories=cats)


def _translate(national: Scheme, common: Scheme, level: str,
               cats: Mapping[str, tuple[str, ...]]) -> CommonLabel | None:
    """A national label's common form, by the same translation ``decide`` uses (rule 2)."""
    probe = Label(policy=national.name, cls=level, cats=cats, rel=(), orig=national.name)
    return map_label(probe, national, common)


def _within(mapped: CommonLabel, region: _Region, common: Scheme) -> bool:
    if common.levels.index(mapped.level) > common.levels.index(region.level):
        return False
    return all(values <= region.cats.get(tag, frozenset())
               for tag, values in mapped.cats.items())


def _national_level(region: _Region, common: Scheme, national: Scheme) -> str | None:
    """The highest national level whose translation is at or below the region's level."""
    best: str | None = None
    for level in national.levels:  # low to high; the equivalence keeps the order
        mapped = _translate(national, common, level, {})
        if mapped is not None and _within(mapped, region, common):
            best = level
    return best


def _national_categories(region: _Region, common: Scheme, national: Scheme,
                         level: str | None) -> dict[str, tuple[str, ...]]:
    """Per deciding national tag, the values whose translation the region admits (a value
    without an equivalence is unmappable, so never listed)."""
    if level is None:
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for tag, spec in _deciding_tags(national):
        admitted = []
        for value in spec.values:
            mapped = _translate(national, common, level, {tag: (value,)})
            if mapped is not None and _within(mapped, region, common):
                admitted.append(value)
        out[tag] = tuple(sorted(admitted))
    return out


def _sorted_cats(cats: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    return {tag: sorted(values) for tag, values in sorted(cats.items())}
