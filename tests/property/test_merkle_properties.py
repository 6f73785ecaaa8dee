"""Properties of broker.audit.merkle against a naive transcription of RFC 9162 §2.1.

Exhaustive over every tree of up to 64 leaves (cheap: a few thousand proofs), plus hypothesis
for arbitrary leaf data and mutations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.audit.merkle import (
    MemoryTree,
    completed_nodes,
    leaf_hash,
    node_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from broker.errors import VerificationError

MAX_LEAVES = 64
LEAVES = [leaf_hash(b"leaf %d" % i) for i in range(MAX_LEAVES)]
TREE = MemoryTree(LEAVES)
SIZES = range(1, MAX_LEAVES + 1)


# --- the RFC, transcribed as literally as possible (over lists, O(n), obviously right) ------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(d: Sequence[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return node_hash(naive_mth(d[:k]), naive_mth(d[k:]))


def naive_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*naive_path(m, d[:k]), naive_mth(d[k:])]
    return [*naive_path(m - k, d[k:]), naive_mth(d[:k])]


def naive_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [naive_mth(d)]
    k = _k(len(d))
    if m <= k:
        return [*naive_subproof(m, d[:k], b), naive_mth(d[k:])]
    return [*naive_subproof(m - k, d[k:], False), naive_mth(d[:k])]


# --- helpers -------------------------------------------------------------------------------


def _flip(digest: bytes, bit: int) -> bytes:
    out = bytearray(digest)
    out[bit // 8 % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


def _inclusion_ok(i: int, n: int, leaf: bytes, proof: list[bytes], root: bytes) -> bool:
    try:
        verify_inclusion(i, n, leaf, proof, root)
    except VerificationError:
        return False
    return True


def _consistency_ok(m: int, n: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> bool:
    try:
        verify_consistency(m, n, old_root, new_root, proof)
    except VerificationError:
        return False
    return True


def _all_inclusions() -> list[tuple[int, int]]:
    return [(i, n) for n in SIZES for i in range(n)]


def _all_consistencies() -> list[tuple[int, int]]:
    return [(m, n) for n in SIZES for m in range(1, n + 1)]


# --- exhaustive ------------------------------------------------------------------------------


def test_roots_match_the_naive_definition_at_every_size() -> None:
    for n in range(MAX_LEAVES + 1):
        assert TREE.root(n) == root_hash(LEAVES[:n]) == naive_mth(LEAVES[:n])


def test_every_inclusion_proof_matches_the_rfc_and_verifies() -> None:
    for i, n in _all_inclusions():
        proof = TREE.inclusion_proof(i, n)
        assert proof == naive_path(i, LEAVES[:n])
        verify_inclusion(i, n, LEAVES[i], proof, TREE.root(n))


def test_every_consistency_proof_matches_the_rfc_and_verifies() -> None:
    for m, n in _all_consistencies():
        proof = TREE.consistency_proof(m, n)
        assert proof == naive_subproof(m, LEAVES[:n], True)
        verify_consistency(m, n, TREE.root(m), TREE.root(n), proof)


def test_every_inclusion_proof_rejects_any_single_mutation() -> None:
    for i, n in _all_inclusions():
        proof, root, leaf = TREE.inclusion_proof(i, n), TREE.root(n), LEAVES[i]
        bit = (i * 31 + n) % 256
        for j in range(len(proof)):
            bad = [*proof[:j], _flip(proof[j], bit), *proof[j + 1 :]]
            assert not _inclusion_ok(i, n, leaf, bad, root)
        assert not _inclusion_ok(i, n, _flip(leaf, bit), proof, root)
        assert not _inclusion_ok(i, n, leaf, proof, _flip(root, bit))
        assert not _inclusion_ok(i, n, leaf, [*proof, root], root)  # extended
        if proof:
            assert not _inclusion_ok(i, n, leaf, proof[:-1], root)  # truncated
        if n > 1:  # the same proof does not place the leaf at a neighbouring index
            assert not _inclusion_ok((i + 1) % n, n, leaf, proof, root)


def test_every_consistency_proof_rejects_any_single_mutation() -> None:
    for m, n in _all_consistencies():
        proof, old_root, new_root = TREE.consistency_proof(m, n), TREE.root(m), TREE.root(n)
        bit = (m * 17 + n) % 256
        for j in range(len(proof)):
            bad = [*proof[:j], _flip(proof[j], bit), *proof[j + 1 :]]
            assert not _consistency_ok(m, n, old_root, new_root, bad)
        assert not _consistency_ok(m, n, _flip(old_root, bit), new_root, proof)
        assert not _consistency_ok(m, n, old_root, _flip(new_root, bit), proof)
        assert not _consistency_ok(m, n, old_root, new_root, [*proof, new_root])  # extended
        if proof:
            assert not _consistency_ok(m, n, old_root, new_root, proof[:-1])  # truncated


def test_completed_nodes_agree_with_naive_recomputation() -> None:
    tree = MemoryTree()
    for size in range(MAX_LEAVES):
        for level, index, digest in completed_nodes(size, LEAVES[size], tree.get_node):
            span = 1 << level
            assert (index + 1) * span == size + 1  # it ends exactly at the new leaf
            assert digest == naive_mth(LEAVES[index * span : (index + 1) * span])
        tree.append(LEAVES[size])
    # Every complete node the tree holds is the naive hash of its span.
    for level in range(MAX_LEAVES.bit_length()):
        span = 1 << level
        for index in range(MAX_LEAVES // span):
            assert tree.get_node(level, index) == naive_mth(
                LEAVES[index * span : (index + 1) * span]
            )


# --- hypothesis: arbitrary leaves and mutations --------------------------------------------

leaf_lists = st.lists(st.binary(max_size=16), min_size=1, max_size=MAX_LEAVES)


@settings(max_examples=200, deadline=None)
@given(leaf_lists)
def test_memory_tree_root_equals_root_hash(data: list[bytes]) -> None:
    leaves = [leaf_hash(d) for d in data]
    tree = MemoryTree(leaves)
    assert tree.size == len(leaves)
    assert tree.root() == root_hash(leaves) == naive_mth(leaves)


@settings(max_examples=300, deadline=None)
@given(leaf_lists, st.data())
def test_random_inclusion_proofs_verify_and_resist_bit_flips(
    data: list[bytes], draw: st.DataObject
) -> None:
    leaves = [leaf_hash(d) for d in data]
    tree = MemoryTree(leaves)
    n = draw.draw(st.integers(1, len(leaves)), label="size")
    i = draw.draw(st.integers(0, n - 1), label="index")
    proof, root = tree.inclusion_proof(i, n), tree.root(n)
    verify_inclusion(i, n, leaves[i], proof, root)
    target = draw.draw(st.integers(0, len(proof) + 1), label="target")  # proof hash, root, leaf
    bit = draw.draw(st.integers(0, 255), label="bit")
    if target < len(proof):
        proof = [*proof[:target], _flip(proof[target], bit), *proof[target + 1 :]]
    elif target == len(proof):
        root = _flip(root, bit)
    else:
        leaves[i] = _flip(leaves[i], bit)
    with pytest.raises(VerificationError):
        verify_inclusion(i, n, leaves[i], proof, root)


@settings(max_examples=300, deadline=None)
@given(leaf_lists, st.data())
def test_random_consistency_proofs_verify_and_resist_bit_flips(
    data: list[bytes], draw: st.DataObject
) -> None:
    leaves = [leaf_hash(d) for d in data]
    tree = MemoryTree(leaves)
    n = draw.draw(st.integers(1, len(leaves)), label="new")
    m = draw.draw(st.integers(1, n), label="old")
    proof, old_root, new_root = tree.consistency_proof(m, n), tree.root(m), tree.root(n)
    verify_consistency(m, n, old_root, new_root, proof)
    target = draw.draw(st.integers(0, len(proof) + 1), label="target")  # proof hash, roots
    bit = draw.draw(st.integers(0, 255), label="bit")
    if target < len(proof):
        proof = [*proof[:target], _flip(proof[target], bit), *proof[target + 1 :]]
    elif target == len(proof):
        old_root = _flip(old_root, bit)
    else:
        new_root = _flip(new_root, bit)
    with pytest.raises(VerificationError):
        verify_consistency(m, n, old_root, new_root, proof)


@settings(max_examples=200, deadline=None)
@given(leaf_lists, st.data())
def test_proofs_for_a_different_tree_do_not_verify(data: list[bytes], draw: st.DataObject) -> None:
    leaves = [leaf_hash(d) for d in data]
    n = len(leaves)
    i = draw.draw(st.integers(0, n - 1), label="changed leaf")
    forged = [*leaves[:i], leaf_hash(data[i] + b"!"), *leaves[i + 1 :]]
    tree, forged_tree = MemoryTree(leaves), MemoryTree(forged)
    # A forged leaf cannot be proven into the real root...
    with pytest.raises(VerificationError):
        verify_inclusion(i, n, forged[i], forged_tree.inclusion_proof(i, n), tree.root())
    # ...and a history rewritten below an old checkpoint is never consistent with it.
    if i + 1 < n:
        m = draw.draw(st.integers(i + 1, n - 1), label="old size")
        with pytest.raises(VerificationError):
            verify_consistency(
                m, n, tree.root(m), forged_tree.root(), forged_tree.consistency_proof(m, n)
            )
