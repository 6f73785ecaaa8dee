"""Properties of the policy engine: agreements only ever widen release, equivalences keep the
order of levels, and a bundle with one changed byte or one missing signature never loads."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.coalition import CoalitionDocuments
from broker.errors import PolicyDocumentError
from policies import authoring
from policies.bundle import Bundle, build_bundle
from policies.decide import Decision, decide
from policies.documents import SignedDocument
from policies.model import Agreement, Label, Tier
from policies.schemes import verify_national_scheme
from tests.unit.test_decide import CORE, DAY_MS, GBR_SCHEME, NATIONS, NODES, NOW, make_world

COMMON_LEVELS = ("UNCLASSIFIED", "RESTRICTED", "CONFIDENTIAL", "SECRET", "TOP SECRET")
NTK = ("ALPHA", "BRAVO", "CHARLIE")
TOPICS = ("maritime.tracks", "logistics.fuel", "intel.x.y")
PATTERNS = ("maritime.>", "logistics.*", "intel.>", "*.tracks")
INSTANTS = (NOW, NOW - 3 * DAY_MS, CORE.not_before, CORE.not_after, NOW + 2 * DAY_MS)
WINDOWS = ((NOW - DAY_MS, NOW + DAY_MS), (NOW - 5 * DAY_MS, NOW - 2 * DAY_MS),
           (NOW + DAY_MS, NOW + 9 * DAY_MS))
FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def world() -> CoalitionDocuments:
    return make_world()


@functools.cache
def base_bundle() -> Bundle:
    return world().bundle()


def subset(values: tuple[str, ...], min_size: int = 0) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(values), min_size=min_size, unique=True).map(
        lambda v: tuple(sorted(v)))


@st.composite
def requests(draw: st.DrawFn) -> tuple[Label, str, str, str, int]:
    sender = draw(st.sampled_from([n.node for n in NODES]))
    recipient = draw(st.sampled_from([n.node for n in NODES]))
    nation = base_bundle().nodes[sender].nation
    # Biased towards labels that can be released abroad, so that permits are common enough
    # for the properties to bite (a property about permits is vacuous over denials).
    cats = draw(st.one_of(st.just({}), subset(NTK, 1).map(lambda v: {"NTK": v})))
    rel = draw(st.one_of(st.just(NATIONS), subset((*NATIONS, "FVEY"))))
    label = Label(policy="NATO", cls=draw(st.sampled_from(COMMON_LEVELS)), cats=cats,
                  rel=rel, orig=nation)
    now = draw(st.one_of(st.just(NOW), st.sampled_from(INSTANTS)))
    return label, sender, recipient, draw(st.sampled_from(TOPICS)), now


@st.composite
def tiers(draw: st.DrawFn, parties: tuple[str, ...], name: str) -> Tier:
    return Tier(
        name=name, members=draw(subset(parties, 1)), ceiling=draw(st.sampled_from(COMMON_LEVELS)),
        categories=draw(st.one_of(st.none(), subset(NTK).map(lambda v: {"NTK": v}))),
        topics=draw(st.one_of(st.none(), subset(PATTERNS, 1))),
    )


@st.composite
def agreements(draw: st.DrawFn) -> Agreement:
    parties = draw(subset(NATIONS, 1))
    window = draw(st.sampled_from(WINDOWS))
    tier_list = [draw(tiers(parties, f"t{i}")) for i in range(draw(st.integers(1, 3)))]
    return Agreement(id="EXTRA", version=1, purpose="", parties=parties, not_before=window[0],
                     not_after=window[1], tiers=tuple(tier_list))


def with_agreements(bundle: Bundle, chosen: tuple[Agreement, ...]) -> Bundle:
    return dataclasses.replace(bundle, agreements=chosen)


def run(bundle: Bundle, request: tuple[Label, str, str, str, int]) -> Decision:
    label, sender, recipient, topic, now = request
    return decide(label, bundle.nodes[sender], bundle.nodes[recipient], topic, now, bundle)


# --- agreements only widen release -------------------------------------------------------------


@FAST
@given(request=requests(), data=st.data())
def test_adding_a_tier_never_turns_a_permit_into_a_deny(
    request: tuple[Label, str, str, str, int], data: st.DataObject
) -> None:
    base = base_bundle()
    index = data.draw(st.integers(0, len(base.agreements) - 1))
    target = base.agreements[index]
    tier = data.draw(tiers(target.parties, "added"))
    grown = dataclasses.replace(target, tiers=(*target.tiers, tier))
    wider = with_agreements(base, (*base.agreements[:index], grown, *base.agreements[index + 1:]))
    if run(base, request).permit:
        assert run(wider, request).permit


@FAST
@given(request=requests(), extra=agreements())
def test_adding_an_agreement_never_turns_a_permit_into_a_deny(
    request: tuple[Label, str, str, str, int], extra: Agreement
) -> None:
    base = base_bundle()
    wider = with_agreements(base, (*base.agreements, extra))
    before, after = run(base, request), run(wider, request)
    if before.permit:
        assert after.permit
    if after.permit and not before.permit:
        assert after.via is not None and after.via.startswith("EXTRA@1/")


@FAST
@given(request=requests(), data=st.data())
def test_removing_a_tier_or_an_agreement_never_turns_a_deny_into_a_permit(
    request: tuple[Label, str, str, str, int], data: st.DataObject
) -> None:
    base = with_agreements(base_bundle(), (*base_bundle().agreements,
                                           data.draw(agreements())))
    index = data.draw(st.integers(0, len(base.agreements) - 1))
    target = base.agreements[index]
    drop = data.draw(st.integers(0, len(target.tiers) - 1))
    remaining = target.tiers[:drop] + target.tiers[drop + 1:]
    rest = list(base.agreements[:index]) + list(base.agreements[index + 1:])
    if remaining:
        rest.insert(index, dataclasses.replace(target, tiers=remaining))
    narrower = with_agreements(base, tuple(rest))
    if not run(base, request).permit:
        assert not run(narrower, request).permit


# --- equivalences keep the order of levels -----------------------------------------------------


@SLOW
@given(mapping=st.fixed_dictionaries({}, optional={
    level: st.sampled_from(COMMON_LEVELS) for level in GBR_SCHEME.levels}))
def test_an_accepted_equivalence_preserves_the_order_of_levels(mapping: dict[str, str]) -> None:
    w, bundle = world(), base_bundle()
    data = authoring.scheme_toml(dataclasses.replace(GBR_SCHEME, level_map=mapping))
    doc = w.signed("schemes/GBR.toml", data, ["GBR"])
    ranks = [COMMON_LEVELS.index(mapping[lv]) for lv in GBR_SCHEME.levels if lv in mapping]
    monotone = ranks == sorted(ranks)
    common = bundle.common_scheme
    assert common is not None
    try:
        scheme = verify_national_scheme(doc, bundle.trust_root, common)
    except PolicyDocumentError as exc:
        assert not monotone and "equivalence.levels" in exc.reason
        return
    assert monotone
    kept = [common.levels.index(target) for lv in scheme.levels
            if (target := scheme.common_level(lv)) is not None]
    assert kept == sorted(kept)


# --- tampering never loads ---------------------------------------------------------------------


@SLOW
@given(data=st.data())
def test_one_changed_byte_in_any_document_never_loads(data: st.DataObject) -> None:
    w = world()
    path = data.draw(st.sampled_from(sorted(w.documents)))
    doc = w.documents[path]
    position = data.draw(st.integers(0, len(doc.data) - 1))
    flip = data.draw(st.integers(1, 255))
    changed = bytearray(doc.data)
    changed[position] ^= flip
    tampered = SignedDocument(doc.name, bytes(changed), doc.sig)
    with pytest.raises(PolicyDocumentError):
        build_bundle({**w.documents, path: tampered}, pinned_root_sha256=w.root_sha256)


@SLOW
@given(data=st.data())
def test_one_missing_signature_never_loads(data: st.DataObject) -> None:
    w = world()
    path = data.draw(st.sampled_from(sorted(w.documents)))
    doc = w.documents[path]
    lines = doc.sig.decode().splitlines()
    drop = data.draw(st.integers(0, len(lines) - 1))
    sig = "\n".join(lines[:drop] + lines[drop + 1:]).encode()
    with pytest.raises(PolicyDocumentError, match=r"signature|threshold"):
        build_bundle({**w.documents, path: SignedDocument(doc.name, doc.data, sig)},
                     pinned_root_sha256=w.root_sha256)
