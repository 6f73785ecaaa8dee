"""The audit log (edge): group-committed appends, the Merkle tree, signed checkpoints.

One writer task owns every write. :meth:`AuditLog.append` queues an entry (with the queue and
subscription writes that must become durable with it) and returns a future; the writer takes up to
``max_batch`` queued items as soon as one is due (a lazy request, which nobody waits for, may wait
``lazy_delay_s`` to share a commit), waits at most ``max_delay_s`` for more when the log is busy
(the previous commit merged many requests; see :meth:`CommitPolicy.wait_to_fill`), computes the
tree nodes the new entries complete (it stores those of every fourth level,
:func:`~broker.audit.merkle.is_stored_level`), and commits everything in one transaction: through
the broker's store writer process when it has one (:mod:`broker.store.writer_process`), else on the
event loop's thread when the batch is small and in a worker thread when it is large
(:attr:`CommitPolicy.thread_min_entries`; docs/decisions.md, "Commits on the event loop"). Only
then are the futures resolved, so callers release receipts and deliveries after their entry is
durable. A checkpoint is signed over the durable size only, at most every
``checkpoint_interval_s``.

A failed commit is never retried: the log stops, every pending and later append fails with
``StorageError`` (``unavailable``) and the broker stops accepting work, having lost nothing it
had acknowledged.

At :meth:`open` the log rebuilds its view from the stored entries and refuses to start unless they
extend the last signed checkpoint with the same root at that size and match the stored nodes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import msgpack
import structlog

from broker.audit import merkle
from broker.audit.commit_policy import DEFAULT_COMMIT, CommitPolicy
from broker.audit.leaves import Entry
from broker.audit.note import Checkpoint, Signer, Verifier, sign_note, verify_note
from broker.errors import BrokerError, StorageError, VerificationError
from broker.store.base import Batch, BatchWriter, Notice, QueueRow, Store, StoredCheckpoint

log = structlog.get_logger("broker.audit")


_MERGED = tuple(f.name for f in dataclasses.fields(Batch)
                if f.name not in ("first_index", "entries", "leaves", "nodes"))


@dataclasses.dataclass
class _Item:
    entries: Sequence[bytes]
    #: Only the non-empty ``Batch`` fields (most appends carry one list, or none).
    writes: dict[str, list[object]]
    future: asyncio.Future[int]
    #: Loop time by which the item must be in a commit (now, unless the request is lazy).
    due: float
    lazy: bool


class LogDamaged(StorageError):
    """The stored log does not extend its own last signed checkpoint: refuse to start."""

    code = "log_damaged"


CheckpointListener = Callable[[StoredCheckpoint], None]


def verify_stored_checkpoint(stored: StoredCheckpoint, origin: str,
                             verifiers: Sequence[Verifier]) -> Checkpoint:
    """The checkpoint ``stored`` carries, if it is signed by one of ``verifiers`` (the broker's
    key, then its keys before a rotation) under the log's name ``origin`` and of its recorded
    size; else :class:`LogDamaged`. How the log's start, and a repair, trust the last one."""
    try:
        verified = verify_note(stored.note, list(verifiers))
        checkpoint = Checkpoint.from_text(verified.text)
    except BrokerError as exc:
        raise LogDamaged(f"the last stored checkpoint does not verify with this broker's "
                         f"key: {exc.reason}") from exc
    if checkpoint.size != stored.size or checkpoint.origin != origin:
        raise LogDamaged("the last stored checkpoint is not this log's")
    return checkpoint


def log_failure(done: asyncio.Future[int]) -> None:
    """Done-callback of an audit write nothing waits for: log it if it failed."""
    if not done.cancelled() and done.exception() is not None:
        log.error("audit_write_failed", reason=str(done.exception()))


def _outcome_unknown() -> StorageError:
    """The exchange with the writer process was cancelled (the event loop is being torn
    down): whether the batch became durable is unknown, so its requests fail and the log
    stops (the next start finds whatever was committed)."""
    return StorageError("a commit was cancelled: its outcome is unknown")


#: How far back of a horizon :meth:`AuditLog.recent_routes` keeps reading: entries are in
#: commit order, and their clock may be a little out of it.
_CLOCK_SLACK_MS = 60_000


