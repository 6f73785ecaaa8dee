"""``coalition broker repair-tree``: rebuild the audit log's derived data from its entries.

Besides each audit entry's bytes, the store records the entry's leaf hash (the ``leaf`` column)
and the complete tree nodes of every fourth level (``nodes``, :func:`merkle.is_stored_level`).
Both are derived: recomputable from the entries alone. Damaged (a bad disk page, a hand edit)
while the entries are intact, they make :meth:`AuditLog.open` refuse to start (``log_damaged``);
:func:`repair_tree` recomputes them and rewrites them, all in one transaction.

Nothing is written before the recomputed tree is checked against what the broker signed, and any
doubt refuses (:class:`RepairRefused`, nothing written):

* The entries must be contiguous and reach the size of the last stored checkpoint; that
  checkpoint must verify with the broker's key, or its key before a rotation, as at start; and
  the root recomputed from the entries at that size must be the checkpoint's. Every entry up to
  that size is then what the broker signed, and what is derived from them is right by
  construction, whatever was stored.
* An entry after the last checkpoint has no signature over it, only its recorded hashes. One
  whose recorded leaf hash matches is accepted, as at start. One whose leaf hash does not match
  is accepted only if the stored node over its group of 16 entries (level 4, a second record
  written when it was appended) matches the recomputation; otherwise the entry itself may be the
  damaged part, which no rewrite can tell or mend.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from broker.audit import merkle
from broker.audit.log import AuditLog, LogDamaged, verify_stored_checkpoint
from broker.audit.note import Checkpoint, Signer, Verifier
from broker.errors import StorageError
from broker.store.base import StoredCheckpoint
from broker.store.sqlite import FILE_NAME, SqliteStore
from broker.store.sqlite_repair import TreeRows, tree_transaction
from broker.stored_bundle import earlier_broker_keys, stored_bundle

log = structlog.get_logger("broker.audit")

#: How many rows of each kind of difference a report names.
SHOWN = 5

#: ``(level, index, hash)`` of a tree node.
Node = tuple[int, int, bytes]


class RepairRefused(LogDamaged):
    """The entries or the checkpoint are damaged: nothing derived from them can be trusted, so
    nothing was rebuilt and nothing was written."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; nothing was written")


class BrokerRunning(StorageError):
    """A broker runs on the data directory: its store is not rewritten under it."""


@dataclasses.dataclass
class Tally:
    """How many rows of one kind differ, and the first :data:`SHOWN` of them."""

    count: int = 0
    #: Entry indices (leaf hashes) or ``(level, index)`` (tree nodes), in the order found.
    first: list[object] = dataclasses.field(default_factory=list)

    def add(self, where: object) -> None:
        """Count one more, at ``where``."""
        self.count += 1
        if len(self.first) < SHOWN:
            self.first.append(where)

    def text(self, what: str) -> str:
        """``"2 wrong (3, 7)"``: the count and the first ones."""
        shown = ", ".join(map(str, self.first))
        more = ", ..." if self.count > len(self.first) else ""
        return f"{self.count} {what}" + (f" ({shown}{more})" if self.count else "")


