"""RFC 6962 / RFC 9162 Merkle tree: hashing, proof generation and proof verification.

Pure: hashlib only, no I/O. Storage is abstracted by a ``get_node(level, index)`` callable that
returns the hash of the *complete* subtree covering leaves ``[index * 2**level,
(index + 1) * 2**level)`` (level 0 = leaf hashes). A store that keeps every complete node (see
:func:`completed_nodes`) can then answer any root or proof with O(log n) reads, never a rebuild.

Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 step by step, because those algorithms
reject proofs that are too long or too short instead of silently ignoring extra hashes.
Verifiers raise :class:`~broker.errors.VerificationError` (code ``bad_proof``); generators raise
:class:`ValueError` for arguments outside the tree, which is a caller bug, not an attack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence

from broker.errors import VerificationError

#: ``get_node(level, index)``: the hash of the complete subtree ``index`` at ``level``.
GetNode = Callable[[int, int], bytes]

HASH_SIZE = 32
#: The root of the empty tree, MTH({}) = SHA-256() (RFC 9162 §2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """Return the leaf hash ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the interior node hash ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n > 1``): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def root_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return MTH over ``leaf_hashes`` (already leaf-hashed); the empty tree is SHA-256("")."""

    def mth(start: int, end: int) -> bytes:
        if end - start == 1:
            return leaf_hashes[start]
        k = _split(end - start)
        return node_hash(mth(start, start + k), mth(start + k, end))

    return mth(0, len(leaf_hashes)) if leaf_hashes else EMPTY_ROOT


def subtree_root(start: int, end: int, get_node: GetNode) -> bytes:
    """Return MTH(D[start:end]) from at most log2(end - start) + 1 complete-subtree hashes.

    The range must be non-empty and aligned the way every range in RFC 9162's recursion is:
    ``start`` is a multiple of the smallest power of two >= ``end - start``. Unaligned ranges are
    refused because they would silently cost O(n) reads.
    """
    size = end - start
    if start < 0 or size <= 0 or start % (1 << (size - 1).bit_length()):
        raise ValueError(f"[{start}, {end}) is not an aligned, non-empty subtree range")
    # MTH splits at the largest power of two below the size, so the right spine's left children
    # are exactly the complete subtrees given by the binary digits of the size, largest first.
    parts: list[bytes] = []
    pos = start
    while pos < end:
        level = (end - pos).bit_length() - 1
        parts.append(get_node(level, pos >> level))
        pos += 1 << level
    acc = parts.pop()
    while parts:
        acc = node_hash(parts.pop(), acc)
    return acc


def tree_root(size: int, get_node: GetNode) -> bytes:
    """Return the root of the tree made of the first ``size`` leaves (O(log size) reads)."""
    if size < 0:
        raise ValueError(f"negative tree size {size}")
    return subtree_root(0, size, get_node) if size else EMPTY_ROOT


def inclusion_proof(index: int, size: int, get_node: GetNode) -> list[bytes]:
    """Return PATH(index, D[0:size]) (RFC 9162 §2.1.3.1), ordered from the leaf upwards."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    # Walk down from the root; each step keeps the half holding the leaf and records the other.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            proof.append(subtree_root(start + k, end, get_node))
            end = start + k
        else:
            proof.append(subtree_root(start, start + k, get_node))
            start += k
    proof.reverse()
    return proof


def consistency_proof(old: int, new: int, get_node: GetNode) -> list[bytes]:
    """Return PROOF(old, D[0:new]) (RFC 9162 §2.1.4.1); ``0 < old <= new``.

    A proof from the empty tree is not defined (there is nothing to be consistent with).
    """
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from size {old} to size {new}")
    proof: list[bytes] = []
    start, end, m = 0, new, old  # m: how many of [start, end) the old tree covers
    whole_old_subtree = True  # RFC's flag b: the current range is still a prefix of the old tree
    while end - start != m:
        k = _split(end - start)
        if m <= k:
            proof.append(subtree_root(start + k, end, get_node))
            end = start + k
        else:
            proof.append(subtree_root(start, start + k, get_node))
            start, m = start + k, m - k
            whole_old_subtree = False
    if not whole_old_subtree:
        proof.append(subtree_root(start, end, get_node))
    proof.reverse()
    return proof


def completed_nodes(
    size_before: int, new_leaf: bytes, get_node: GetNode
) -> list[tuple[int, int, bytes]]:
    """Return ``(level, index, hash)`` of every node completed by appending ``new_leaf``.

    The first entry is the leaf itself at ``(0, size_before)``; each further entry is the parent
    that the previous one just completed. A store that saves all of them can serve every root
    and proof through :func:`subtree_root`.
    """
    if size_before < 0:
        raise ValueError(f"negative tree size {size_before}")
    level, index, digest = 0, size_before, new_leaf
    nodes = [(level, index, digest)]
    while index & 1:  # a right child completes its parent
        digest = node_hash(get_node(level, index - 1), digest)
        level, index = level + 1, index >> 1
        nodes.append((level, index, digest))
    return nodes


