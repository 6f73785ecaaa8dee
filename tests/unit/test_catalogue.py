"""The label catalogue: a table of agreements and what each nation pair may release, and the
property that ties it to ``decide()``: what the catalogue lists is permitted, one level above
its best is denied, and a value it leaves out is denied."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import canonical
from broker.coalition import DAY_MS, NodeSpec, coalition_documents
from policies.bundle import Bundle
from policies.catalogue import Catalogue, label_catalogue
from policies.decide import ABOVE_CEILING, CATEGORY_NOT_COVERED, Decision, decide
from policies.model import RESTRICTIVE, Agreement, Label, Scheme, Tag, Tier
from tests.unit.test_purity import FORBIDDEN, closure

NOW = 1_800_000_000_000
NATIONS = ("DEU", "FRA", "GBR", "POL", "USA")
LEVELS = ("UNCLASSIFIED", "RESTRICTED", "CONFIDENTIAL", "SECRET", "TOP SECRET")
NTK = ("ALPHA", "BRAVO", "CHARLIE")

#: GBR's own scheme: nothing maps to CONFIDENTIAL, and ZULU has no equivalence (unmappable).
GBR = Scheme(
    name="GBR", levels=("OFFICIAL", "OFFICIAL-SENSITIVE", "SECRET", "TOP SECRET"),
    tags={"NTK": Tag("NTK", RESTRICTIVE, ("ALPHA", "BRAVO", "CHARLIE", "ZULU"))},
    level_map={"OFFICIAL": "UNCLASSIFIED", "OFFICIAL-SENSITIVE": "RESTRICTED",
               "SECRET": "SECRET", "TOP SECRET": "TOP SECRET"},
    tag_map={"NTK": "NTK"},
    value_map={"NTK": {v: (v,) for v in NTK}},
)

#: Per nation a sender, and a recipient that may hold everything the common scheme can say.
NODES = [spec for nation in NATIONS for spec in (
    NodeSpec(f"{nation}-GW", nation),
    NodeSpec(f"{nation}-TOP", nation, max_level="TOP SECRET",
             cats={"NTK": [*NTK, "ZULU"] if nation == "GBR" else list(NTK)}),
)]


def agreement(ident: str, parties: Sequence[str], *tiers: Tier, not_before: int = NOW - DAY_MS,
              not_after: int = NOW + DAY_MS, version: int = 1) -> Agreement:
    return Agreement(id=ident, version=version, purpose="test", parties=tuple(sorted(parties)),
                     not_before=not_before, not_after=not_after, tiers=tiers)


def tier(name: str, members: Sequence[str], ceiling: str, *,
         ntk: Sequence[str] | None = None, topics: Sequence[str] | None = None) -> Tier:
    return Tier(name=name, members=tuple(sorted(members)), ceiling=ceiling,
                categories=None if ntk is None else {"NTK": tuple(sorted(ntk))},
                topics=None if topics is None else tuple(topics))


ATLANTIC = agreement(
    "ATLANTIC", ("FRA", "GBR", "POL", "USA"),
    tier("core", ("FRA", "GBR", "USA"), "SECRET"),
    tier("partners", ("POL",), "RESTRICTED", ntk=()),
    version=3)
NTK_ALPHA = agreement("ALPHA-ONLY", ("POL", "USA"),
                      tier("alpha", ("POL",), "CONFIDENTIAL", ntk=("ALPHA",)))
MARITIME = agreement("MARITIME", ("DEU", "USA"),
                     tier("sea", ("DEU",), "SECRET", topics=("maritime.>",)),
                     tier("any", ("DEU",), "RESTRICTED"))
EXPIRED = agreement("EXPIRED", ("DEU", "FRA"), tier("all", ("DEU", "FRA"), "SECRET"),
                    not_before=NOW - 10 * DAY_MS, not_after=NOW - DAY_MS, version=2)
WINDOW = agreement("WINDOW", ("FRA", "POL"), tier("t", ("POL",), "CONFIDENTIAL"),
                   not_before=NOW, not_after=NOW + DAY_MS)


@functools.cache
def world() -> Bundle:
    """Five nations, GBR with its own scheme, every node; agreements are swapped in per test."""
    return coalition_documents(nations=NATIONS, nodes=NODES, now_ms=NOW, schemes={"GBR": GBR},
                               agreements=()).bundle()


def bundle_with(*agreements: Agreement) -> Bundle:
    # The bundle re-indexes its agreements when built; signatures are tested elsewhere.
    return dataclasses.replace(world(), agreements=tuple(sorted(agreements, key=lambda a: a.id)))


def summary(cat: Catalogue) -> dict[str, object]:
    """The catalogue as (via, common level, NTK values) rows, the best, and the inactive refs."""
    best = cat.best
    return {
        "entries": [(e.via, e.releasable.level, e.releasable.categories["NTK"])
                    for e in cat.entries],
        "best": None if best is None else (best.level, best.categories["NTK"]),
        "inactive": cat.inactive,
    }


ALL = (ATLANTIC, NTK_ALPHA, MARITIME, EXPIRED, WINDOW)
CASES: list[tuple[str, tuple[Agreement, ...], str, str, str | None, int, dict[str, object]]] = [
    ("inner_tier_secret_every_value", ALL, "USA", "GBR", None, NOW,
     {"entries": [("ATLANTIC@3/core", "SECRET", NTK)], "best": ("SECRET", NTK), "inactive": ()}),
    ("partner_tier_restricted_no_ntk", (ATLANTIC,), "USA", "POL", None, NOW,
     {"entries": [("ATLANTIC@3/partners", "RESTRICTED", ())], "best": ("RESTRICTED", ()),
      "inactive": ()}),
    ("two_agreements_best_is_their_union", ALL, "USA", "POL", None, NOW,
     {"entries": [("ALPHA-ONLY@1/alpha", "CONFIDENTIAL", ("ALPHA",)),
                  ("ATLANTIC@3/partners", "RESTRICTED", ())],
      "best": ("CONFIDENTIAL", ("ALPHA",)), "inactive": ()}),
    ("topic_tier_listed_but_not_counted_without_topic", ALL, "USA", "DEU", None, NOW,
     {"entries": [("MARITIME@1/any", "RESTRICTED", NTK), ("MARITIME@1/sea", "SECRET", NTK)],
      "best": ("RESTRICTED", NTK), "inactive": ()}),
    ("topic_tier_counts_on_a_matching_topic", ALL, "USA", "DEU", "maritime.tracks", NOW,
     {"entries": [("MARITIME@1/any", "RESTRICTED", NTK), ("MARITIME@1/sea", "SECRET", NTK)],
      "best": ("SECRET", NTK), "inactive": ()}),
    ("topic_tier_left_out_on_another_topic", ALL, "USA", "DEU", "logistics.fuel", NOW,
     {"entries": [("MARITIME@1/any", "RESTRICTED", NTK)], "best": ("RESTRICTED", NTK),
      "inactive": ()}),
    ("expired_agreement_excluded_and_named", ALL, "FRA", "DEU", None, NOW,
     {"entries": [], "best": None, "inactive": ("EXPIRED@2",)}),
    ("not_before_is_inclusive", (WINDOW,), "FRA", "POL", None, WINDOW.not_before,
     {"entries": [("WINDOW@1/t", "CONFIDENTIAL", NTK)], "best": ("CONFIDENTIAL", NTK),
      "inactive": ()}),
    ("before_not_before_is_inactive", (WINDOW,), "FRA", "POL", None, WINDOW.not_before - 1,
     {"entries": [], "best": None, "inactive": ("WINDOW@1",)}),
    ("last_millisecond_is_active", (WINDOW,), "FRA", "POL", None, WINDOW.not_after - 1,
     {"entries": [("WINDOW@1/t", "CONFIDENTIAL", NTK)], "best": ("CONFIDENTIAL", NTK),
      "inactive": ()}),
    ("not_after_is_exclusive", (WINDOW,), "FRA", "POL", None, WINDOW.not_after,
     {"entries": [], "best": None, "inactive": ("WINDOW@1",)}),
    ("origin_not_a_party_gets_nothing", ALL, "GBR", "DEU", None, NOW,
     {"entries": [], "best": None, "inactive": ()}),
    ("party_but_not_a_tier_member_gets_nothing", ALL, "DEU", "USA", None, NOW,
     {"entries": [], "best": None, "inactive": ()}),
    ("before_every_window_only_inactive", ALL, "USA", "DEU", None, NOW - 5 * DAY_MS,
     {"entries": [], "best": None, "inactive": ("MARITIME@1",)}),
    ("no_agreement_at_all", (), "USA", "GBR", None, NOW,
     {"entries": [], "best": None, "inactive": ()}),
    ("unknown_nation_gets_nothing", ALL, "USA", "XYZ", None, NOW,
     {"entries": [], "best": None, "inactive": ()}),
]


@pytest.mark.parametrize(("name", "agreements", "origin", "destination", "topic", "now",
                          "expected"), CASES, ids=[c[0] for c in CASES])
def test_catalogue_table(name: str, agreements: tuple[Agreement, ...], origin: str,
                         destination: str, topic: str | None, now: int,
                         expected: dict[str, object]) -> None:
    cat = label_catalogue(bundle_with(*agreements), origin, destination, now_ms=now, topic=topic)
    assert summary(cat) == expected
    assert not cat.same_nation


def test_level_and_values_in_the_origins_national_scheme() -> None:
    narrow = agreement("LOW", ("GBR", "USA"), tier("t", ("USA",), "CONFIDENTIAL", ntk=("BRAVO",)))
    cat = label_catalogue(bundle_with(ATLANTIC, narrow), "GBR", "USA", now_ms=NOW)
    by_via = {e.via: e.releasable for e in cat.entries}
    # Nothing of GBR maps to CONFIDENTIAL: the highest GBR level below it is OFFICIAL-SENSITIVE.
    assert (by_via["LOW@1/t"].national_level, by_via["LOW@1/t"].national_categories) == (
        "OFFICIAL-SENSITIVE", {"NTK": ("BRAVO",)})
    # ZULU is a GBR value without equivalence: never releasable, whatever the tier allows.
    assert by_via["ATLANTIC@3/core"].national_categories == {"NTK": ("ALPHA", "BRAVO", "CHARLIE")}
    assert by_via["ATLANTIC@3/core"].national_level == "SECRET"
    assert cat.best is not None and cat.best.national_scheme == "GBR"


def test_no_national_level_when_the_lowest_maps_above_the_ceiling() -> None:
    fra = Scheme(name="FRA", levels=("DIFFUSION RESTREINTE", "SECRET", "TRES SECRET"),
                 tags={"NTK": Tag("NTK", RESTRICTIVE, NTK)},
                 level_map={"DIFFUSION RESTREINTE": "RESTRICTED", "SECRET": "SECRET",
                            "TRES SECRET": "TOP SECRET"},
                 tag_map={"NTK": "NTK"}, value_map={"NTK": {v: (v,) for v in NTK}})
    public = agreement("PUBLIC", ("FRA", "POL"), tier("open", ("POL",), "UNCLASSIFIED"))
    bundle = dataclasses.replace(bundle_with(public), schemes={**world().schemes, "FRA": fra})
    best = label_catalogue(bundle, "FRA", "POL", now_ms=NOW).best
    assert best is not None and best.level == "UNCLASSIFIED"
    assert (best.national_scheme, best.national_level, best.national_categories) == (
        "FRA", None, {})
    assert "national_level" not in best.to_map()


def test_same_nation_needs_no_agreement() -> None:
    cat = label_catalogue(bundle_with(), "GBR", "GBR", now_ms=NOW)
    assert cat.same_nation and cat.entries == ()
    assert cat.best is not None
    assert (cat.best.level, cat.best.national_level) == ("TOP SECRET", "TOP SECRET")
    assert cat.best.national_categories == {"NTK": ("ALPHA", "BRAVO", "CHARLIE")}


def test_to_map_is_canonical_msgpack_and_sorted() -> None:
    cat = label_catalogue(bundle_with(*ALL), "USA", "DEU", now_ms=NOW)
    encoded = canonical.encode(cat.to_map())
    assert canonical.decode(encoded) == cat.to_map()
    vias = [e["via"] for e in cat.to_map()["entries"]]
    assert vias == sorted(vias) and len(vias) == 2
    assert "topic" not in cat.to_map() and cat.to_map()["policy"] == world().hash.hex()


def test_catalogue_module_is_pure() -> None:
    bad = {name for name in closure("policies.catalogue") if name.split(".")[0] in FORBIDDEN}
    assert not bad


# --- the catalogue agrees with decide() --------------------------------------------------------

PATTERNS = ("maritime.>", "logistics.*", "*.tracks")
TOPICS = ("maritime.tracks", "logistics.fuel", "intel.x")
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def subset(values: Sequence[str], min_size: int = 0) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(values), min_size=min_size, unique=True).map(
        lambda v: tuple(sorted(v)))


@st.composite
def random_agreement(draw: st.DrawFn, ident: str) -> Agreement:
    parties = draw(subset(NATIONS, 1))
    # Weighted towards active, topic-free tiers with allow-lists: where there is most to check.
    tiers = [tier(f"t{i}", draw(subset(parties, 1)), draw(st.sampled_from(LEVELS)),
                  ntk=draw(st.none() | subset(NTK) | subset(NTK)),
                  topics=draw(st.none() | st.none() | subset(PATTERNS, 1)))
             for i in range(draw(st.integers(1, 3)))]
    active = (NOW - DAY_MS, NOW + DAY_MS)
    window = draw(st.sampled_from([active, active, active, (NOW - 3 * DAY_MS, NOW),
                                   (NOW + 1, NOW + DAY_MS)]))
    return agreement(ident, parties, *tiers, not_before=window[0], not_after=window[1])


Scenario = tuple[tuple[Agreement, ...], str, str, str]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Up to three random agreements and a pair of nations, usually a party and a tier member of
    one of them (so that the catalogue has something to say), sometimes any two nations."""
    ids = draw(st.lists(st.integers(0, 99), max_size=3, unique=True))
    agreements = tuple(draw(random_agreement(f"A{n}")) for n in sorted(ids))
    if agreements and draw(st.integers(0, 4)) > 0:  # four times in five
        chosen = draw(st.sampled_from(agreements))
        destination = draw(st.sampled_from(draw(st.sampled_from(chosen.tiers)).members))
        others = [p for p in chosen.parties if p != destination]
        origin = draw(st.sampled_from(others or list(chosen.parties)))
    else:
        origin, destination = draw(st.sampled_from(NATIONS)), draw(st.sampled_from(NATIONS))
    return agreements, origin, destination, draw(st.sampled_from(TOPICS))