@dataclasses.dataclass
class TreeReport:
    """What :func:`repair_tree` found, and whether it rewrote it."""

    entries: int = 0
    #: Size of the last signed checkpoint, whose root the entries hash to (``None``: none).
    checkpoint: int | None = None
    #: Node rows the entries imply (complete nodes of the stored levels).
    nodes: int = 0
    wrong_leaves: Tally = dataclasses.field(default_factory=Tally)
    wrong_nodes: Tally = dataclasses.field(default_factory=Tally)
    missing_nodes: Tally = dataclasses.field(default_factory=Tally)
    superfluous_nodes: Tally = dataclasses.field(default_factory=Tally)
    repaired: bool = False

    @property
    def damaged(self) -> bool:
        """Whether any derived row differs from the recomputation."""
        return any(t.count for t in (self.wrong_leaves, self.wrong_nodes, self.missing_nodes,
                                     self.superfluous_nodes))

    @property
    def status(self) -> str:
        """``clean``, ``repaired``, or ``damaged`` (found by a dry run, not rewritten)."""
        return "repaired" if self.repaired else "damaged" if self.damaged else "clean"

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready values."""
        def tally(t: Tally) -> dict[str, object]:
            return {"count": t.count, "first": t.first}

        return {"status": self.status, "entries": self.entries, "checkpoint": self.checkpoint,
                "nodes": self.nodes, "wrong_leaves": tally(self.wrong_leaves),
                "wrong_nodes": tally(self.wrong_nodes),
                "missing_nodes": tally(self.missing_nodes),
                "superfluous_nodes": tally(self.superfluous_nodes)}

    def summary(self) -> str:
        """A few lines for an operator."""
        signed = ("no signed checkpoint (each entry checked against its recorded hashes)"
                  if self.checkpoint is None else
                  f"the last signed checkpoint (size {self.checkpoint}) verifies and the "
                  "entries hash to its root")
        verdict = {"clean": "nothing to repair",
                   "repaired": "repaired: leaf hashes and tree nodes rewritten in one "
                               "transaction; the log opens as the broker opens it",
                   "damaged": "dry run: nothing written (run without --dry-run to repair)"}
        return "\n".join([
            f"audit log: {self.entries} entries; {signed}",
            f"leaf hashes: {self.wrong_leaves.text('wrong')}",
            f"tree nodes (level, index): {self.wrong_nodes.text('wrong')}, "
            f"{self.missing_nodes.text('missing')}, {self.superfluous_nodes.text('superfluous')}"
            f" ({self.nodes} expected)",
            verdict[self.status]])


def verify_last_checkpoint(stored: StoredCheckpoint, origin: str,
                           keys: Sequence[bytes]) -> Checkpoint:
    """The checkpoint ``stored`` carries, verified as :meth:`AuditLog.open` verifies the last
    one (:func:`~broker.audit.log.verify_stored_checkpoint`): signed with one of ``keys`` under
    the log's name ``origin``, of its recorded size. Raises :class:`RepairRefused` if not."""
    try:
        return verify_stored_checkpoint(
            stored, origin, [Verifier(origin, key) for key in dict.fromkeys(keys)])
    except LogDamaged as exc:
        raise RepairRefused(exc.reason) from exc


def repair_tree(store: SqliteStore, origin: str, keys: Sequence[bytes], *,
                dry_run: bool = False, chunk: int = 4096) -> TreeReport:
    """Recompute the leaf hashes and stored tree nodes of ``store``'s audit log from its entries,
    check them against the last signed checkpoint (see the module's docstring), report what
    differs and, unless ``dry_run`` or nothing does, rewrite the ``leaf`` column and the
    ``nodes`` table in one transaction. ``origin``: the log's name (the broker's); ``keys``:
    the public keys its checkpoints may be signed with (the broker's, then earlier ones).

    The broker must not run on ``store`` (see :func:`verify_broker_stopped`). Raises
    :class:`RepairRefused` (nothing written) when the entries or the checkpoint are damaged,
    ``StorageError`` when the store fails (nothing written either: the transaction rolls back)."""
    with tree_transaction(store.path, write=not dry_run) as rows:
        try:
            report, root = _survey(rows, origin, keys, chunk)
        except RepairRefused as exc:
            log.warning("audit_tree_repair_refused", reason=exc.reason)
            raise
        if report.damaged and not dry_run:
            _rewrite(rows, chunk, report.entries, root)
            report.repaired = True
    log.info("audit_tree_checked", status=report.status, entries=report.entries,
             checkpoint=report.checkpoint, wrong_leaves=report.wrong_leaves.count,
             wrong_nodes=report.wrong_nodes.count, missing_nodes=report.missing_nodes.count,
             superfluous_nodes=report.superfluous_nodes.count)
    return report