#: A log stores the complete nodes of every fourth level only (16, 256, 4,096, … leaves): about
#: one row per 15 entries instead of two per entry (a leaf hash and the parents it completes).
#: Any other node is recomputed from at most eight stored ones below it, or from at most eight
#: leaf hashes: a root or proof still costs O(log n) reads, a few rows each.
STORED_LEVEL_STEP = 4

#: ``get_run(level, first, count)``: the hashes of the complete nodes ``first`` to
#: ``first + count - 1`` at ``level``, a stored level or 0 (the entries' leaf hashes).
GetRun = Callable[[int, int, int], Sequence[bytes]]


def is_stored_level(level: int) -> bool:
    """Whether a log stores the complete nodes of ``level`` as nodes (level 0, the leaf
    hashes, it records with the entries)."""
    return level > 0 and level % STORED_LEVEL_STEP == 0


def node_from_stored(level: int, index: int, get_run: GetRun) -> bytes:
    """The complete node ``(level, index)``, from the nodes of the nearest stored level at or
    below it (or the leaf hashes): a stored node is one read, any other one range of at most
    ``2 ** (STORED_LEVEL_STEP - 1)`` hashes."""
    if level < 0 or index < 0:
        raise ValueError(f"no tree node ({level}, {index})")
    depth = level % STORED_LEVEL_STEP
    count = 1 << depth
    hashes = get_run(level - depth, index << depth, count)
    if len(hashes) != count:
        raise ValueError(f"node ({level}, {index}) needs {count} hashes at level "
                         f"{level - depth}, got {len(hashes)}")
    # The complete subtree over a power-of-two run is the MTH of that run.
    return root_hash(hashes)


class StoredNodeCheck:
    """Compares a store's nodes with those a rebuild from the entries completes, in order (as
    :func:`completed_nodes` yields them): what a log checks when it opens."""

    def __init__(self, stored: Callable[[int], Iterator[tuple[int, bytes]]]) -> None:
        self._stored = stored  # (index, hash) of each stored node of a level, by index
        self._levels: dict[int, Iterator[tuple[int, bytes]]] = {}
        self._problem: str | None = None

    def check(self, completed: Iterable[tuple[int, int, bytes]]) -> None:
        """Compare the stored-level nodes among ``completed`` with the next stored ones."""
        for level, index, digest in completed:
            if self._problem is not None or not is_stored_level(level):
                continue
            rows = self._levels.setdefault(level, self._stored(level))
            if next(rows, None) != (index, digest):
                self._problem = (f"the stored tree node over entries {index << level} to "
                                 f"{((index + 1) << level) - 1} does not match them")

    def problem(self) -> str | None:
        """The first mismatch, or a node stored beyond the entries checked (which the log
        could not store when it reaches it); ``None`` if every stored node matched."""
        for level in range(STORED_LEVEL_STEP, 64, STORED_LEVEL_STEP):
            if self._problem is not None:
                break
            extra = next(self._levels.get(level) or self._stored(level), None)
            if extra is not None:
                self._problem = (f"a tree node is stored beyond the entries (level {level}, "
                                 f"index {extra[0]})")
        return self._problem


