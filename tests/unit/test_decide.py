"""The release decision (DESIGN §5): one table row per reason code, several agreements, validity
boundaries, and the decision cache. Pure: documents are signed and verified in memory."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import pytest

from broker.coalition import DAY_MS, CoalitionDocuments, NodeSpec, coalition_documents
from policies.bundle import Bundle
from policies.cache import DecisionCache, label_digest, validity_interval
from policies.decide import REASON_CODES, Decision, decide
from policies.model import RESTRICTIVE, Agreement, Label, Scheme, Tag, Tier

NOW = 1_800_000_000_000
NATIONS = ("DEU", "FRA", "GBR", "POL", "USA")

GBR_SCHEME = Scheme(
    name="GBR",
    levels=("OFFICIAL", "OFFICIAL-SENSITIVE", "SECRET", "TOP SECRET"),
    tags={"NTK": Tag("NTK", RESTRICTIVE, ("ALPHA", "BRAVO", "ZULU"))},
    level_map={"OFFICIAL": "UNCLASSIFIED", "OFFICIAL-SENSITIVE": "RESTRICTED",
               "SECRET": "SECRET", "TOP SECRET": "TOP SECRET"},
    tag_map={"NTK": "NTK"},
    value_map={"NTK": {"ALPHA": ("ALPHA",), "BRAVO": ("BRAVO",)}},  # ZULU: unmappable
)

CORE = Agreement(
    id="CORE", version=1, purpose="maritime", parties=("FRA", "GBR", "POL", "USA"),
    not_before=NOW - DAY_MS // 2, not_after=NOW + DAY_MS,
    tiers=(Tier("core", ("FRA", "GBR", "USA"), "SECRET", topics=("maritime.>",)),
           Tier("partners", ("POL",), "RESTRICTED", categories={"NTK": ()})),
)
OLD = Agreement(
    id="OLD", version=4, purpose="expired", parties=("DEU", "USA"),
    not_before=NOW - 10 * DAY_MS, not_after=NOW - DAY_MS,
    tiers=(Tier("all", ("DEU", "USA"), "SECRET"),),
)
LOGISTICS = Agreement(
    id="LOGISTICS", version=2, purpose="logistics", parties=("GBR", "USA"),
    not_before=NOW - DAY_MS, not_after=NOW + DAY_MS,
    tiers=(Tier("logistics", ("GBR", "USA"), "CONFIDENTIAL", topics=("logistics.>",)),),
)

NODES = (
    NodeSpec("USA-GW1", "USA", cats={"NTK": ["ALPHA"]}),
    NodeSpec("USA-LOW", "USA", max_level="RESTRICTED"),
    NodeSpec("GBR-GW1", "GBR", cats={"NTK": ["ALPHA", "ZULU"]}),
    NodeSpec("FRA-GW1", "FRA"),
    NodeSpec("FRA-OLD", "FRA", not_before_ms=NOW - 30 * DAY_MS, not_after_ms=NOW - DAY_MS),
    NodeSpec("POL-GW1", "POL", cats={"NTK": ["ALPHA"]}),
    NodeSpec("DEU-GW1", "DEU"),
)


def make_world(agreements: Sequence[Agreement] = (CORE, OLD, LOGISTICS),
               nodes: Sequence[NodeSpec] = NODES,
               schemes: Mapping[str, Scheme] | None = None) -> CoalitionDocuments:
    """Five nations, GBR with its own scheme, the agreements above, signed in memory."""
    return coalition_documents(nations=NATIONS, nodes=nodes, now_ms=NOW,
                               communities={"FVEY": ("GBR", "USA")},
                               schemes=schemes if schemes is not None else {"GBR": GBR_SCHEME},
                               agreements=agreements)


@functools.cache
def world() -> Bundle:
    return make_world().bundle()


def lab(cls: str = "SECRET", rel: Sequence[str] = ("DEU", "FRA", "GBR", "POL"), *,
        orig: str = "USA", policy: str = "NATO",
        cats: Mapping[str, tuple[str, ...]] | None = None) -> Label:
    return Label(policy=policy, cls=cls, cats=cats or {}, rel=tuple(sorted(rel)), orig=orig)


def run(label: Label, sender: str, recipient: str, topic: str = "maritime.tracks", *,
        now: int = NOW, bundle: Bundle | None = None,
        inactive: frozenset[str] = frozenset()) -> Decision:
    b = bundle or world()
    return decide(label, b.nodes[sender], b.nodes[recipient], topic, now, b,
                  inactive_nodes=inactive)


# --- one row per reason code (and a permit for each path) --------------------------------------

CASES: list[tuple[str, Label, str, str, str, str]] = [
    ("permit_via_core_tier", lab(), "USA-GW1", "GBR-GW1", "maritime.tracks", "permit"),
    ("same_nation_needs_no_agreement_but_needs_accreditation", lab("TOP SECRET", ()),
     "USA-GW1", "USA-GW1", "any.topic", "deny:recipient_not_accredited"),
    ("permit_in_the_senders_national_scheme",
     lab("OFFICIAL-SENSITIVE", ("USA",), orig="GBR", policy="GBR", cats={"NTK": ("ALPHA",)}),
     "GBR-GW1", "USA-GW1", "maritime.x", "permit"),
    ("invalid_label_policy_is_another_nations_scheme", lab(policy="GBR", cls="SECRET"),
     "USA-GW1", "GBR-GW1", "maritime.tracks", "deny:invalid_label"),
    ("invalid_label_unknown_level", lab("COSMIC"), "USA-GW1", "GBR-GW1", "maritime.tracks",
     "deny:invalid_label"),
    ("invalid_label_unknown_value", lab(cats={"NTK": ("OMEGA",)}), "USA-GW1", "GBR-GW1",
     "maritime.tracks", "deny:invalid_label"),
    ("invalid_label_unknown_tag", lab(cats={"CAVEAT": ("X",)}), "USA-GW1", "GBR-GW1",
     "maritime.tracks", "deny:invalid_label"),
    ("invalid_label_orig_is_not_the_sender_nation", lab(orig="FRA"), "USA-GW1", "GBR-GW1",
     "maritime.tracks", "deny:invalid_label"),
    ("unmappable_value_without_equivalence",
     lab("SECRET", ("USA",), orig="GBR", policy="GBR", cats={"NTK": ("ZULU",)}),
     "GBR-GW1", "USA-GW1", "maritime.x", "deny:unmappable"),
    ("not_in_audience", lab(rel=("GBR",)), "USA-GW1", "FRA-GW1", "maritime.tracks",
     "deny:not_in_audience"),
    ("community_in_rel_is_expanded", lab(rel=("FVEY",)), "USA-GW1", "GBR-GW1",
     "maritime.tracks", "permit"),
    ("no_agreement_between_the_two_nations", lab("RESTRICTED", orig="FRA", rel=("DEU",)),
     "FRA-GW1", "DEU-GW1", "maritime.tracks", "deny:no_agreement"),
    ("agreement_inactive_when_only_an_expired_one_covers", lab("RESTRICTED"), "USA-GW1",
     "DEU-GW1", "maritime.tracks", "deny:agreement_inactive"),
    ("above_ceiling_of_the_partner_tier", lab("CONFIDENTIAL"), "USA-GW1", "POL-GW1",
     "maritime.tracks", "deny:above_ceiling"),
    ("category_not_covered_by_the_partner_tier", lab("RESTRICTED", cats={"NTK": ("ALPHA",)}),
     "USA-GW1", "POL-GW1", "maritime.tracks", "deny:category_not_covered"),
    ("topic_not_covered_by_any_tier", lab(), "USA-GW1", "FRA-GW1", "logistics.fuel",
     "deny:topic_not_covered"),
    ("recipient_not_accredited_for_the_level", lab("SECRET", ()), "USA-GW1", "USA-LOW",
     "any.topic", "deny:recipient_not_accredited"),
    ("recipient_not_accredited_for_a_restrictive_value", lab(cats={"NTK": ("BRAVO",)}),
     "USA-GW1", "GBR-GW1", "maritime.tracks", "deny:recipient_not_accredited"),
    ("held_value_that_does_not_map_grants_nothing_and_voids_nothing",
     lab(cats={"NTK": ("ALPHA",)}, orig="USA"), "USA-GW1", "GBR-GW1", "maritime.tracks",
     "permit"),
    ("node_inactive_expired_recipient", lab(), "USA-GW1", "FRA-OLD", "maritime.tracks",
     "deny:node_inactive"),
    ("every_failed_reason_is_collected",
     lab("CONFIDENTIAL", ("GBR",), cats={"NTK": ("ALPHA",)}), "USA-GW1", "POL-GW1", "x.y",
     "deny:above_ceiling,category_not_covered,not_in_audience"),
    ("invalid_label_skips_rules_4_and_5_but_keeps_3_and_6", lab("COSMIC", ("GBR",)),
     "USA-GW1", "FRA-OLD", "maritime.tracks", "deny:invalid_label,node_inactive,not_in_audience"),
]


@pytest.mark.parametrize(("name", "label", "sender", "recipient", "topic", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_reason_code_table(name: str, label: Label, sender: str, recipient: str, topic: str,
                           expected: str) -> None:
    assert run(label, sender, recipient, topic).status() == expected


def test_every_decide_reason_code_has_a_table_row() -> None:
    seen = {r for *_, expected in CASES for r in expected.removeprefix("deny:").split(",")}
    assert set(REASON_CODES) - seen == {"no_key_for_recipient"}  # added by the broker, not here


def test_same_nation_permit_names_no_agreement() -> None:
    decision = run(lab("CONFIDENTIAL", ()), "USA-GW1", "USA-GW1", "anything")
    assert decision == Decision(permit=True, via=None)


def test_suspended_sender_or_recipient_is_node_inactive() -> None:
    for suspended in ("USA-GW1", "GBR-GW1"):
        decision = run(lab(), "USA-GW1", "GBR-GW1", inactive=frozenset({suspended}))
        assert decision.reasons == ("node_inactive",)


def test_certificate_not_in_the_bundle_is_node_inactive() -> None:
    b = world()
    forged = dataclasses.replace(b.nodes["GBR-GW1"], sign_key=b"\x01" * 32)
    assert decide(lab(), b.nodes["USA-GW1"], forged, "maritime.tracks", NOW, b).reasons == (
        "node_inactive",)


def test_permissive_tag_present_but_empty_is_denied() -> None:
    common = Scheme(name="NATO", levels=("U", "S"), identity=True,
                    tags={"REL": Tag("REL", "permissive", ("A", "B"))})
    nat = Scheme(name="USA", levels=("U", "S"), tags=common.tags, level_map={"U": "U", "S": "S"},
                 tag_map={"REL": "REL"}, value_map={"REL": {"A": ("A",), "B": ("B",)}})
    agreement = Agreement("A", 1, "", ("GBR", "USA"), NOW - 1, NOW + 1,
                          (Tier("t", ("GBR", "USA"), "S"),))
    nodes = (NodeSpec("USA-1", "USA", max_level="S", cats={"REL": ["A", "B"]}),
             NodeSpec("GBR-1", "GBR", max_level="S", cats={"REL": ["A", "B"]}))
    b = coalition_documents(nations=("GBR", "USA"), nodes=nodes, now_ms=NOW, common=common,
                            schemes={"USA": nat, "GBR": dataclasses.replace(nat, name="GBR")},
                            agreements=[agreement]).bundle()
    empty = Label("NATO", "U", {"REL": ()}, ("GBR",), "USA")
    held = Label("NATO", "U", {"REL": ("B",)}, ("GBR",), "USA")
    assert run(empty, "USA-1", "GBR-1", bundle=b).reasons == ("recipient_not_accredited",)
    assert run(held, "USA-1", "GBR-1", bundle=b).permit


# --- several agreements ------------------------------------------------------------------------


def test_any_one_agreement_permits_and_via_names_it() -> None:
    assert run(lab(), "USA-GW1", "GBR-GW1", "maritime.tracks").via == "CORE@1/core"
    assert run(lab("CONFIDENTIAL"), "USA-GW1", "GBR-GW1", "logistics.fuel").via == (
        "LOGISTICS@2/logistics")


def test_reasons_are_the_union_over_the_tiers_the_recipient_is_in() -> None:
    # CORE/core: topic fails; LOGISTICS/logistics: ceiling fails.
    decision = run(lab("SECRET"), "USA-GW1", "GBR-GW1", "logistics.fuel")
    assert decision.reasons == ("above_ceiling", "topic_not_covered")


def test_active_failures_win_over_an_expired_agreement_that_would_cover() -> None:
    extra = Agreement("NEW", 1, "", ("DEU", "USA"), NOW - DAY_MS, NOW + DAY_MS,
                      (Tier("low", ("DEU",), "RESTRICTED"),))
    b = make_world([CORE, OLD, extra]).bundle()
    assert run(lab("SECRET"), "USA-GW1", "DEU-GW1", bundle=b).reasons == ("above_ceiling",)
    assert run(lab("RESTRICTED"), "USA-GW1", "DEU-GW1", bundle=b).via == "NEW@1/low"


def test_expired_agreement_reports_its_tier_failures_too() -> None:
    assert run(lab("TOP SECRET"), "USA-GW1", "DEU-GW1").reasons == (
        "above_ceiling", "agreement_inactive", "recipient_not_accredited")


def test_recipient_nation_outside_every_tier_is_no_agreement() -> None:
    # DEU is a party of OLD only with USA; FRA is in no agreement with DEU at all.
    assert run(lab("RESTRICTED", orig="FRA"), "FRA-GW1", "DEU-GW1").reasons == ("no_agreement",)


# --- validity windows: not_before inclusive, not_after exclusive -------------------------------

WINDOW_CASES = [
    ("agreement_before_not_before", CORE.not_before - 1, "deny:agreement_inactive"),
    ("agreement_at_not_before", CORE.not_before, "permit"),
    ("agreement_last_millisecond", CORE.not_after - 1, "permit"),
    ("agreement_at_not_after", CORE.not_after, "deny:agreement_inactive"),
]


@pytest.mark.parametrize(("name", "now", "expected"), WINDOW_CASES,
                         ids=[c[0] for c in WINDOW_CASES])
def test_agreement_window_boundaries(name: str, now: int, expected: str) -> None:
    assert run(lab("RESTRICTED"), "USA-GW1", "POL-GW1", now=now).status() == expected


@pytest.mark.parametrize(("offset", "expected"), [(-1, "deny:node_inactive"), (0, "permit")])
def test_certificate_not_before_is_inclusive(offset: int, expected: str) -> None:
    nodes = (NodeSpec("USA-GW1", "USA"), NodeSpec("GBR-GW1", "GBR", not_before_ms=NOW))
    b = make_world(nodes=nodes).bundle()
    assert run(lab(), "USA-GW1", "GBR-GW1", now=NOW + offset, bundle=b).status() == expected


@pytest.mark.parametrize(("offset", "expected"), [(-1, "permit"), (0, "deny:node_inactive")])
def test_certificate_not_after_is_exclusive(offset: int, expected: str) -> None:
    nodes = (NodeSpec("USA-GW1", "USA"), NodeSpec("GBR-GW1", "GBR", not_after_ms=NOW + 5))
    b = make_world(nodes=nodes).bundle()
    assert run(lab(), "USA-GW1", "GBR-GW1", now=NOW + 5 + offset, bundle=b).status() == expected


# --- the decision cache ------------------------------------------------------------------------


def test_cache_returns_the_same_decision_and_counts_hits() -> None:
    b, cache = world(), DecisionCache(max_entries=8)
    first = cache.decide(lab(), b.nodes["USA-GW1"], b.nodes["GBR-GW1"], "maritime.t", NOW, b)
    again = cache.decide(lab(), b.nodes["USA-GW1"], b.nodes["GBR-GW1"], "maritime.t", NOW + 5, b)
    assert first == again == run(lab(), "USA-GW1", "GBR-GW1", "maritime.t")
    assert (cache.hits, cache.misses) == (1, 1)


def test_cached_permit_does_not_outlive_the_agreement() -> None:
    b, cache = world(), DecisionCache()
    args = (lab("RESTRICTED"), b.nodes["USA-GW1"], b.nodes["POL-GW1"], "maritime.t")
    assert cache.decide(*args, CORE.not_after - 1, b).permit
    assert cache.decide(*args, CORE.not_after, b).reasons == ("agreement_inactive",)
    assert cache.decide(*args, CORE.not_after - 1, b).permit  # clock stepped back: recomputed


def test_cache_sees_a_suspension_without_being_cleared() -> None:
    b, cache = world(), DecisionCache()
    args = (lab(), b.nodes["USA-GW1"], b.nodes["GBR-GW1"], "maritime.t", NOW, b)
    assert cache.decide(*args).permit
    assert not cache.decide(*args, inactive_nodes={"GBR-GW1"}).permit


def test_cache_is_bounded_least_recently_used_first() -> None:
    b, cache = world(), DecisionCache(max_entries=2)
    for topic in ("a.a", "b.b", "c.c"):
        cache.decide(lab(), b.nodes["USA-GW1"], b.nodes["GBR-GW1"], topic, NOW, b)
    assert len(cache) == 2


def test_validity_interval_is_bounded_by_the_nearest_boundaries() -> None:
    b = world()
    lo, hi = validity_interval(b.nodes["USA-GW1"], b.nodes["POL-GW1"], NOW, b)
    assert (lo, hi) == (CORE.not_before, CORE.not_after)


def test_label_digest_depends_on_every_field() -> None:
    digests = {label_digest(x) for x in (lab(), lab("RESTRICTED"), lab(rel=("GBR",)),
                                         lab(cats={"NTK": ("ALPHA",)}), lab(orig="GBR"))}
    assert len(digests) == 5
