"""High-water marks of every bundle ever in force (policies/highwater.py): a document removed in
one reload cannot come back older in a later one. Pure, no broker."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from broker.coalition import CoalitionDocuments, coalition_documents
from broker.errors import PolicyDocumentError
from policies import authoring
from policies.bundle import Bundle, build_bundle, check_succession
from policies.highwater import HighWater
from tests.unit.test_revocations import (
    NATIONS,
    NODES,
    NOW,
    revocation_doc,
    rotated_doc,
    scheme_doc,
    with_docs,
)


@pytest.fixture(scope="module")
def made() -> CoalitionDocuments:
    return coalition_documents(nations=NATIONS, nodes=NODES, now_ms=NOW)


def test_a_node_removed_then_back_with_an_older_certificate_is_refused(
        made: CoalitionDocuments) -> None:
    first = made.bundle()
    rotated = with_docs(made, {"nodes/USA-GW1.toml": rotated_doc(made, "USA-GW1", serial=2)})
    without = build_bundle({k: v for k, v in rotated.documents.items()
                            if k != "nodes/USA-GW1.toml"}, pinned_root_sha256=made.root_sha256)
    check_succession(rotated, without)
    check_succession(without, first)  # the bundle in force alone lets the old one back...
    marks = HighWater.of([first, rotated, without])
    with pytest.raises(PolicyDocumentError, match="serial 1 is lower than 2") as refused:
        marks.check(first)  # ... the marks do not
    assert refused.value.code == "rollback"
    marks.check(rotated)  # the highest one may come back
    assert marks.nodes["USA-GW1"][1].version == 2


def test_a_revocation_is_kept_by_the_marks_once_seen(made: CoalitionDocuments) -> None:
    doc = revocation_doc(made, "USA-GW2")
    revoked = with_docs(made, {doc.name: doc})
    marks = HighWater().merge(revoked)
    with pytest.raises(PolicyDocumentError, match="revocation of USA-GW2 by USA was dropped"):
        marks.check(made.bundle())
    marks.check(revoked)


def test_scheme_and_root_marks_hold_the_highest_version_in_any_order(
        made: CoalitionDocuments) -> None:
    old = made.bundle()
    raised = with_docs(made, {"schemes/GBR.toml": scheme_doc(made, "GBR", version=2)})
    for bundles in ([old, raised], [raised, old]):
        marks = HighWater.of(bundles)
        assert marks.schemes["GBR"].version == 2 and marks.root is not None
        marks.check(raised)
        with pytest.raises(PolicyDocumentError, match="scheme GBR: version 1 is lower than 2"):
            marks.check(old)
    # Other bytes at version 2, signed by GBR too: not the version 2 that was in force.
    amended_bytes = raised.documents["schemes/GBR.toml"].data + b"# amended\n"
    amended = with_docs(made, {"schemes/GBR.toml": made.signed("schemes/GBR.toml", amended_bytes,
                                                               ["GBR"])})
    with pytest.raises(PolicyDocumentError, match="differs from the one in force before at the "
                       "same version 2"):
        HighWater.of([raised]).check(amended)
    HighWater().check(old)  # no marks yet: anything goes


def test_an_agreement_never_goes_below_its_highest_version(made: CoalitionDocuments) -> None:
    first = made.bundle()
    agreement = first.agreements[0]
    path = f"agreements/{agreement.id}.toml"
    newer = dataclasses.replace(agreement, version=agreement.version + 1)
    bumped = with_docs(made, {path: made.signed(path, authoring.agreement_toml(newer),
                                                list(agreement.parties))})
    marks = HighWater.of([first, bumped])
    with pytest.raises(PolicyDocumentError, match=f"agreement {agreement.id}: version 1 is "
                       "lower than 2, in force before"):
        marks.check(first)
    marks.check(bumped)


def test_texts_at_one_version_from_before_the_rule_are_all_allowed(
        made: CoalitionDocuments) -> None:
    """Stores from before "a changed document raises its version" may hold two texts at one
    version; the marks are built in no particular order, so both stay allowed (the one in
    force must not be refused at the next reload), and only a third is refused."""
    path = "schemes/GBR.toml"
    base = made.documents[path].data

    def text(suffix: bytes) -> Bundle:
        return with_docs(made, {path: made.signed(path, base + suffix, ["GBR"])})

    first, second, third = text(b"# one\n"), text(b"# two\n"), text(b"# three\n")
    for order in ([first, second], [second, first]):
        marks = HighWater.of(order)
        assert len(marks.schemes["GBR"].texts) == 2
        marks.check(first)
        marks.check(second)
        with pytest.raises(PolicyDocumentError, match="scheme GBR differs from the one in "
                           "force before at the same version 1"):
            marks.check(third)


def test_the_revocations_of_a_nation_that_left_the_root_are_not_asked_for(
        made: CoalitionDocuments) -> None:
    """A nation out of the trust root cannot sign its list any more (nor certify a node): its
    revocations are not asked for then; were it back in the root, they would be again."""
    doc = revocation_doc(made, "USA-GW2")
    marks = HighWater.of([with_docs(made, {doc.name: doc})])
    without_usa = coalition_documents(nations=("FRA", "GBR"), nodes=NODES[2:], now_ms=NOW)
    assert not [p for p in marks.problems(without_usa.bundle()) if "revocation" in p]
    with pytest.raises(PolicyDocumentError, match="revocation of USA-GW2 by USA was dropped"):
        marks.check(made.bundle())  # USA in the root: its revocation is asked for


# --- stored with the bundles (HighWater.to_bytes / from_bytes) ---------------------------------


def test_marks_round_trip_through_their_bytes(made: CoalitionDocuments) -> None:
    first = made.bundle()
    doc = revocation_doc(made, "USA-GW2")
    later = with_docs(made, {doc.name: doc,
                             "nodes/USA-GW1.toml": rotated_doc(made, "USA-GW1", serial=2),
                             "schemes/GBR.toml": scheme_doc(made, "GBR", version=2)})
    marks = HighWater.of([first, later])
    again = HighWater.from_bytes(marks.to_bytes())
    assert again == marks
    assert again.to_bytes() == marks.to_bytes()
    # What they are for: the same refusals as the marks they were written from.
    with pytest.raises(PolicyDocumentError, match="serial 1 is lower than 2"):
        again.check(first)
    again.check(later)
    assert HighWater.from_bytes(HighWater().to_bytes()) == HighWater()


def test_equal_marks_give_equal_bytes_in_any_order(made: CoalitionDocuments) -> None:
    old = made.bundle()
    raised = with_docs(made, {"schemes/GBR.toml": scheme_doc(made, "GBR", version=2)})
    assert HighWater.of([old, raised]).to_bytes() == HighWater.of([raised, old]).to_bytes()


def test_marks_name_the_bundles_they_cover(made: CoalitionDocuments) -> None:
    first = made.bundle()
    raised = with_docs(made, {"schemes/GBR.toml": scheme_doc(made, "GBR", version=2)})
    marks = HighWater.of([first, raised])
    assert marks.bundles == {first.hash, raised.hash}
    assert HighWater.from_bytes(marks.to_bytes()).bundles == marks.bundles


def test_marks_of_a_newer_broker_say_so(made: CoalitionDocuments) -> None:
    value = msgpack.unpackb(HighWater.of([made.bundle()]).to_bytes())
    value["format"] = 3
    with pytest.raises(ValueError, match="format 3, written by a newer broker"):
        HighWater.from_bytes(msgpack.packb(value))


def test_marks_of_format_1_are_read_as_covering_no_bundle(made: CoalitionDocuments) -> None:
    """Format 1 (no ``bundles``) was stored for a few commits: a start then folds in every
    stored bundle once, as for a store without marks."""
    marks = HighWater.of([made.bundle()])
    value = msgpack.unpackb(marks.to_bytes())
    del value["bundles"]
    value["format"] = 1
    old = HighWater.from_bytes(msgpack.packb(value))
    assert old == dataclasses.replace(marks, bundles=frozenset())


@pytest.mark.parametrize("damage", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"format": 1}),
    "format", "format true", "extra key", "node name", "node twice", "version true", "texts",
    "revocation key", "revoked at true", "root", "bundle hash", "bundle hash short",
    "bundle twice", "format 1 with bundles",
])
def test_anything_but_stored_marks_is_refused(made: CoalitionDocuments,
                                              damage: bytes | str) -> None:
    if isinstance(damage, bytes):
        data = damage
    else:
        value = msgpack.unpackb(HighWater.of([made.bundle()]).to_bytes())
        if damage == "format":
            value["format"] = 0
        elif damage == "format true":
            value["format"] = True
        elif damage == "node twice":
            value["nodes"].append(value["nodes"][0])
        elif damage == "version true":
            value["nodes"][0][2] = True
        elif damage == "revoked at true":
            value["revocations"] = [["USA", "USA-GW2", b"k" * 32, "lost", True]]
        elif damage == "bundle hash":
            value["bundles"] = ["not bytes"]
        elif damage == "bundle hash short":
            value["bundles"] = [b"\x00" * 31]
        elif damage == "format 1 with bundles":
            value["format"] = 1
        elif damage == "bundle twice":
            value["bundles"] = value["bundles"] * 2
        elif damage == "extra key":
            value["extra"] = []
        elif damage == "node name":
            value["nodes"][0][0] = 7
        elif damage == "texts":
            value["nodes"][0][3] = ["not bytes"]
        elif damage == "revocation key":
            value["revocations"] = [["USA", "USA-GW2", "not bytes", "lost", 1]]
        else:
            value["root"] = [1]
        data = msgpack.packb(value)
    with pytest.raises(ValueError):
        HighWater.from_bytes(data)