class RootsAt:
    """The roots of a tree at chosen sizes, taken while its leaf hashes stream past.

    Keeps the tree's right edge (the roots of its perfect subtrees, at most one per level) and
    the roots asked for: memory O(log n + sizes) where :class:`MemoryTree` keeps every node. For
    an auditor, whose log may not fit in memory as a tree.
    """

    def __init__(self, sizes: Iterable[int] = ()) -> None:
        self._wanted = set(sizes)
        self._roots: dict[int, bytes] = {0: EMPTY_ROOT} if 0 in self._wanted else {}
        self._edge: list[bytes] = []  # largest (leftmost) subtree first
        self.size = 0

    def append(self, leaf: bytes) -> None:
        """Append a leaf hash (not the entry: call :func:`leaf_hash` first)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(leaf)}")
        edge = self._edge
        edge.append(leaf)
        index = self.size
        while index & 1:  # a right child completes its parent
            right = edge.pop()
            edge[-1] = node_hash(edge[-1], right)
            index >>= 1
        self.size += 1
        if self.size in self._wanted:
            self._roots[self.size] = self._fold()

    def _fold(self) -> bytes:
        # RFC 9162 §2.1.1 on the right edge: MTH = node(P1, node(P2, … node(Pm-1, Pm))).
        digest = self._edge[-1]
        for subtree in reversed(self._edge[:-1]):
            digest = node_hash(subtree, digest)
        return digest

    def root(self, size: int | None = None) -> bytes:
        """The root at ``size`` leaves (default: now); ``ValueError`` for a size not asked for
        when it went past, or not reached."""
        if size is None or size == self.size:
            return self._fold() if self._edge else EMPTY_ROOT
        root = self._roots.get(size)
        if root is None:
            raise ValueError(f"the root at size {size} was not kept (tree size {self.size})")
        return root


class MemoryTree:
    """An in-memory tree that keeps every complete node, appended one leaf hash at a time."""

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for digest in leaf_hashes:
            self.append(digest)

    @property
    def size(self) -> int:
        """The number of leaves."""
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        """Append a leaf hash (not the entry: call :func:`leaf_hash` first)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(leaf)}")
        # completed_nodes(), written out: an auditor appends every entry of the log.
        levels = self._levels
        index, digest = len(levels[0]), leaf
        levels[0].append(leaf)
        level = 0
        while index & 1:  # a right child completes its parent
            digest = node_hash(levels[level][index - 1], digest)
            level, index = level + 1, index >> 1
            if level == len(levels):
                levels.append([])
            levels[level].append(digest)

    def get_node(self, level: int, index: int) -> bytes:
        """Return the hash of complete subtree ``index`` at ``level``; IndexError if absent."""
        if level < 0 or index < 0 or level >= len(self._levels):
            raise IndexError(f"no complete node ({level}, {index})")
        return self._levels[level][index]

    def _size(self, size: int | None) -> int:
        if size is None:
            return self.size
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} is outside the tree (size {self.size})")
        return size

    def root(self, size: int | None = None) -> bytes:
        """Return the root at ``size`` leaves (default: the current size)."""
        return tree_root(self._size(size), self.get_node)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Return the inclusion proof of leaf ``index`` in the tree of ``size`` leaves."""
        return inclusion_proof(index, self._size(size), self.get_node)

    def consistency_proof(self, old: int, new: int | None = None) -> list[bytes]:
        """Return the consistency proof from ``old`` leaves to ``new`` leaves."""
        return consistency_proof(old, self._size(new), self.get_node)


def _fail(reason: str) -> VerificationError:
    return VerificationError(reason, code="bad_proof")


def _check_hash(what: str, digest: bytes) -> None:
    if len(digest) != HASH_SIZE:
        raise _fail(f"{what} is {len(digest)} bytes, not {HASH_SIZE}")


def _check_proof(proof: Sequence[bytes]) -> None:
    for i, digest in enumerate(proof):
        _check_hash(f"proof hash {i}", digest)


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """Return the root that ``proof`` implies for ``leaf`` at ``index`` (RFC 9162 §2.1.3.2).

    Raises VerificationError if the index is outside the tree or the proof has the wrong length.
    """
    _check_hash("leaf hash", leaf)
    _check_proof(proof)
    if not 0 <= index < size:
        raise _fail(f"leaf index {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise _fail("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # Skip the levels where this node has no right sibling (the ragged right edge).
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise _fail("inclusion proof is too short")
    return r


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    Raises VerificationError (code ``bad_proof``) on any failure.
    """
    _check_hash("root", root)
    if root_from_inclusion(index, size, leaf_hash, proof) != root:
        raise _fail(f"inclusion proof for leaf {index} does not lead to the root of size {size}")


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (``new``, ``new_root``) extends the tree (``old``, ``old_root``).

    RFC 9162 §2.1.4.2. ``old == new`` needs an empty proof and equal roots. A proof from size 0
    is rejected: it proves nothing, so accepting one would let a caller skip the check by
    claiming an empty history. Raises VerificationError (code ``bad_proof``) on any failure.
    """
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    _check_proof(proof)
    if old <= 0:
        raise _fail(f"no consistency proof from tree size {old}")
    if old > new:
        raise _fail(f"old tree size {old} is larger than new tree size {new}")
    if old == new:
        if proof:
            raise _fail("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise _fail(f"two different roots for tree size {old}")
        return
    if not proof:  # step 1
        raise _fail("consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:  # step 2: the old root is itself a node of the new tree
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1  # step 3
    while fn & 1:  # step 4
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
        if sn == 0:
            raise _fail("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:  # step 7
        raise _fail("consistency proof is too short")
    if fr != old_root:
        raise _fail(f"consistency proof does not lead to the old root of size {old}")
    if sr != new_root:
        raise _fail(f"consistency proof does not lead to the new root of size {new}")
