"""The demo coalition (broker/examples.py) and its committed copy (policies/examples/): what the
issue asks of it holds, its agreements decide as documented, and the committed copy loads and
matches the generator."""

from __future__ import annotations

import functools
import re
import unicodedata
from pathlib import Path

import pytest

from broker import bench_policy, examples
from broker.release import UNKNOWN_NODE
from clients.gateway import label
from policies.bundle import Bundle, document_hash
from policies.decide import REASON_CODES, decide
from policies.loader import load_bundle, read_policy_dir
from policies.model import RESTRICTIVE, Label

NOW = 1_800_000_000_000
COMMITTED = Path(__file__).resolve().parents[2] / "policies" / "examples"


@functools.cache
def bundle() -> Bundle:
    return examples.example_documents(NOW).bundle()


def test_five_nations_each_with_its_own_scheme_and_equivalence() -> None:
    b = bundle()
    assert set(b.trust_root.nations) == set(examples.NATIONS) and len(examples.NATIONS) >= 5
    common = b.common_scheme
    assert common is not None
    for nation in examples.NATIONS:
        scheme = b.schemes[nation]
        assert not scheme.identity
        assert set(scheme.level_map) == set(scheme.levels)  # every national level maps
        assert set(scheme.level_map.values()) <= set(common.levels)
    assert b.schemes["FRA"].levels[-1] == "TRÈS SECRET"
    assert b.schemes["DEU"].levels[0] == "VS-NUR FÜR DEN DIENSTGEBRAUCH"


def test_non_ascii_level_names_load_as_written_in_nfc() -> None:
    b = bundle()
    for nation in examples.NATIONS:
        for level in b.schemes[nation].levels:
            assert unicodedata.normalize("NFC", level) == level
    assert "ŚCIŚLE TAJNE" in b.schemes["POL"].levels


def test_agreements_have_inner_and_partner_tiers_one_expired_and_ntk_restricted() -> None:
    b = bundle()
    active = [a for a in b.agreements if a.is_active_at(NOW)]
    expired = [a for a in b.agreements if a.not_after <= NOW]
    assert len(active) >= 2 and [a.id for a in expired] == [examples.RHINE_LIAISON]
    tiers = {(a.id, t.name): t for a in active for t in a.tiers}
    assert tiers[(examples.ATLANTIC_SHIELD, examples.CORE_TIER)].ceiling == "SECRET"
    partners = tiers[(examples.ATLANTIC_SHIELD, examples.PARTNER_TIER)]
    assert partners.ceiling == "RESTRICTED" and partners.categories == {examples.NTK: ()}
    assert b.common_scheme is not None
    assert b.common_scheme.tags[examples.NTK].type == RESTRICTIVE


def _decide(lab: Label, sender: str, recipient: str,
            topic: str) -> tuple[str | None, tuple[str, ...]]:
    b = bundle()
    decision = decide(lab, b.nodes[sender], b.nodes[recipient], topic, NOW, b)
    return decision.via, decision.reasons


def _ref(agreement_id: str, tier: str) -> str:
    ref = next(a.ref for a in examples.agreements(NOW) if a.id == agreement_id)
    return f"{ref}/{tier}"


@pytest.mark.parametrize(("lab", "sender", "recipient", "topic", "via", "reasons"), [
    (label("USA", "SECRET", "USA", ["NATO"]), "USA-GW1", "GBR-GW1", "maritime.tracks",
     _ref(examples.ATLANTIC_SHIELD, examples.CORE_TIER), ()),
    (label("GBR", "OFFICIAL-SENSITIVE", "GBR", ["POL"]), "GBR-GW1", "POL-GW1", "maritime.x",
     _ref(examples.ATLANTIC_SHIELD, examples.PARTNER_TIER), ()),
    (label("FRA", "CONFIDENTIEL", "FRA", ["POL"]), "FRA-GW1", "POL-GW1", "maritime.x",
     None, ("above_ceiling",)),
    (label("GBR", "OFFICIAL-SENSITIVE", "GBR", ["POL"], {"NTK": ["ALPHA"]}), "GBR-GW1",
     "POL-GW1", "land.x", _ref(examples.EASTERN_SENTRY, examples.INNER_TIER), ()),
    (label("FRA", "DIFFUSION RESTREINTE", "FRA", ["POL"], {"BESOIN": ["ALPHA"]}), "FRA-GW1",
     "POL-GW1", "maritime.x", None, ("category_not_covered",)),
    (label("USA", "SECRET", "USA", ["FRA"], {"NTK": ["ALPHA"]}), "USA-GW1", "FRA-GW1",
     "maritime.x", None, ("recipient_not_accredited",)),
    (label("FRA", "CONFIDENTIEL", "FRA", ["DEU"]), "FRA-GW1", "DEU-GW1", "land.x",
     None, ("agreement_inactive",)),
    (label("DEU", "GEHEIM", "DEU", ["NATO"]), "DEU-GW1", "POL-GW1", "land.x",
     _ref(examples.EASTERN_SENTRY, examples.INNER_TIER), ()),
    (label("POL", "TAJNE", "POL", ["DEU"]), "POL-GW1", "DEU-GW1", "maritime.x",
     None, ("topic_not_covered",)),
    (label("USA", "SECRET", "USA", ["USA"]), "USA-GW1", examples.OFFLINE_NODE, "any.topic",
     None, ()),
    (label("USA", "SECRET", "USA", ["FRA"]), "USA-GW1", examples.EXPIRED_NODE, "maritime.x",
     None, ("node_inactive",)),
])
def test_example_agreements_decide_as_the_demo_describes(
        lab: Label, sender: str, recipient: str, topic: str, via: str | None,
        reasons: tuple[str, ...]) -> None:
    assert _decide(lab, sender, recipient, topic) == (via, reasons)