def release(bundle: Bundle, origin: str, destination: str, topic: str, cls: str,
            ntk: Sequence[str], policy: str = "NATO") -> Decision:
    """decide() for a label from ``origin``'s sender node to ``destination``'s fully accredited
    node, addressed to every nation: only the agreements can stand in the way."""
    label = Label(policy=policy, cls=cls, cats={"NTK": tuple(sorted(ntk))} if ntk else {},
                  rel=NATIONS, orig=origin)
    return decide(label, bundle.nodes[f"{origin}-GW"], bundle.nodes[f"{destination}-TOP"], topic,
                  NOW, bundle)


@PROPERTY
@given(world_=scenarios(), scoped=st.booleans(), data=st.data())
def test_what_the_catalogue_lists_is_permitted(world_: Scenario, scoped: bool,
                                               data: st.DataObject) -> None:
    """Every label within an entry (any level up to it, any subset of its values, and the same in
    GBR's national terms) is permitted; without a topic, only topic-free entries are counted."""
    agreements, origin, destination, topic = world_
    bundle = bundle_with(*agreements)
    cat = label_catalogue(bundle, origin, destination, now_ms=NOW,
                          topic=topic if scoped else None)
    for entry in cat.entries:
        if not scoped and entry.topics is not None:
            continue
        what = entry.releasable
        allowed = what.categories["NTK"]
        for level in LEVELS[:LEVELS.index(what.level) + 1]:
            values = data.draw(subset(allowed)) if allowed else ()
            assert release(bundle, origin, destination, topic, level, values).permit
        assert release(bundle, origin, destination, topic, what.level, allowed).permit
        if origin == "GBR" and what.national_level is not None:
            assert release(bundle, origin, destination, topic, what.national_level,
                           what.national_categories["NTK"], "GBR").permit
    if cat.best is not None:
        assert release(bundle, origin, destination, topic, cat.best.level, ()).permit
        for value in cat.best.categories["NTK"]:
            assert release(bundle, origin, destination, topic, LEVELS[0], (value,)).permit


