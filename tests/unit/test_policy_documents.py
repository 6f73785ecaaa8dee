"""Signed scheme and agreement documents: every refusal names the document, the field and (for
signatures) the missing signer, and refuses the whole bundle."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import pytest

from broker.coalition import CoalitionDocuments
from broker.errors import PolicyDocumentError
from policies import authoring
from policies.agreements import parse_agreement
from policies.bundle import build_bundle
from policies.documents import SignedDocument
from policies.model import Agreement, Tier
from policies.schemes import parse_scheme_body
from tests.unit.test_decide import CORE, GBR_SCHEME, LOGISTICS, NOW, OLD, make_world

AGREEMENT = "agreements/CORE.toml"
SCHEME = "schemes/GBR.toml"
PARTIES = ("FRA", "GBR", "POL", "USA")


@functools.cache
def world() -> CoalitionDocuments:
    return make_world()


def refusal(path: str, data: bytes, signers: Sequence[str]) -> PolicyDocumentError:
    """Replace one document (signed by ``signers``) and return why the bundle is refused."""
    w = world()
    documents = {**w.documents, path: w.signed(path, data, signers)}
    with pytest.raises(PolicyDocumentError) as caught:
        build_bundle(documents, pinned_root_sha256=w.root_sha256)
    assert caught.value.document == path
    return caught.value


def agreement_bytes(agreement: Agreement = CORE) -> bytes:
    return authoring.agreement_toml(agreement)


def edited(data: bytes, old: str, new: str) -> bytes:
    assert old.encode() in data, old
    return data.replace(old.encode(), new.encode(), 1)


def gbr_scheme(**changes: object) -> bytes:
    return authoring.scheme_toml(dataclasses.replace(GBR_SCHEME, **changes))  # type: ignore[arg-type]


def test_the_world_loads() -> None:
    bundle = world().bundle()
    assert set(bundle.schemes) == {"NATO", "DEU", "FRA", "GBR", "POL", "USA"}
    assert [a.ref for a in bundle.agreements] == ["CORE@1", "LOGISTICS@2", "OLD@4"]
    assert bundle.schemes["GBR"] == GBR_SCHEME
    assert bundle.agreements[0] == CORE


# --- signatures ------------------------------------------------------------------------------


def test_agreement_missing_one_partys_signature_names_that_party() -> None:
    error = refusal(AGREEMENT, agreement_bytes(), ("FRA", "GBR", "USA"))
    assert error.code == "unsigned" and "missing or invalid signature by POL" in error.reason


def test_agreement_signature_over_other_bytes_is_refused() -> None:
    w = world()
    doc = w.documents[AGREEMENT]
    tampered = SignedDocument(doc.name, doc.data.replace(b"SECRET", b"TOP SECRET", 1), doc.sig)
    with pytest.raises(PolicyDocumentError, match="missing or invalid signature by FRA, GBR"):
        build_bundle({**w.documents, AGREEMENT: tampered}, pinned_root_sha256=w.root_sha256)


def test_national_scheme_signed_by_another_nation_is_refused() -> None:
    error = refusal(SCHEME, gbr_scheme(), ("USA",))
    assert "missing or invalid signature by GBR" in error.reason


def test_common_scheme_below_the_threshold_is_refused() -> None:
    w = world()
    error = refusal("schemes/NATO.toml", w.documents["schemes/NATO.toml"].data, ("DEU",))
    assert "threshold is 3" in error.reason and "not signed by" in error.reason


# --- agreements -------------------------------------------------------------------------------

AGREEMENT_REFUSALS = [
    ("unknown_party", edited(agreement_bytes(), 'parties = ["FRA"', 'parties = ["XXX", "FRA"'),
     PARTIES, "field 'parties': XXX not a nation of the trust root"),
    ("tier_member_not_in_the_trust_root",
     edited(agreement_bytes(), 'members = ["POL"]', 'members = ["POL", "XXX"]'), PARTIES,
     "field 'tiers[1].members': XXX not a nation of the trust root"),
    ("tier_member_not_a_party",
     edited(agreement_bytes(), 'members = ["POL"]', 'members = ["DEU", "POL"]'), PARTIES,
     "field 'tiers[1].members': DEU not a party to the agreement"),
    ("ceiling_not_a_common_level", edited(agreement_bytes(), 'ceiling = "RESTRICTED"',
                                          'ceiling = "OFFICIAL"'), PARTIES,
     "field 'tiers[1].ceiling': 'OFFICIAL' is not a level of the common scheme NATO"),
    ("category_tag_unknown", edited(agreement_bytes(), "categories = { NTK = [] }",
                                    "categories = { CAVEAT = [] }"), PARTIES,
     "field 'tiers[1].categories.CAVEAT': not a restrictive tag of the common scheme"),
    ("category_value_unknown", edited(agreement_bytes(), "categories = { NTK = [] }",
                                      'categories = { NTK = ["OMEGA"] }'), PARTIES,
     "field 'tiers[1].categories.NTK': unknown value(s) ['OMEGA']"),
    ("misspelt_tier_field", edited(agreement_bytes(), "categories = ", "categroies = "), PARTIES,
     "field 'tiers[1].categroies' is not a tier field"),
    ("bad_topic_pattern", edited(agreement_bytes(), '"maritime.>"', '"Maritime.>.x"'), PARTIES,
     "field 'tiers[0].topics'"),
    ("window_inverted", edited(agreement_bytes(), "not_after = 2027", "not_after = 2020"),
     PARTIES, "field 'not_after' must be later than not_before"),
    ("id_differs_from_the_file_name", edited(agreement_bytes(), 'id = "CORE"', 'id = "OTHER"'),
     PARTIES, "field 'id': 'OTHER' does not match the file name"),
    ("no_tiers", agreement_bytes(dataclasses.replace(CORE, tiers=())), PARTIES,
     "field 'tiers' is missing"),
    ("duplicate_tier_names", agreement_bytes(dataclasses.replace(
        CORE, tiers=(CORE.tiers[0], dataclasses.replace(CORE.tiers[1], name="core")))), PARTIES,
     "two tiers named 'core'"),
]


@pytest.mark.parametrize(("name", "data", "signers", "message"), AGREEMENT_REFUSALS,
                         ids=[c[0] for c in AGREEMENT_REFUSALS])
def test_agreement_refusal(name: str, data: bytes, signers: Sequence[str], message: str) -> None:
    assert message in refusal(AGREEMENT, data, signers).reason


# --- schemes ----------------------------------------------------------------------------------

LEVELS = dict(GBR_SCHEME.level_map)
SCHEME_REFUSALS = [
    ("higher_level_mapped_below_a_lower_one",
     gbr_scheme(level_map={**LEVELS, "SECRET": "RESTRICTED", "OFFICIAL-SENSITIVE": "CONFIDENTIAL"}),
     "field 'equivalence.levels.SECRET': maps to RESTRICTED, below CONFIDENTIAL of the lower "
     "level OFFICIAL-SENSITIVE"),
    ("level_target_not_in_the_common_scheme",
     gbr_scheme(level_map={**LEVELS, "SECRET": "COSMIC"}),
     "field 'equivalence.levels.SECRET': 'COSMIC' is not a level of the common scheme NATO"),
    ("equivalence_of_an_unknown_level",
     edited(gbr_scheme(), '"SECRET" = "SECRET"', '"SECRET" = "SECRET"\n"EYES" = "SECRET"'),
     "field 'equivalence.levels.EYES': 'EYES' is not a level of this scheme"),
    ("value_target_not_in_the_common_scheme",
     gbr_scheme(value_map={"NTK": {"ALPHA": ("OMEGA",)}}),
     "field 'equivalence.values.NTK.ALPHA': ['OMEGA'] not values of common tag NTK"),
    ("equivalence_of_an_unknown_tag", gbr_scheme(value_map={"CAVEAT": {"X": ("ALPHA",)}}),
     "field 'equivalence.values.CAVEAT': unknown tag 'CAVEAT'"),
    ("equivalence_of_an_unknown_value", gbr_scheme(value_map={"NTK": {"OMEGA": ("ALPHA",)}}),
     "field 'equivalence.values.NTK': unknown value 'OMEGA'"),
    ("value_mapped_to_nothing", gbr_scheme(value_map={"NTK": {"ALPHA": ()}}),
     "field 'equivalence.values.NTK.ALPHA' maps to nothing"),
    ("tag_mapped_to_an_unknown_common_tag", gbr_scheme(tag_map={"NTK": "CAVEAT"}),
     "field 'equivalence.tags.NTK': 'CAVEAT' is not a tag of the common scheme"),
    ("tag_mapped_to_a_common_tag_of_another_type",
     edited(gbr_scheme(), 'type = "restrictive"', 'type = "permissive"'),
     "field 'equivalence.tags.NTK': a permissive tag cannot map to the restrictive common tag"),
    ("bad_tag_type", edited(gbr_scheme(), 'type = "restrictive"', 'type = "secret"'),
     "field 'tags.NTK.type' must be one of restrictive, permissive, informative"),
    ("duplicate_level", edited(gbr_scheme(), '"OFFICIAL", ', '"OFFICIAL", "OFFICIAL", '),
     "field 'levels' has duplicates"),
    ("no_level_equivalence", edited(gbr_scheme(), "[equivalence.levels]", "[equivalence.lvls]"),
     "field 'equivalence.levels' is missing"),
]


@pytest.mark.parametrize(("name", "data", "message"), SCHEME_REFUSALS,
                         ids=[c[0] for c in SCHEME_REFUSALS])
def test_scheme_refusal(name: str, data: bytes, message: str) -> None:
    assert message in refusal(SCHEME, data, ("GBR",)).reason


def test_scheme_of_an_unknown_nation_is_refused() -> None:
    data = authoring.scheme_toml(dataclasses.replace(GBR_SCHEME, name="XXX"))
    assert "field 'scheme': XXX is not a nation of the trust root" in refusal(
        "schemes/XXX.toml", data, ("GBR",)).reason


def test_common_scheme_with_an_equivalence_is_refused() -> None:
    data = world().documents["schemes/NATO.toml"].data + b'\n[equivalence.levels]\nU = "U"\n'
    assert "the common scheme maps to itself" in refusal(
        "schemes/NATO.toml", data, ("DEU", "FRA", "GBR")).reason


def test_missing_common_scheme_refuses_the_bundle() -> None:
    w = world()
    documents = {k: v for k, v in w.documents.items() if k != "schemes/NATO.toml"}
    with pytest.raises(PolicyDocumentError, match="common scheme NATO named by the trust root"):
        build_bundle(documents, pinned_root_sha256=w.root_sha256)


# --- node accreditations ----------------------------------------------------------------------

NODE = "nodes/GBR-GW1.toml"


@pytest.mark.parametrize(("old", "new", "message"), [
    ('max = "SECRET"', 'max = "COSMIC"', "field 'accreditation.max': 'COSMIC' is not a level "
                                         "of scheme GBR"),
    ("NTK = ", "CAVEAT = ", "field 'accreditation.cats.CAVEAT': unknown tag in scheme GBR"),
    ('"ZULU"', '"OMEGA"', "field 'accreditation.cats.NTK': unknown value(s) ['OMEGA']"),
], ids=["unknown_level", "unknown_tag", "unknown_value"])
def test_accreditation_outside_the_nations_scheme_is_refused(old: str, new: str,
                                                             message: str) -> None:
    data = edited(world().documents[NODE].data, old, new)
    assert message in refusal(NODE, data, ("GBR",)).reason


def test_node_of_a_nation_without_a_scheme_is_refused() -> None:
    w = world()
    documents = {k: v for k, v in w.documents.items() if k != SCHEME}
    with pytest.raises(PolicyDocumentError, match="nation GBR has no scheme in the bundle"):
        build_bundle(documents, pinned_root_sha256=w.root_sha256)


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("agreement", [CORE, OLD, LOGISTICS], ids=lambda a: a.id)
def test_agreement_toml_round_trips(agreement: Agreement) -> None:
    common = world().bundle().schemes["NATO"]
    doc = SignedDocument("agreements/x.toml", authoring.agreement_toml(agreement), b"")
    assert parse_agreement(doc, common) == agreement


def test_timestamps_keep_the_millisecond() -> None:
    common = world().bundle().schemes["NATO"]
    odd = Agreement("A", 1, "", ("USA",), NOW + 1, NOW + 999, (Tier("t", ("USA",), "SECRET"),))
    doc = SignedDocument("a", authoring.agreement_toml(odd), b"")
    assert parse_agreement(doc, common) == odd


def test_non_ascii_levels_are_quoted_and_round_trip() -> None:
    fra = dataclasses.replace(GBR_SCHEME, name="FRA", levels=("DR", "SECRET", "TRÈS SECRET"),
                              level_map={"DR": "RESTRICTED", "TRÈS SECRET": "TOP SECRET"})
    scheme, _ = parse_scheme_body(SignedDocument("s", authoring.scheme_toml(fra), b""))
    assert scheme.levels == fra.levels


@pytest.mark.parametrize("name", ["USA\n", "USA-GW1\n"])
def test_names_with_a_trailing_newline_are_not_valid(name: str) -> None:
    from policies.documents import NATION_RE, NODE_RE

    assert NATION_RE.match(name) is None
    assert NODE_RE.match(name) is None
