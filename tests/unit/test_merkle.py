"""Behaviour and every rejection path of broker.audit.merkle."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from broker.audit import merkle
from broker.audit.merkle import (
    EMPTY_ROOT,
    STORED_LEVEL_STEP,
    MemoryTree,
    StoredNodeCheck,
    completed_nodes,
    consistency_proof,
    inclusion_proof,
    is_stored_level,
    leaf_hash,
    node_from_stored,
    node_hash,
    root_from_inclusion,
    root_hash,
    subtree_root,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from broker.errors import VerificationError

LEAVES = [leaf_hash(b"entry %d" % i) for i in range(16)]
TREE = MemoryTree(LEAVES)
H = hashlib.sha256(b"some other hash").digest()


def _bad_proof(call: Callable[[], None], reason_part: str) -> None:
    with pytest.raises(VerificationError) as info:
        call()
    assert info.value.code == "bad_proof"
    assert reason_part in info.value.reason


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    assert leaf_hash(b"\x01ab") != node_hash(b"a", b"b")


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert root_hash([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert MemoryTree().root() == EMPTY_ROOT
    assert tree_root(0, MemoryTree().get_node) == EMPTY_ROOT


def test_small_tree_shapes() -> None:
    a, b, c = LEAVES[:3]
    assert root_hash([a]) == a
    assert root_hash([a, b]) == node_hash(a, b)
    # RFC 6962 splits at the largest power of two below n: ((a b) c), not (a (b c)).
    assert root_hash([a, b, c]) == node_hash(node_hash(a, b), c)


def test_memory_tree_root_at_every_past_size() -> None:
    for size in range(len(LEAVES) + 1):
        assert TREE.root(size) == root_hash(LEAVES[:size])
    assert TREE.size == len(LEAVES)


def test_subtree_root_of_an_incomplete_range() -> None:
    # [8, 14) = node(2, 2) + node(1, 6).
    expected = node_hash(TREE.get_node(2, 2), TREE.get_node(1, 6))
    assert subtree_root(8, 14, TREE.get_node) == expected == root_hash(LEAVES[8:14])


@pytest.mark.parametrize(("start", "end"), [(0, 0), (3, 3), (5, 4), (-1, 1), (2, 5), (4, 9)])
def test_subtree_root_rejects_empty_negative_or_unaligned_ranges(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="aligned"):
        subtree_root(start, end, TREE.get_node)


def test_tree_root_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError):
        tree_root(-1, TREE.get_node)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (5, 5), (6, 5), (-1, 5)])
def test_inclusion_proof_rejects_an_index_outside_the_tree(index: int, size: int) -> None:
    with pytest.raises(ValueError):
        inclusion_proof(index, size, TREE.get_node)


@pytest.mark.parametrize(("old", "new"), [(0, 5), (0, 0), (6, 5), (-1, 3)])
def test_consistency_proof_rejects_bad_sizes(old: int, new: int) -> None:
    with pytest.raises(ValueError):
        consistency_proof(old, new, TREE.get_node)


def test_consistency_proof_between_equal_sizes_is_empty() -> None:
    assert TREE.consistency_proof(7, 7) == []


def test_memory_tree_refuses_sizes_beyond_its_leaves() -> None:
    with pytest.raises(ValueError):
        TREE.root(17)
    with pytest.raises(ValueError):
        TREE.inclusion_proof(0, 17)
    with pytest.raises(ValueError):
        TREE.consistency_proof(1, 17)


@pytest.mark.parametrize(("level", "index"), [(0, 16), (4, 1), (5, 0), (-1, 0), (0, -1)])
def test_memory_tree_get_node_refuses_absent_nodes(level: int, index: int) -> None:
    with pytest.raises(IndexError):
        TREE.get_node(level, index)


def test_completed_nodes_lists_the_leaf_and_every_parent_it_completes() -> None:
    tree = MemoryTree(LEAVES[:7])
    nodes = completed_nodes(7, LEAVES[7], tree.get_node)
    assert [(level, index) for level, index, _ in nodes] == [(0, 7), (1, 3), (2, 1), (3, 0)]
    assert nodes[-1][2] == root_hash(LEAVES[:8])
    assert completed_nodes(8, LEAVES[8], TREE.get_node) == [(0, 8, LEAVES[8])]


def test_memory_tree_refuses_a_leaf_that_is_not_a_hash() -> None:
    with pytest.raises(ValueError):
        MemoryTree().append(b"raw entry bytes")


def test_completed_nodes_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError):
        completed_nodes(-1, LEAVES[0], TREE.get_node)


class _CountingStore:
    """A fake store for a huge tree: any node hash is made up; only the reads are counted."""

    def __init__(self) -> None:
        self.reads = 0

    def get_node(self, level: int, index: int) -> bytes:
        self.reads += 1
        return hashlib.sha256(b"%d/%d" % (level, index)).digest()


@pytest.mark.parametrize("size", [2**20, 2**20 + 1, 1_000_003, 2**31 - 1])
def test_proofs_and_roots_cost_logarithmic_reads(size: int) -> None:
    bound = 2 * size.bit_length() + 1
    for call in (
        lambda s: tree_root(size, s.get_node),
        lambda s: inclusion_proof(size // 3, size, s.get_node),
        lambda s: inclusion_proof(size - 1, size, s.get_node),
        lambda s: consistency_proof(size // 3 + 1, size, s.get_node),
        lambda s: consistency_proof(size - 1, size, s.get_node),
    ):
        store = _CountingStore()
        call(store)
        assert store.reads <= bound


# --- the stored levels -------------------------------------------------------------------

BIG = MemoryTree(leaf_hash(b"big %d" % i) for i in range(600))


def _stored_run(tree: MemoryTree) -> Callable[[int, int, int], list[bytes]]:
    """What a log's store answers: leaf hashes (from its entries) and stored levels only."""

    def run(level: int, first: int, count: int) -> list[bytes]:
        assert level == 0 or is_stored_level(level)
        assert count <= 2 ** (STORED_LEVEL_STEP - 1)
        return [tree.get_node(level, i) for i in range(first, first + count)]

    return run