def _survey(rows: TreeRows, origin: str, keys: Sequence[bytes],
            chunk: int) -> tuple[TreeReport, bytes]:
    """Rebuild the tree from the entries, compare it with the stored derived rows, check it
    against the last checkpoint; the report and the root over every entry. Reads only."""
    report = TreeReport()
    latest = rows.latest_checkpoint()
    signed = None if latest is None else verify_last_checkpoint(latest, origin, keys)
    report.checkpoint = None if signed is None else signed.size
    covered = 0 if signed is None else signed.size
    tree = _Rebuild()
    stored = _StoredNodes(rows, report)
    # Entries after the checkpoint whose leaf hash differs, in the current group of 16: the
    # stored level-4 node over the group must vouch for their bytes when it completes.
    unconfirmed: list[int] = []
    if signed is not None and signed.size == 0:
        _verify_root(tree, signed)
    for index, recorded, data in (row for batch in _entries(rows, chunk) for row in batch):
        leaf = merkle.leaf_hash(data)
        if recorded != leaf:
            report.wrong_leaves.add(index)
            if index >= covered:
                unconfirmed.append(index)
        for level, node_index, digest in tree.append(leaf):
            if not merkle.is_stored_level(level):
                continue
            report.nodes += 1
            matches = stored.compare(level, node_index, digest)
            if level == merkle.STORED_LEVEL_STEP and unconfirmed:
                if not matches:
                    raise _unconfirmed(unconfirmed[0], report.checkpoint)
                unconfirmed.clear()
        if signed is not None and tree.size == signed.size:
            _verify_root(tree, signed)
    if signed is not None and tree.size < signed.size:
        raise RepairRefused(f"the store has {tree.size} audit entries but a checkpoint of size "
                            f"{signed.size} was signed: entries were lost")
    if unconfirmed:
        raise _unconfirmed(unconfirmed[0], report.checkpoint)
    stored.finish()
    report.entries = tree.size
    return report, tree.root()


def _rewrite(rows: TreeRows, chunk: int, size: int, root: bytes) -> None:
    """Rewrite every leaf hash that differs and the whole ``nodes`` table from the entries, and
    commit. The survey's checks hold: the transaction has held the write lock since before it."""
    rows.clear_nodes()
    tree = _Rebuild()
    for batch in _entries(rows, chunk):
        leaves: list[tuple[bytes, int]] = []
        nodes: list[Node] = []
        for index, recorded, data in batch:
            leaf = merkle.leaf_hash(data)
            if recorded != leaf:
                leaves.append((leaf, index))
            nodes.extend(node for node in tree.append(leaf) if merkle.is_stored_level(node[0]))
        rows.write_leaves(leaves)
        rows.write_nodes(nodes)
    if (tree.size, tree.root()) != (size, root):  # cannot happen: checked all the same
        raise StorageError("the audit entries changed during the repair")
    rows.commit()


def _entries(rows: TreeRows, chunk: int) -> Iterator[list[tuple[int, object, bytes]]]:
    """The entry rows in chunks, ``(index, recorded leaf, data)``; raises
    :class:`RepairRefused` at a missing or malformed entry."""
    expected = 0
    for batch in rows.entry_chunks(chunk):
        checked = []
        for index, recorded, data in batch:
            if index != expected:
                raise RepairRefused(f"audit entry {expected} is missing from the store (the "
                                    f"next one stored is {index})")
            if not isinstance(data, bytes):
                raise RepairRefused(f"audit entry {index} is not a blob: the entry is damaged")
            checked.append((index, recorded, data))
            expected += 1
        yield checked


def _verify_root(tree: _Rebuild, signed: Checkpoint) -> None:
    if tree.root() != signed.root:
        raise RepairRefused(f"the stored entries do not hash to the root of the checkpoint of "
                            f"size {signed.size}: entries were changed after they were signed "
                            "(the log was rewritten, or an entry is damaged), so nothing "
                            "derived from them can be trusted")


def _unconfirmed(index: int, checkpoint: int | None) -> RepairRefused:
    after = ("no checkpoint was signed" if checkpoint is None else
             f"it is after the last signed checkpoint (size {checkpoint})")
    return RepairRefused(f"audit entry {index} does not match its recorded leaf hash, {after}, "
                         "and the stored tree node above it does not confirm its bytes: the "
                         "entry itself may be damaged")


class _Rebuild:
    """The tree over the entries so far, kept as its right edge (the last complete node of each
    level): all that the nodes an entry completes, and the root, are made of."""

    def __init__(self) -> None:
        self.size = 0
        self._edge: dict[int, tuple[int, bytes]] = {}

    def append(self, leaf: bytes) -> list[Node]:
        """Add the next leaf hash; every node it completes, itself first."""
        nodes = merkle.completed_nodes(self.size, leaf, self._node)
        for level, index, digest in nodes:
            self._edge[level] = (index, digest)
        self.size += 1
        return nodes

    def root(self) -> bytes:
        """The root over every leaf so far."""
        return merkle.tree_root(self.size, self._node)

    def _node(self, level: int, index: int) -> bytes:
        edge = self._edge.get(level)
        if edge is None or edge[0] != index:  # a bug: the merkle functions ask for edge nodes
            raise ValueError(f"node ({level}, {index}) is not on the tree's right edge")
        return edge[1]


