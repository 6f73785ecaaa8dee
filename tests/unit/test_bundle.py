"""Policy bundles: the directory layout, all-or-nothing loading, the hash, the agreement index."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.coalition import build_coalition
from broker.errors import PolicyDocumentError
from policies.bundle import build_bundle, bundle_hash
from policies.documents import SignedDocument
from policies.loader import load_bundle
from tests.unit.test_decide import (
    CORE,
    GBR_SCHEME,
    LOGISTICS,
    NATIONS,
    NODES,
    NOW,
    OLD,
    make_world,
)


def test_policy_directory_with_schemes_and_agreements_loads(tmp_path: Path) -> None:
    c = build_coalition(tmp_path, nations=NATIONS, nodes=NODES, now_ms=NOW,
                        schemes={"GBR": GBR_SCHEME}, agreements=[CORE, OLD])
    names = sorted(str(p.relative_to(c.policy_dir)) for p in c.policy_dir.rglob("*.toml"))
    assert names == ["agreements/CORE.toml", "agreements/OLD.toml",
                     *[f"nodes/{n.node}.toml" for n in sorted(NODES, key=lambda n: n.node)],
                     *[f"schemes/{n}.toml" for n in sorted((*NATIONS, "NATO"))],
                     "trust-root.toml"]
    bundle = load_bundle(c.policy_dir, pinned_root_sha256=c.root_sha256)
    assert [a.id for a in bundle.agreements] == ["CORE", "OLD"]
    assert bundle.common_scheme is not None and bundle.common_scheme.name == "NATO"


def test_default_coalition_has_one_agreement_with_every_nation(tmp_path: Path) -> None:
    c = build_coalition(tmp_path, nations=("FRA", "USA"), nodes=(), now_ms=NOW)
    (agreement,) = c.bundle().agreements
    assert agreement.ref == "COALITION-DEFAULT@1" and agreement.parties == ("FRA", "USA")
    assert agreement.tiers[0].ceiling == "TOP SECRET" and agreement.is_active_at(NOW)


def test_missing_signature_file_refuses_the_directory(tmp_path: Path) -> None:
    c = build_coalition(tmp_path, nations=NATIONS, nodes=(), now_ms=NOW, agreements=[CORE])
    (c.policy_dir / "agreements" / "CORE.toml.sig").unlink()
    with pytest.raises(PolicyDocumentError, match="no signature file") as caught:
        load_bundle(c.policy_dir, pinned_root_sha256=c.root_sha256)
    assert caught.value.document == "agreements/CORE.toml"


def test_every_missing_signature_file_is_named_in_one_refusal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator learns of all unsigned documents at once (sorted), and nothing loads."""
    c = build_coalition(tmp_path, nations=NATIONS, nodes=NODES, now_ms=NOW,
                        agreements=[CORE, OLD])
    missing = ["trust-root.toml", "nodes/GBR-GW1.toml", "agreements/OLD.toml"]
    for name in missing:
        (c.policy_dir / f"{name}.sig").unlink()
    read: list[Path] = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: read.append(p) or read_bytes(p))
    with pytest.raises(PolicyDocumentError) as caught:
        load_bundle(c.policy_dir, pinned_root_sha256=c.root_sha256)
    assert caught.value.code == "unsigned" and caught.value.document == "agreements/OLD.toml"
    assert caught.value.reason == (
        "agreements/OLD.toml: unsigned: no signature files agreements/OLD.toml.sig, "
        "nodes/GBR-GW1.toml.sig, trust-root.toml.sig (3 documents)")
    assert read == []  # refused before any document is read


def test_unknown_kind_of_document_refuses_the_bundle() -> None:
    w = make_world()
    stray = SignedDocument("misc/notes.toml", b"x = 1\n", b"")
    with pytest.raises(PolicyDocumentError, match="unknown kind of document"):
        build_bundle({**w.documents, stray.name: stray}, pinned_root_sha256=w.root_sha256)


def test_hash_changes_with_any_document_and_not_with_order() -> None:
    w = make_world()
    docs = dict(w.documents)
    assert bundle_hash(dict(reversed(list(docs.items())))) == bundle_hash(docs)
    without = {k: v for k, v in docs.items() if k != "agreements/OLD.toml"}
    assert bundle_hash(without) != bundle_hash(docs)
    assert w.bundle().hash == bundle_hash(docs)


def test_candidates_index_every_party_to_every_tier_member() -> None:
    bundle = make_world().bundle()
    assert [(a.id, t.name) for a, t in bundle.candidates("USA", "GBR")] == [
        ("CORE", "core"), ("LOGISTICS", "logistics")]
    assert [(a.id, t.name) for a, t in bundle.candidates("FRA", "POL")] == [("CORE", "partners")]
    assert bundle.candidates("FRA", "DEU") == ()
    assert LOGISTICS in bundle.agreements
