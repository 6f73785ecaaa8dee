"""A policy directory on disk: what loads, and what is refused with the file and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.coalition import Coalition
from broker.errors import PolicyDocumentError
from policies import authoring
from policies.loader import load_bundle


def load(coalition: Coalition) -> None:
    load_bundle(coalition.policy_dir, pinned_root_sha256=coalition.root_sha256)


def test_generated_coalition_loads(coalition: Coalition) -> None:
    bundle = load_bundle(coalition.policy_dir, pinned_root_sha256=coalition.root_sha256)
    assert set(bundle.nodes) == {"FRA-GW1", "FRA-OLD", "GBR-GW1", "USA-GW1", "USA-GW2"}
    assert bundle.nodes["GBR-GW1"].enc_key == coalition.nodes["GBR-GW1"].enc_public
    assert len(bundle.hash) == 32


def test_unsigned_certificate_is_refused_naming_the_file(coalition: Coalition) -> None:
    (coalition.policy_dir / "nodes" / "GBR-GW1.toml.sig").unlink()
    with pytest.raises(PolicyDocumentError) as caught:
        load(coalition)
    assert caught.value.document == "nodes/GBR-GW1.toml"
    assert "unsigned" in caught.value.reason


def test_tampered_certificate_is_refused_naming_the_missing_signer(coalition: Coalition) -> None:
    path = coalition.policy_dir / "nodes" / "GBR-GW1.toml"
    path.write_bytes(path.read_bytes().replace(b'max = "SECRET"', b'max = "TOP SECRET"'))
    with pytest.raises(PolicyDocumentError) as caught:
        load(coalition)
    assert caught.value.document == "nodes/GBR-GW1.toml"
    assert "signature by GBR" in caught.value.reason


def test_certificate_signed_by_another_nation_is_refused(coalition: Coalition) -> None:
    path = coalition.policy_dir / "nodes" / "GBR-GW1.toml"
    # USA signs a certificate for a GBR node: USA has no authority over GBR's nodes.
    path.with_name(path.name + ".sig").write_bytes(authoring.signature_file(
        path.read_bytes(), [("USA", coalition.authorities["USA"].signing_key)]))
    with pytest.raises(PolicyDocumentError, match="signature by GBR"):
        load(coalition)


def test_trust_root_other_than_the_pinned_one_is_refused(coalition: Coalition) -> None:
    root = coalition.policy_dir / "trust-root.toml"
    root.write_bytes(root.read_bytes() + b"\n# edited\n")
    with pytest.raises(PolicyDocumentError) as caught:
        load(coalition)
    assert caught.value.code == "unpinned"


def test_trust_root_below_its_threshold_is_refused(coalition: Coalition, tmp_path: Path) -> None:
    root = coalition.policy_dir / "trust-root.toml"
    data = root.read_bytes()
    # Only one nation signs; the root demands two of three.
    root.with_name("trust-root.toml.sig").write_bytes(authoring.signature_file(
        data, [("USA", coalition.authorities["USA"].signing_key)]))
    with pytest.raises(PolicyDocumentError) as caught:
        load(coalition)
    assert "threshold is 2" in caught.value.reason
    assert caught.value.document == "trust-root.toml"


def test_certificate_of_unknown_nation_is_refused(coalition: Coalition) -> None:
    path = coalition.policy_dir / "nodes" / "GBR-GW1.toml"
    path.write_bytes(path.read_bytes().replace(b'nation = "GBR"', b'nation = "XYZ"'))
    with pytest.raises(PolicyDocumentError, match="XYZ is not a nation of the trust root"):
        load(coalition)