class _Cursor:
    """The stored ``(index, hash)`` rows of one level, read in index order, one ahead."""

    def __init__(self, rows: Iterator[tuple[int, object]]) -> None:
        self._rows = rows
        self.head = next(rows, None)

    def advance(self) -> None:
        """Move on to the next stored row."""
        self.head = next(self._rows, None)


class _StoredNodes:
    """The stored nodes walked level by level alongside the rebuild: each node the rebuild
    completes at a stored level is matched with the stored row of its index; a row passed
    over, left after the last one, at a level no log stores, or with keys that are not
    integers, is superfluous."""

    def __init__(self, rows: TreeRows, report: TreeReport) -> None:
        self._rows = rows
        self._report = report
        self._levels: dict[int, _Cursor] = {}

    def _cursor(self, level: int) -> _Cursor:
        cursor = self._levels.get(level)
        if cursor is None:
            cursor = self._levels[level] = _Cursor(self._rows.iter_nodes(level))
        return cursor

    def compare(self, level: int, index: int, digest: bytes) -> bool:
        """Whether the stored node ``(level, index)`` is ``digest``; tallies it if not."""
        cursor = self._cursor(level)
        while cursor.head is not None and cursor.head[0] < index:  # only a negative index
            self._report.superfluous_nodes.add((level, cursor.head[0]))
            cursor.advance()
        if cursor.head is None or cursor.head[0] != index:
            self._report.missing_nodes.add((level, index))
            return False
        matches = cursor.head[1] == digest
        cursor.advance()
        if not matches:
            self._report.wrong_nodes.add((level, index))
        return matches

    def finish(self) -> None:
        """Tally the stored rows no node of the rebuild matched."""
        for level in self._rows.node_levels():
            cursor = self._cursor(level)
            while cursor.head is not None:
                self._report.superfluous_nodes.add((level, cursor.head[0]))
                cursor.advance()
        for odd_level, odd_index in self._rows.odd_nodes():
            self._report.superfluous_nodes.add((_shown(odd_level), _shown(odd_index)))


def _shown(key: object) -> object:
    """A node key as a report shows it (JSON-ready): an integer, else its ``repr``."""
    return key if isinstance(key, int) else repr(key)


# --- the command ----------------------------------------------------------------------------


def verify_broker_stopped(data_dir: Path) -> None:
    """Raise :class:`BrokerRunning` if the broker's PID file in ``data_dir`` names a live
    process (as ``coalition broker reload`` finds the broker). A PID file whose process is gone
    (a broker killed before its clean-up) does not count; one that holds no process id does
    (only the operator can tell)."""
    from broker.serve import read_pid  # the server's modules, only when the command runs

    try:
        pid = read_pid(data_dir)
    except ValueError as exc:
        raise BrokerRunning(f"{exc}: remove it if no broker runs on {data_dir}") from exc
    if pid is None:
        return
    if _alive(pid):
        raise BrokerRunning(f"broker process {pid} runs on {data_dir} (its PID file): stop it "
                            "first (if that process is not the broker, remove the file)")
    log.warning("stale_pid_file", pid=pid, data_dir=str(data_dir))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def repair_data_dir(data_dir: Path, signer: Signer, *, dry_run: bool = False) -> TreeReport:
    """``coalition broker repair-tree``: refuse while a broker runs on ``data_dir``; else
    :func:`repair_tree` its store with the broker's key and its key before a rotation (the
    keys the broker's start accepts); after a repair, open the log as the broker's start does.
    A dry run opens the store read-only (no upgrade, no clean-up)."""
    verify_broker_stopped(data_dir)
    path = data_dir / FILE_NAME
    if not path.is_file():
        raise StorageError(f"no store at {path}")
    store = SqliteStore.open_read_only(path) if dry_run else SqliteStore.in_dir(data_dir)
    try:
        earlier = earlier_broker_keys(stored_bundle(store), signer.name)
        report = repair_tree(store, signer.name, [signer.verifier().public_key, *earlier],
                             dry_run=dry_run)
        if report.repaired:
            AuditLog(store, signer, earlier_keys=earlier).open()
    finally:
        store.close()
    return report
