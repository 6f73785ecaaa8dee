"""The published RFC 6962 / RFC 9162 test vectors (transparency-dev/merkle reference set)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.audit.merkle import (
    MemoryTree,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from broker.errors import VerificationError

VECTORS: dict[str, Any] = json.loads((Path(__file__).parent / "rfc6962.json").read_text())
LEAVES = [leaf_hash(bytes.fromhex(data)) for data in VECTORS["leaf_inputs_hex"]]
TREE = MemoryTree(LEAVES)


def _hashes(items: list[str]) -> list[bytes]:
    return [bytes.fromhex(item) for item in items]


def test_leaf_hashes_match_vectors() -> None:
    assert [h.hex() for h in LEAVES] == VECTORS["leaf_hashes"]


@pytest.mark.parametrize(("size", "root"), sorted(VECTORS["roots_by_size"].items()))
def test_roots_by_size(size: str, root: str) -> None:
    n = int(size)
    assert root_hash(LEAVES[:n]).hex() == root
    assert TREE.root(n).hex() == root
    assert MemoryTree(LEAVES[:n]).root().hex() == root


@pytest.mark.parametrize("case", VECTORS["inclusion"], ids=lambda c: f"{c['index']}of{c['size']}")
def test_inclusion_vectors(case: dict[str, Any]) -> None:
    proof = TREE.inclusion_proof(case["index"], case["size"])
    assert [p.hex() for p in proof] == case["proof"]
    verify_inclusion(
        case["index"],
        case["size"],
        bytes.fromhex(case["leaf_hash"]),
        _hashes(case["proof"]),
        bytes.fromhex(case["root"]),
    )


@pytest.mark.parametrize(
    "case", VECTORS["consistency"], ids=lambda c: f"{c['old_size']}to{c['new_size']}"
)
def test_consistency_vectors(case: dict[str, Any]) -> None:
    proof = TREE.consistency_proof(case["old_size"], case["new_size"])
    assert [p.hex() for p in proof] == case["proof"]
    verify_consistency(
        case["old_size"],
        case["new_size"],
        bytes.fromhex(case["old_root"]),
        bytes.fromhex(case["new_root"]),
        _hashes(case["proof"]),
    )


@pytest.mark.parametrize("case", VECTORS["consistency_must_fail"], ids=lambda c: c["why"])
def test_consistency_must_fail_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(VerificationError) as info:
        verify_consistency(
            case["old_size"],
            case["new_size"],
            bytes.fromhex(case["old_root"]),
            bytes.fromhex(case["new_root"]),
            _hashes(case["proof"]),
        )
    assert info.value.code == "bad_proof"