@PROPERTY
@given(world_=scenarios())
def test_nothing_above_the_catalogues_best_is_permitted(world_: Scenario) -> None:
    """On a given topic: the level above ``best`` is denied (above the ceiling), a value outside
    ``best`` is denied (not covered), and no ``best`` means nothing goes at all."""
    agreements, origin, destination, topic = world_
    bundle = bundle_with(*agreements)
    best = label_catalogue(bundle, origin, destination, now_ms=NOW, topic=topic).best
    if best is None:
        assert origin != destination
        assert not release(bundle, origin, destination, topic, LEVELS[0], ()).permit
        return
    if best.level != LEVELS[-1]:
        above = release(bundle, origin, destination, topic,
                        LEVELS[LEVELS.index(best.level) + 1], ())
        assert not above.permit and ABOVE_CEILING in above.reasons
    for value in NTK:
        single = release(bundle, origin, destination, topic, LEVELS[0], (value,))
        assert single.permit == (value in best.categories["NTK"])
        if not single.permit:
            assert CATEGORY_NOT_COVERED in single.reasons
    if origin == "GBR" and best.national_level is not None:
        assert release(bundle, origin, destination, topic, best.national_level, (),
                       "GBR").permit
        for level in GBR.levels[GBR.levels.index(best.national_level) + 1:]:
            assert not release(bundle, origin, destination, topic, level, (), "GBR").permit