def test_only_every_fourth_level_above_the_leaves_is_stored() -> None:
    assert [lvl for lvl in range(13) if is_stored_level(lvl)] == [4, 8, 12]


def test_every_node_is_recomputed_from_the_stored_levels() -> None:
    run = _stored_run(BIG)
    for level in range(10):
        for index in range(600 >> level):
            assert node_from_stored(level, index, run) == BIG.get_node(level, index)


def test_a_short_run_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 4 hashes at level 4, got 3"):
        node_from_stored(6, 0, lambda level, first, count: [H] * (count - 1))
    with pytest.raises(ValueError):
        node_from_stored(-1, 0, _stored_run(BIG))


@pytest.mark.parametrize("size", [2**20 + 1, 1_000_003, 2**31 - 1])
def test_proofs_from_the_stored_levels_still_cost_logarithmic_reads(size: int) -> None:
    runs: list[int] = []

    def run(level: int, first: int, count: int) -> list[bytes]:
        runs.append(count)
        return [hashlib.sha256(b"%d/%d" % (level, i)).digest() for i in range(first, first + count)]

    def get_node(level: int, index: int) -> bytes:
        return node_from_stored(level, index, run)

    inclusion_proof(size // 3, size, get_node)
    consistency_proof(size // 3 + 1, size, get_node)
    assert len(runs) <= 2 * (2 * size.bit_length() + 1)
    assert max(runs) <= 2 ** (STORED_LEVEL_STEP - 1)


def _check_rebuild(stored: dict[int, list[bytes]], size: int = 300) -> str | None:
    check = StoredNodeCheck(lambda level: iter(enumerate(stored.get(level, []))))
    rebuilt = MemoryTree()
    for i in range(size):
        leaf = BIG.get_node(0, i)
        check.check(completed_nodes(rebuilt.size, leaf, rebuilt.get_node))
        rebuilt.append(leaf)
    return check.problem()


def _stored_levels(size: int = 300) -> dict[int, list[bytes]]:
    return {lvl: [BIG.get_node(lvl, i) for i in range(size >> lvl)] for lvl in (4, 8)}


def test_the_stored_node_check_passes_the_nodes_of_the_entries() -> None:
    assert _check_rebuild(_stored_levels()) is None


def test_the_stored_node_check_finds_a_changed_or_missing_node() -> None:
    changed = _stored_levels()
    changed[4][3] = H
    assert _check_rebuild(changed) == ("the stored tree node over entries 48 to 63 does not "
                                       "match them")
    missing = _stored_levels()
    del missing[8][0]
    assert _check_rebuild(missing) == ("the stored tree node over entries 0 to 255 does not "
                                       "match them")


def test_the_stored_node_check_finds_a_node_beyond_the_entries() -> None:
    extra = _stored_levels()
    extra[4].append(H)
    assert _check_rebuild(extra) == ("a tree node is stored beyond the entries (level 4, "
                                     "index 18)")
    unreached = {**_stored_levels(), 12: [H]}
    assert _check_rebuild(unreached) == ("a tree node is stored beyond the entries (level 12, "
                                         "index 0)")


# --- verify_inclusion ---------------------------------------------------------------------


def _inclusion(index: int, size: int) -> tuple[list[bytes], bytes]:
    return TREE.inclusion_proof(index, size), TREE.root(size)


def test_inclusion_proof_verifies() -> None:
    proof, root = _inclusion(5, 11)
    verify_inclusion(5, 11, LEAVES[5], proof, root)
    assert root_from_inclusion(5, 11, LEAVES[5], proof) == root


def test_inclusion_with_wrong_root_is_rejected() -> None:
    proof, _ = _inclusion(5, 11)
    _bad_proof(lambda: verify_inclusion(5, 11, LEAVES[5], proof, H), "does not lead")


def test_inclusion_of_wrong_leaf_is_rejected() -> None:
    proof, root = _inclusion(5, 11)
    _bad_proof(lambda: verify_inclusion(5, 11, LEAVES[6], proof, root), "does not lead")


def test_inclusion_at_wrong_index_is_rejected() -> None:
    proof, root = _inclusion(5, 11)
    _bad_proof(lambda: verify_inclusion(4, 11, LEAVES[5], proof, root), "does not lead")


@pytest.mark.parametrize(("index", "size"), [(11, 11), (12, 11), (0, 0), (-1, 11)])
def test_inclusion_index_outside_tree_is_rejected(index: int, size: int) -> None:
    _bad_proof(lambda: verify_inclusion(index, size, LEAVES[0], [], TREE.root()), "not in a tree")


def test_inclusion_proof_too_long_is_rejected() -> None:
    proof, root = _inclusion(5, 11)
    _bad_proof(lambda: verify_inclusion(5, 11, LEAVES[5], [*proof, H], root), "too long")


def test_inclusion_proof_too_short_is_rejected() -> None:
    proof, root = _inclusion(5, 11)
    _bad_proof(lambda: verify_inclusion(5, 11, LEAVES[5], proof[:-1], root), "too short")


def test_inclusion_proof_in_single_leaf_tree_must_be_empty() -> None:
    verify_inclusion(0, 1, LEAVES[0], [], LEAVES[0])
    _bad_proof(lambda: verify_inclusion(0, 1, LEAVES[0], [H], LEAVES[0]), "too long")


@pytest.mark.parametrize("which", ["leaf", "root", "proof"])
def test_inclusion_with_a_hash_of_the_wrong_length_is_rejected(which: str) -> None:
    proof, root = _inclusion(5, 11)
    leaf = LEAVES[5][:31] if which == "leaf" else LEAVES[5]
    root = root + b"\x00" if which == "root" else root
    proof = [proof[0][:-1], *proof[1:]] if which == "proof" else proof
    _bad_proof(lambda: verify_inclusion(5, 11, leaf, proof, root), "bytes, not 32")


# --- verify_consistency -------------------------------------------------------------------


def _consistency(old: int, new: int) -> tuple[list[bytes], bytes, bytes]:
    return TREE.consistency_proof(old, new), TREE.root(old), TREE.root(new)


@pytest.mark.parametrize(("old", "new"), [(1, 2), (3, 7), (4, 16), (7, 8), (9, 13), (12, 12)])
def test_consistency_proof_verifies(old: int, new: int) -> None:
    proof, old_root, new_root = _consistency(old, new)
    verify_consistency(old, new, old_root, new_root, proof)


def test_consistency_proof_from_size_zero_is_rejected() -> None:
    _, _, new_root = _consistency(1, 9)
    _bad_proof(lambda: verify_consistency(0, 9, EMPTY_ROOT, new_root, []), "size 0")
    _bad_proof(lambda: verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, []), "size 0")


def test_consistency_from_a_negative_size_is_rejected() -> None:
    _bad_proof(lambda: verify_consistency(-1, 9, H, H, []), "size -1")


def test_consistency_with_old_larger_than_new_is_rejected() -> None:
    proof, old_root, new_root = _consistency(5, 9)
    _bad_proof(lambda: verify_consistency(9, 5, new_root, old_root, proof), "larger")


def test_consistency_between_equal_sizes_needs_an_empty_proof() -> None:
    root = TREE.root(6)
    verify_consistency(6, 6, root, root, [])
    _bad_proof(lambda: verify_consistency(6, 6, root, root, [H]), "must be empty")


def test_consistency_between_equal_sizes_needs_equal_roots() -> None:
    _bad_proof(lambda: verify_consistency(6, 6, TREE.root(6), H, []), "different roots")


def test_consistency_with_an_empty_proof_between_different_sizes_is_rejected() -> None:
    _bad_proof(lambda: verify_consistency(4, 8, TREE.root(4), TREE.root(8), []), "empty")


def test_consistency_proof_too_long_is_rejected() -> None:
    proof, old_root, new_root = _consistency(5, 9)
    _bad_proof(lambda: verify_consistency(5, 9, old_root, new_root, [*proof, H]), "too long")


def test_consistency_proof_too_short_is_rejected() -> None:
    proof, old_root, new_root = _consistency(5, 9)
    _bad_proof(lambda: verify_consistency(5, 9, old_root, new_root, proof[:-1]), "too short")


def test_consistency_with_wrong_old_root_is_rejected() -> None:
    proof, _, new_root = _consistency(5, 9)
    _bad_proof(lambda: verify_consistency(5, 9, H, new_root, proof), "old root")


def test_consistency_with_wrong_new_root_is_rejected() -> None:
    proof, old_root, _ = _consistency(5, 9)
    _bad_proof(lambda: verify_consistency(5, 9, old_root, H, proof), "new root")


def test_consistency_from_power_of_two_with_wrong_old_root_is_rejected() -> None:
    # A power-of-two old tree is a node of the new one: its root is not in the proof but is
    # prepended to the path (step 2), so a wrong one surfaces as a new-root mismatch.
    proof, _, new_root = _consistency(4, 9)
    _bad_proof(lambda: verify_consistency(4, 9, H, new_root, proof), "new root")


@pytest.mark.parametrize("which", ["old", "new", "proof"])
def test_consistency_with_a_hash_of_the_wrong_length_is_rejected(which: str) -> None:
    proof, old_root, new_root = _consistency(5, 9)
    old_root = old_root[:-1] if which == "old" else old_root
    new_root = new_root + b"\x00" if which == "new" else new_root
    proof = [*proof[:-1], b""] if which == "proof" else proof
    _bad_proof(lambda: verify_consistency(5, 9, old_root, new_root, proof), "bytes, not 32")


def test_roots_at_chosen_sizes_match_the_full_tree() -> None:
    """The auditor's streaming tree keeps only its right edge, and the roots asked for."""
    leaves = [merkle.leaf_hash(bytes([i % 256, i // 256])) for i in range(300)]
    sizes = {0, 1, 2, 3, 7, 8, 9, 64, 100, 255, 256, 257, 299}
    streamed, full = merkle.RootsAt(sizes), merkle.MemoryTree()
    assert streamed.root() == full.root() == merkle.EMPTY_ROOT
    for count, leaf in enumerate(leaves, start=1):
        streamed.append(leaf)
        full.append(leaf)
        assert streamed.size == count and streamed.root() == full.root()
        assert len(streamed._edge) == bin(count).count("1")  # one hash per perfect subtree
    for size in sizes:
        assert streamed.root(size) == full.root(size) == merkle.root_hash(leaves[:size])
    with pytest.raises(ValueError, match="not kept"):
        streamed.root(5)
    with pytest.raises(ValueError, match="leaf hash is 32 bytes"):
        streamed.append(b"short")