class AuditLog:
    """The broker's append-only, tamper-evident log over a :class:`Store`."""

    def __init__(self, store: Store, signer: Signer, *, policy: CommitPolicy = DEFAULT_COMMIT,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 earlier_keys: Sequence[bytes] = (), writer: BatchWriter | None = None) -> None:
        """``earlier_keys``: public keys this broker signed with before a key rotation (from the
        trust root in force when it last ran); its last stored checkpoint may carry one.
        ``writer``: commits go through it (a writer process on ``store``'s file, which the
        caller starts and closes) instead of ``store.commit`` in this process."""
        self.store = store
        self.writer = writer
        self.signer = signer
        self.verifier: Verifier = signer.verifier()
        self._earlier = [Verifier(signer.name, key) for key in earlier_keys
                         if key != self.verifier.public_key]
        self.policy = policy
        self.clock_ms = clock_ms
        self.size = 0  # durable entries
        self.latest: StoredCheckpoint | None = None
        self.failed: StorageError | None = None
        self._edge: dict[int, tuple[int, bytes]] = {}  # last complete node per level
        self._queued: list[_Item] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[CheckpointListener] = []
        # Its thread starts at the first large batch, if there is one.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="audit")
        #: Called with (seconds, entries) after each durable commit (metrics).
        self.commit_observers: list[Callable[[float, int], None]] = []
        self._last_checkpoint_at = 0.0
        self._commit_started: float | None = None  # loop time, while a commit runs
        self._last_commit = 0  # urgent requests in the previous commit (how busy the log is)
        self._earliest_due = math.inf  # of the queued items
        self._opened = False
        self._closing = False

    # --- start and stop -----------------------------------------------------------------

    def open(self) -> None:
        """Rebuild the tree's right edge from the stored entries; verify the last checkpoint."""
        latest = self.store.latest_checkpoint()
        expected = self._checkpoint_of(latest) if latest else None
        leaves = self.store.iter_nodes(0)
        stored = merkle.StoredNodeCheck(self.store.iter_nodes)
        size = 0
        for index, data in self.store.iter_entries():
            if index != size:
                raise LogDamaged(f"audit entry {size} is missing from the store")
            leaf = merkle.leaf_hash(data)
            if next(leaves, None) != (index, leaf):
                raise LogDamaged(f"audit entry {index} does not match its stored leaf hash")
            stored.check(self._extend(size, leaf))
            size += 1
            if expected is not None and size == expected.size:
                self._check_root(expected, size)
        self.size = size
        if expected is not None and size < expected.size:
            raise LogDamaged(f"the store has {size} audit entries but a checkpoint of size "
                             f"{expected.size} was signed: entries were lost")
        if expected is not None and expected.size == 0:
            self._check_root(expected, 0)
        # After the checkpoint's verdict, which says more (a rewritten history) when both fail.
        problem = stored.problem()
        if problem is not None:
            raise LogDamaged(problem)
        self.latest = latest
        self._opened = True
        log.info("audit_log_opened", size=size,
                 checkpoint=None if latest is None else latest.size)

    def _checkpoint_of(self, stored: StoredCheckpoint) -> Checkpoint:
        return verify_stored_checkpoint(stored, self.signer.name, [self.verifier, *self._earlier])

    def _check_root(self, expected: Checkpoint, size: int) -> None:
        if self.root(size) != expected.root:
            raise LogDamaged(f"the stored entries do not hash to the root of the checkpoint of "
                             f"size {expected.size}: the log was rewritten")

    async def start(self) -> None:
        """Start the writer task (after :meth:`open`)."""
        if not self._opened:
            self.open()
        self._last_checkpoint_at = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._writer(), name="audit-writer")

    async def stop(self) -> None:
        """Commit what is queued, sign a final checkpoint, stop the writer."""
        if self._task is not None:
            self._closing = True
            self._wake.set()
            try:
                await self._task
            finally:
                self._task = None
                # Idle by now: the writer waits for a threaded commit even when cancelled.
                self._executor.shutdown(wait=False)

    # --- appends ------------------------------------------------------------------------

    def append(self, entry: Entry, *, enqueue: Sequence[QueueRow] = (),
               dequeue: Sequence[tuple[str, int]] = (),
               bundles: Sequence[tuple[bytes, bytes]] = (),
               marks: Sequence[bytes] = (),
               notices: Sequence[Notice] = (),
               node_status: Sequence[tuple[str, str]] = ()) -> asyncio.Future[int]:
        """Queue ``entry`` (and the writes that go with it); the future gives its index once
        durable. Raises ``StorageError`` at once if the log has stopped."""
        return self.append_all((entry,), enqueue=enqueue, dequeue=dequeue, bundles=bundles,
                               marks=marks, notices=notices, node_status=node_status)

    def append_all(self, entries: Sequence[Entry], *, enqueue: Sequence[QueueRow] = (),
                   dequeue: Sequence[tuple[str, int]] = (),
                   bundles: Sequence[tuple[bytes, bytes]] = (),
                   marks: Sequence[bytes] = (),
                   notices: Sequence[Notice] = (),
                   node_status: Sequence[tuple[str, str]] = (),
                   lazy: bool = False) -> asyncio.Future[int]:
        """Queue ``entries`` (consecutive in the log, in this order) and the writes that go
        with them, durable together; the future gives the first entry's index. One request
        for what arrives together (the acks of one frame). ``lazy``: nothing waits for this
        request to be durable, so it may wait up to ``policy.lazy_delay_s`` to share a
        commit (the entries keep their place in the log either way)."""
        writes: dict[str, list[object]] = {}
        for name, values in (("enqueue", enqueue), ("dequeue", dequeue), ("bundles", bundles),
                             ("marks", marks), ("notices", notices),
                             ("node_status", node_status)):
            if values:
                writes[name] = list(values)
        return self._submit([entry.to_bytes() for entry in entries], writes, lazy=lazy)

    def write(self, batch: Batch) -> asyncio.Future[int]:
        """Queue writes that carry no entry (subscriptions, cosignatures)."""
        writes: dict[str, list[object]] = {}
        for name in _MERGED:
            values = getattr(batch, name)
            if values:
                writes[name] = list(values)
        return self._submit((), writes)

    def _submit(self, entries: Sequence[bytes], writes: dict[str, list[object]], *,
                lazy: bool = False) -> asyncio.Future[int]:
        if self.failed is not None:
            raise StorageError(f"the audit log stopped: {self.failed.reason}")
        if self._task is None or self._closing:
            raise StorageError("the audit log is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        due = loop.time() + (self.policy.lazy_delay_s if lazy else 0.0)
        self._queued.append(_Item(entries, writes, future, due, lazy))
        if due < self._earliest_due:  # only then can the writer's plan change
            self._earliest_due = due
            self._wake.set()
        return future

    def on_checkpoint(self, listener: CheckpointListener) -> None:
        """Call ``listener`` with every new checkpoint once it is stored."""
        self._listeners.append(listener)

    # --- reads --------------------------------------------------------------------------

    def get_node(self, level: int, index: int) -> bytes:
        """A durable complete node: the right edge from memory, the rest from the stored
        nodes or entries below it."""
        edge = self._edge.get(level)
        if edge is not None and edge[0] == index:
            return edge[1]
        return merkle.node_from_stored(level, index, self._stored_run)

    def _stored_run(self, level: int, first: int, count: int) -> list[bytes]:
        hashes = self.store.nodes(level, first, first + count)
        if len(hashes) != count:
            raise StorageError(f"the store lacks tree nodes [{first}, {first + count}) at "
                               f"level {level} of the log")
        return hashes

    def recent_routes(self, since_ms: int, *, chunk: int = 4096) -> list[tuple[bytes, int]]:
        """``(message id, ts)`` of every durable ``route`` entry with ``ts >= since_ms``, in log
        order. Reads the log backwards, a chunk at a time, until a chunk lies wholly a minute
        before ``since_ms`` (entries are appended in clock order, give or take a commit; a route
        is missed only if the clock stepped back by more than that minute)."""
        found: list[list[tuple[bytes, int]]] = []
        end = self.size
        while end > 0:
            start = max(0, end - chunk)
            rows = itertools.islice(self.store.iter_entries(start, chunk=end - start),
                                    end - start)
            newest, routes = _routes_since(since_ms, (data for _, data in rows))
            found.append(routes)
            if newest < since_ms - _CLOCK_SLACK_MS:
                break
            end = start
        return [route for routes in reversed(found) for route in routes]

    def root(self, size: int) -> bytes:
        """The tree root over the first ``size`` durable entries."""
        return merkle.tree_root(size, self.get_node)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Proof that entry ``index`` is in the tree of ``size`` entries (O(log n) reads)."""
        self._check_size(size)
        return merkle.inclusion_proof(index, size, self.get_node)

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """Proof that the tree of ``new`` entries extends the tree of ``old`` entries."""
        self._check_size(new)
        return merkle.consistency_proof(old, new, self.get_node)

    def commit_running_s(self) -> float:
        """How long the commit now running has been running (0 if none)."""
        started = self._commit_started
        return 0.0 if started is None else asyncio.get_running_loop().time() - started

    def stalled_reason(self) -> str | None:
        """Why the log is stalled (a commit has been running over ``policy.stall_s``), or
        ``None``."""
        running = self.commit_running_s()
        if running <= self.policy.stall_s:
            return None
        return (f"an audit commit has been running for {running:.1f} s (the store's disk does "
                "not answer)")

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise VerificationError(f"size {size} is beyond the log ({self.size} entries)",
                                    code="bad_proof")

    async def add_cosignature(self, size: int, witness: str, line: str) -> None:
        """Store a verified cosignature of the checkpoint of ``size``."""
        await self.write(Batch(cosignatures=[(size, witness, line)]))
        if self.latest is not None and self.latest.size == size:
            self.latest.cosignatures[witness] = line

    # --- the writer ---------------------------------------------------------------------

    def _extend(self, size_before: int, leaf: bytes) -> list[tuple[int, int, bytes]]:
        nodes = merkle.completed_nodes(size_before, leaf, self.get_node)
        for level, index, digest in nodes:
            self._edge[level] = (index, digest)
        return nodes

    async def _writer(self) -> None:
        try:
            await self._write_until_closed()
        except BaseException as exc:
            # Whatever broke the writer, no appender may wait forever for it.
            if self.failed is None:
                self._fail((), StorageError("the audit log's writer was cancelled")
                           if isinstance(exc, asyncio.CancelledError) else exc)
            raise

    async def _write_until_closed(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._commit_due(loop.time()):
                self._wake.clear()
                if self._closing and not self._queued:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._until_due(loop.time()))
            if self._commit_due(loop.time()):
                if self.policy.wait_to_fill(len(self._queued), self._last_commit):
                    await asyncio.sleep(self.policy.max_delay_s)  # busy: let the batch fill
                if not await self._commit_queued():
                    return
            if self._checkpoint_due(loop.time()) and not await self._sign_checkpoint():
                return
        if self.latest is None or self.latest.size < self.size:
            await self._sign_checkpoint()

    def _commit_due(self, now: float) -> bool:
        """Something queued must be committed now: a request somebody waits for, a lazy
        one that waited long enough, a full batch, or the log is closing."""
        return bool(self._queued) and (now >= self._earliest_due or self._closing
                                       or len(self._queued) >= self.policy.max_batch)

    def _until_due(self, now: float) -> float | None:
        """How long the writer may sleep: until the next checkpoint or lazy request is due."""
        waits = [max(0.0, self._earliest_due - now)] if self._queued else []
        checkpoint = self._until_checkpoint(now)
        if checkpoint is not None:
            waits.append(checkpoint)
        return min(waits, default=None)

    def _until_checkpoint(self, now: float) -> float | None:
        if self.latest is not None and self.latest.size >= self.size:
            return None
        return max(0.0, self._last_checkpoint_at + self.policy.checkpoint_interval_s - now)

    def _checkpoint_due(self, now: float) -> bool:
        timeout = self._until_checkpoint(now)
        return timeout is not None and timeout <= 0

    async def _commit_queued(self) -> bool:
        items = self._queued[: self.policy.max_batch]
        del self._queued[: len(items)]
        self._earliest_due = min((item.due for item in self._queued), default=math.inf)
        cancelled = False
        try:
            batch, indexes = self._merge(items)
            started = time.perf_counter()
            # Appends made meanwhile queue for the next batch; nothing reads `size` as durable
            # until the commit returns.
            cancelled = await self._commit(batch)
        except Exception as exc:
            self._fail(items, exc)
            return False
        except asyncio.CancelledError:
            self._fail(items, _outcome_unknown())
            return False
        for observe in self.commit_observers:
            observe(time.perf_counter() - started, len(batch.entries))
        self.size += len(batch.entries)
        # Lazy requests are held back to be merged: only requests somebody waits for say how busy
        # the log is (a burst of ack frames must not put the next receipt behind the delay).
        self._last_commit = sum(not item.lazy for item in items)
        for item, index in zip(items, indexes, strict=True):
            if not item.future.done():
                item.future.set_result(index)
        if cancelled:  # only now: the futures above say truly that the commit is durable
            raise asyncio.CancelledError
        return True

    async def _commit(self, batch: Batch) -> bool:
        """Commit ``batch`` (in the writer process, a thread or on the loop); ``True`` if the
        writer task was cancelled meanwhile (the outcome was awaited all the same)."""
        self._commit_started = asyncio.get_running_loop().time()
        try:
            if self.writer is not None:
                return await self.writer.commit(batch)
            if len(batch.entries) >= self.policy.thread_min_entries:
                return await self._commit_in_thread(batch)
            self.store.commit(batch)  # on the loop: see CommitPolicy.thread_min_entries
            return False
        finally:
            self._commit_started = None

    async def _commit_in_thread(self, batch: Batch) -> bool:
        """Commit ``batch`` in the worker thread; ``True`` if the writer was cancelled
        meanwhile. A commit cannot be stopped once it runs, so a cancelled writer still waits
        for its outcome (blocking the loop for the rest of one commit): otherwise the batch's
        futures would fail while its entries became durable. Raises what the commit raised."""
        running = self._executor.submit(self.store.commit, batch)
        try:
            await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            running.result()  # a commit cancelled before it started raises: nothing written
            return True
        return False

    def _merge(self, items: Iterable[_Item]) -> tuple[Batch, list[int]]:
        batch = Batch(first_index=self.size)
        subscribed: dict[tuple[str, str], bool] = {}
        indexes = []
        size = self.size
        for item in items:
            indexes.append(size if item.entries else -1)
            for data in item.entries:
                leaf = merkle.leaf_hash(data)
                batch.entries.append(data)
                batch.leaves.append(leaf)
                batch.nodes.extend(node for node in self._extend(size, leaf)
                                   if merkle.is_stored_level(node[0]))
                size += 1
            for name, values in item.writes.items():
                getattr(batch, name).extend(values)
            for name, on in (("unsubscribe", False), ("subscribe", True)):
                for key in item.writes.get(name, ()):
                    subscribed[cast(tuple[str, str], key)] = on
        # The store applies subscribes before unsubscribes: only the last request per
        # (node, pattern) in this batch may reach it, or `unsub X` then `sub X` would lose X.
        batch.subscribe = [key for key, on in subscribed.items() if on]
        batch.unsubscribe = [key for key, on in subscribed.items() if not on]
        batch.node_status = list(dict(batch.node_status).items())  # likewise: the last wins
        return batch, indexes

    def _fail(self, items: Sequence[_Item], exc: BaseException) -> None:
        error = exc if isinstance(exc, StorageError) else StorageError(f"commit failed: {exc}")
        self.failed = error
        log.error("audit_log_stopped", reason=error.reason, lost_pending=0,
                  failed_requests=len(items) + len(self._queued))
        for item in (*items, *self._queued):
            if not item.future.done():
                item.future.set_exception(StorageError(f"the audit log stopped: {error.reason}"))
        self._queued.clear()
        self._earliest_due = math.inf

    async def _sign_checkpoint(self) -> bool:
        size = self.size
        checkpoint = Checkpoint(self.signer.name, size, self.root(size))
        note = sign_note(checkpoint.to_text(), [self.signer])
        try:
            cancelled = await self._commit(Batch(checkpoints=[(size, note)]))
        except Exception as exc:
            self._fail((), exc)
            return False
        except asyncio.CancelledError:
            self._fail((), _outcome_unknown())
            return False
        self._last_checkpoint_at = asyncio.get_running_loop().time()
        self.latest = StoredCheckpoint(size, note, {})
        log.info("checkpoint_signed", size=size, root=checkpoint.root.hex())
        for listener in self._listeners:
            try:
                listener(self.latest)
            except Exception:
                log.exception("checkpoint_listener_failed")
        if cancelled:  # only now: the checkpoint is stored and announced
            raise asyncio.CancelledError
        return True


def _routes_since(since_ms: int, entries: Iterable[bytes]) -> tuple[int, list[tuple[bytes, int]]]:
    """The newest ``ts`` among ``entries`` and the ``(id, ts)`` of their route entries from
    ``since_ms`` on. Our own entries, checked against their leaf hashes at open: a plain decode
    of the three fields suffices."""
    newest, routes = -1, []
    for data in entries:
        value = msgpack.unpackb(data)
        ts = value.get("ts") if isinstance(value, dict) else None
        if type(ts) is not int:
            continue
        newest = max(newest, ts)
        message_id = value.get("id")
        if value.get("kind") == "route" and ts >= since_ms and type(message_id) is bytes:
            routes.append((message_id, ts))
    return newest, routes