def test_write_examples_makes_a_loadable_directory_and_regenerates_in_place(
        tmp_path: Path) -> None:
    first = examples.write_examples(tmp_path, NOW)
    (tmp_path / "notes.txt").write_text("not generated")
    second = examples.write_examples(tmp_path, NOW)  # replaces keys without FileExistsError
    assert first.root_sha256 != second.root_sha256  # fresh keys each time
    loaded = load_bundle(tmp_path, pinned_root_sha256=second.root_sha256)
    assert set(loaded.documents) == set(second.documents)
    assert (tmp_path / "notes.txt").read_text() == "not generated"
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "throwaway" in readme and second.root_sha256.hex() in readme
    assert examples.REGENERATE in readme
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == sorted(
        [f"authority-{n}.key" for n in examples.NATIONS] + ["broker.key"]
        + [f"{spec.node}.key" for spec in examples.nodes(NOW)])


def test_write_examples_refuses_a_non_empty_directory_that_is_not_a_policy_directory(
        tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("someone else's")
    with pytest.raises(FileExistsError):
        examples.write_examples(tmp_path, NOW)
    assert (tmp_path / "README.md").read_text() == "someone else's"


def test_committed_examples_load_pinned_to_their_readme() -> None:
    readme = (COMMITTED / "README.md").read_text(encoding="utf-8")
    pinned = re.search(r"\b([0-9a-f]{64})\b", readme)
    assert pinned is not None, "README.md names the trust root hash"
    documents = read_policy_dir(COMMITTED)
    assert document_hash(documents["trust-root.toml"]).hex() == pinned.group(1)
    load_bundle(COMMITTED, pinned_root_sha256=bytes.fromhex(pinned.group(1)))


def test_committed_examples_match_the_generator() -> None:
    """Regenerate with ``python -m broker.examples policies/examples`` if this fails."""
    committed = load_bundle(COMMITTED, pinned_root_sha256=None)
    generated = bundle()
    assert set(committed.documents) == set(generated.documents)
    assert committed.schemes == generated.schemes
    assert committed.trust_root.communities == generated.trust_root.communities
    # Agreements and certificates as generated, but for their validity windows.
    for mine, theirs in zip(committed.agreements, generated.agreements, strict=True):
        assert (mine.ref, mine.parties, mine.tiers, mine.purpose) == (
            theirs.ref, theirs.parties, theirs.tiers, theirs.purpose)
        assert mine.not_after - mine.not_before == theirs.not_after - theirs.not_before
    for node, cert in committed.nodes.items():
        assert (cert.nation, cert.accreditation) == (
            generated.nodes[node].nation, generated.nodes[node].accreditation)


# --- the documentation and the benchmark built on the examples' conventions --------------------


def test_policy_doc_explains_every_reason_code() -> None:
    doc = (COMMITTED.parents[1] / "docs" / "policy.md").read_text(encoding="utf-8")
    table_rows = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.MULTILINE))
    assert set(REASON_CODES) | {UNKNOWN_NODE} <= table_rows


def test_policy_benchmark_runs_on_a_small_synthetic_coalition() -> None:
    assert len(bench_policy.synthetic_bundle(6, 9).agreements) == 9
    measures = bench_policy.measure_all(bench_policy.coalition_cases(6, 9, ops=3), rounds=1)
    assert {m.name for m in measures} >= {"DecisionCache hit", "DecisionCache miss "
                                          "(decide + key + interval)"}
    assert all(m.seconds > 0 and m.ops >= 3 for m in measures)
    assert len(bench_policy.report(measures).splitlines()) == len(measures) + 1
