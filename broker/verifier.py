"""Envelope signatures checked in worker processes (``[broker] verify_workers``).

The broker's event loop is its limit (docs/performance.md): every ``pub`` is parsed, verified,
decided and logged on one thread, and the Ed25519 check is ~65 µs of that. A
:class:`VerifyPool` moves the check to child processes, so that it runs on another core while
the loop goes on. The loop still parses the envelope and decides everything that needs trust:
it picks the key (the authenticated node's, from the policy bundle) and sends the child only
``(key, body, signature)``; the child answers one bit per signature
(:mod:`broker.sigbatch`). It holds no state and no authority.

What is submitted during one turn of the loop goes to a worker as one batch (one write and one
read for many envelopes). A batch of fewer than :data:`MIN_BATCH` is checked on the loop
instead: the loop is not that busy then, and the round trip would only add latency. A sender's
envelopes always go to the same worker and verdicts are handed out in the order submitted (a
small batch checked on the loop waits for the batches in flight before it), so a node's
messages are routed in the order it sent them.

Failure never loses a verdict nor invents one: when a worker's socket closes, it answers
anything but a reply to its oldest batch, it leaves that batch unanswered for
:data:`STALL_S`, or it owes more than :data:`MAX_PENDING` envelopes, what it owes is checked on
the loop, in order, and a new worker is started after a pause (1 s, doubling to a minute; the
loop checks its senders meanwhile). At :meth:`VerifyPool.close` nothing owed is answered: a
publish without a verdict was not accepted (no receipt, nothing logged), and its sender sends
it again. The worker is trusted as the loop's own code is: same program, same user.

Children are started with ``subprocess`` (``python -m broker.verifier FD``) like the store's
writer process (:mod:`broker.child`), in their own process group, ignoring
``SIGINT``/``SIGTERM``/``SIGHUP``; they exit when their socket closes, so they do not outlive
the broker, also after a ``SIGKILL``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import cast

import msgpack
import structlog

from broker import child
from broker.crypto import DOMAIN_ENVELOPE, check_signature
from broker.errors import BrokerError
from broker.sigbatch import check_reply, check_request, verify_items

log = structlog.get_logger("broker.verifier")

#: What a verdict is handed to: ``True`` when the signature verifies.
Verdict = Callable[[bool], None]

#: A worker that has not answered its oldest batch for this long is given up (stalled, or
#: starved of CPU); a batch of 256 takes ~17 ms.
STALL_S = 2.0
#: Envelopes one worker may owe (a bound on memory whatever the timing) before it is given up.
MAX_PENDING = 65536
#: Envelopes, and bytes of them, in one batch (a larger turn is sent as several).
MAX_BATCH = 256
MAX_BATCH_BYTES = 1 << 20
#: A smaller batch is checked on the loop: the loop is not that busy, and a round trip to a
#: sleeping process costs more latency than the checks (its verdicts still wait for the
#: batches in flight before it: a sender's order).
MIN_BATCH = 4
#: Restart pauses after a worker is lost.
RESTART_INITIAL_S = 1.0
RESTART_MAX_S = 60.0
#: How long :meth:`VerifyPool.start` waits for a child to say it is ready.
START_TIMEOUT_S = 30.0
#: Larger than any batch the broker sends: it is flushed once past MAX_BATCH_BYTES, so by at
#: most one envelope (an envelope is at most the largest frame: 64 MiB, broker.config).
_MAX_MESSAGE = MAX_BATCH_BYTES + (64 << 20) + (1 << 16)


class _Batch:
    """One batch sent to a worker, or being filled for it."""

    __slots__ = ("answers", "items", "number", "size", "verdicts")

    def __init__(self, number: int) -> None:
        self.number = number
        self.size = 0
        self.items: list[bytes] = []
        self.verdicts: list[Verdict] = []
        #: Its verdicts, once known: the worker's, or the loop's own for a small batch (which
        #: waits behind those in flight).
        self.answers: bytes | None = None


def _settle(batch: _Batch) -> None:
    """Hand out a batch's verdicts, in order: its answers, or the loop's own if it has none."""
    answers = batch.answers if batch.answers is not None else verify_items(batch.items)
    for verdict, ok in zip(batch.verdicts, answers, strict=True):
        _hand(verdict, ok == 1)


def _hand(verdict: Verdict, ok: bool) -> None:
    # A failing callback must not take the worker's socket (and every other verdict) with it.
    try:
        verdict(ok)
    except Exception:
        log.exception("verdict_callback_failed")


class _Worker(asyncio.Protocol):
    """The loop's end of one child's socket."""

    def __init__(self, pool: VerifyPool, slot: int, process: subprocess.Popen[bytes]) -> None:
        self.pool = pool
        self.slot = slot
        self.process = process
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sent: collections.deque[_Batch] = collections.deque()
        self.filling: _Batch | None = None
        self.pending = 0  # envelopes sent or being filled, not yet answered
        self.lost = False
        self._stall: asyncio.TimerHandle | None = None
        self._numbers = 0
        self._unpacker = msgpack.Unpacker(max_buffer_size=_MAX_MESSAGE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def submit(self, key: bytes, body: bytes, signature: bytes, verdict: Verdict) -> None:
        batch = self.filling
        if batch is None:
            self._numbers += 1
            batch = self.filling = _Batch(self._numbers)
            asyncio.get_running_loop().call_soon(self.flush)
        batch.items += (key, body, signature)
        batch.verdicts.append(verdict)
        batch.size += len(body)
        self.pending += 1
        if len(batch.verdicts) >= MAX_BATCH or batch.size >= MAX_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        batch, self.filling = self.filling, None
        if batch is None:
            return
        count = len(batch.verdicts)
        if self.lost or self.transport is None or count < MIN_BATCH:
            self.pool.on_loop += count
            batch.answers = verify_items(batch.items)
            if self.sent:  # behind the batches in flight: in order (a lost worker has none)
                self.sent.append(batch)
                return
            self.pending -= count
            _settle(batch)
            return
        self.sent.append(batch)
        self.transport.write(msgpack.packb([batch.number, batch.items]))
        if len(self.sent) == 1:
            self._watch(batch)

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for message in self._unpacker:
            if not self.ready.done():
                if message == ["ready"]:
                    self.ready.set_result(None)
                    continue
                self.fail(f"it said {message!r} instead of ready")
                return
            if not self.sent:
                self.fail("it answered a batch it was not sent")
                return
            batch = self.sent[0]
            verdicts = check_reply(message, batch.number, len(batch.verdicts))
            if verdicts is None:
                self.fail("it answered garbage")
                return
            batch.answers = verdicts
            self.pool.answered(self, len(batch.verdicts))
            # It, then the loop's own answers that waited behind it.
            while self.sent and self.sent[0].answers is not None:
                settled = self.sent.popleft()
                self.pending -= len(settled.verdicts)
                _settle(settled)
            if self.sent:
                self._watch(self.sent[0])

    def _watch(self, batch: _Batch) -> None:
        """Give the worker up if ``batch`` (now its oldest) is not answered in time."""
        if self._stall is not None:
            self._stall.cancel()
        self._stall = asyncio.get_running_loop().call_later(STALL_S, self._stalled, batch)

    def _stalled(self, batch: _Batch) -> None:
        if self.sent and self.sent[0] is batch:
            self.fail(f"it has not answered for {STALL_S:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("its socket closed" if exc is None else f"its socket failed: {exc}")

    def fail(self, reason: str) -> None:
        """Give the worker up: what it owes is checked on the loop, in order."""
        if self.lost:
            return
        self.lost = True
        if self._stall is not None:
            self._stall.cancel()
        if self.transport is not None:
            self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(BrokerError(f"a verify worker did not start: {reason}",
                                                 code="unavailable"))
        owed = sum(len(b.verdicts) for b in self.sent if b.answers is None)
        # Its batches, oldest first, then the one being filled: the order they were submitted.
        self.pool.on_loop += owed
        while self.sent:
            _settle(self.sent.popleft())
        self.flush()
        self.pending = 0
        self.pool.lost(self, reason, owed)

    def stop(self) -> None:
        """Drop what is owed and close the socket (the child exits when it reads the end)."""
        self.lost = True
        self.sent.clear()
        self.filling = None
        self.pending = 0
        if self._stall is not None:
            self._stall.cancel()
        if self.transport is not None:
            self.transport.abort()


class VerifyPool:
    """Worker processes that check envelope signatures for the event loop."""

    def __init__(self, size: int, *, timeout: float = START_TIMEOUT_S) -> None:
        """Use :meth:`start`."""
        if size < 1:
            raise ValueError("a verify pool needs at least one worker")
        self.size = size
        self.timeout = timeout
        self._workers: list[_Worker | None] = [None] * size
        self._restarts: dict[int, asyncio.Task[None]] = {}
        #: The next restart pause of a slot whose worker was lost (RESTART_INITIAL_S if none).
        self._pause: dict[int, float] = {}
        #: Killed workers not yet waited for.
        self._killed: list[subprocess.Popen[bytes]] = []
        self._closed = False
        self.lost_workers = 0
        #: Signatures checked by the workers, and on the loop (a lone one while a worker was
        #: idle, or with no worker to take it).
        self.by_workers = 0
        self.on_loop = 0

    @classmethod
    async def start(cls, size: int, *, timeout: float = START_TIMEOUT_S) -> VerifyPool:
        """Start ``size`` workers; return once each is ready. ``BrokerError`` if one cannot."""
        pool = cls(size, timeout=timeout)
        try:
            for slot in range(size):
                pool._workers[slot] = await pool._spawn(slot)
        except BaseException:
            await pool.close()
            raise
        return pool

    @property
    def owed(self) -> int:
        """Envelopes the workers have not answered yet."""
        return sum(w.pending for w in self._workers if w is not None)

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids."""
        return [w.process.pid for w in self._workers if w is not None and not w.lost]

    def submit(self, key: bytes, body: bytes, signature: bytes, verdict: Verdict) -> None:
        """Have ``signature`` over ``body`` checked against ``key``; ``verdict`` gets the
        answer later on the loop, or at once when the loop checks it itself."""
        worker = self._workers[zlib.crc32(key) % self.size] if self.size > 1 else self._workers[0]
        if worker is not None and worker.pending >= MAX_PENDING:
            # What it owes is checked here, in order, before this one.
            worker.fail(f"it fell {worker.pending} envelopes behind")
            worker = None
        if worker is None:
            self.on_loop += 1
            _hand(verdict, check_signature(key, DOMAIN_ENVELOPE, body, signature))
            return
        worker.submit(key, body, signature, verdict)

    def lost(self, worker: _Worker, reason: str, owed: int) -> None:
        """Called by a worker that failed: log it and start another after a pause."""
        if self._workers[worker.slot] is not worker:
            return  # not in place yet (its start fails instead) or already replaced
        self._workers[worker.slot] = None
        self._kill(worker.process)
        if self._closed:
            return
        self.lost_workers += 1
        log.error("verify_worker_lost", slot=worker.slot, pid=worker.process.pid, reason=reason,
                  verified_on_loop=owed,
                  restart_in_s=self._pause.get(worker.slot, RESTART_INITIAL_S))
        self._schedule_restart(worker.slot)

    def answered(self, worker: _Worker, count: int) -> None:
        """A worker answered a batch: the next loss of its slot restarts after a short pause."""
        self.by_workers += count
        self._pause.pop(worker.slot, None)

    def _kill(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        if process.poll() is None:
            self._killed.append(process)  # waited for at close (or reaped by the next start)

    def _schedule_restart(self, slot: int) -> None:
        pause = self._pause.get(slot, RESTART_INITIAL_S)
        self._pause[slot] = min(pause * 2, RESTART_MAX_S)
        self._restarts[slot] = asyncio.get_running_loop().create_task(
            self._restart(slot, pause), name=f"verify-worker-{slot}")

    async def _restart(self, slot: int, pause: float) -> None:
        try:
            await asyncio.sleep(pause)
            try:
                worker = await self._spawn(slot)
            except Exception as exc:  # whatever it is, the slot must not stay empty for good
                reason = exc.reason if isinstance(exc, BrokerError) else repr(exc)
                log.error("verify_worker_not_restarted", slot=slot, reason=reason,
                          retry_in_s=self._pause.get(slot, RESTART_INITIAL_S))
                self._schedule_restart(slot)
                return
            if self._closed:
                worker.stop()
                return
            self._workers[slot] = worker
            log.info("verify_worker_restarted", slot=slot, pid=worker.process.pid)
        finally:
            if self._restarts.get(slot) is asyncio.current_task():
                del self._restarts[slot]

    async def _spawn(self, slot: int) -> _Worker:
        """A started, ready worker for ``slot`` (not yet in place); ``BrokerError`` if not."""
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            raise BrokerError(f"cannot start a verify worker: {exc}", code="unavailable") from exc
        try:
            process = child.spawn("broker.verifier", theirs)
        except (OSError, subprocess.SubprocessError) as exc:
            ours.close()
            raise BrokerError(f"cannot start a verify worker: {exc}",
                              code="unavailable") from exc
        worker = _Worker(self, slot, process)
        try:
            await asyncio.get_running_loop().create_unix_connection(lambda: worker, sock=ours)
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(worker.ready)
            if worker.lost:  # it said ready, then went away before it was in place
                raise BrokerError("a verify worker stopped as soon as it started",
                                  code="unavailable")
        except BaseException as exc:
            worker.stop()
            ours.close()
            await child.kill(process)
            if isinstance(exc, TimeoutError):
                raise BrokerError(f"a verify worker did not start within {self.timeout:g} s",
                                  code="unavailable") from None
            if isinstance(exc, OSError):
                raise BrokerError(f"cannot reach a verify worker: {exc}",
                                  code="unavailable") from exc
            raise
        return worker

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (what they owe is dropped) and wait for them to exit."""
        self._closed = True
        log.info("verify_pool_closed", by_workers=self.by_workers, on_loop=self.on_loop,
                 lost_workers=self.lost_workers)
        for task in list(self._restarts.values()):
            task.cancel()
        for task in list(self._restarts.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * self.size
        for worker in workers:
            worker.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for worker in workers:
            if not await child.exited(worker.process, deadline):
                self._kill(worker.process)
        killed, self._killed = self._killed, []
        for process in killed:
            await asyncio.to_thread(process.wait)


# --- the child -------------------------------------------------------------------------------

def serve(sock: socket.socket) -> int:
    """The child's loop: answer each batch with its verdicts, in order; return when the
    broker closes the socket (or sends what it never would: a malformed request)."""
    child.ignore_stop_signals()
    unpacker = msgpack.Unpacker(max_buffer_size=_MAX_MESSAGE)
    try:
        sock.sendall(msgpack.packb(["ready"]))
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return 0
            unpacker.feed(data)
            replies = []
            for message in unpacker:
                request = check_request(message)
                if request is None:
                    return 2
                number, items = request
                replies.append(msgpack.packb([number, verify_items(items)]))
            if replies:
                sock.sendall(b"".join(replies))
    except (OSError, ValueError, msgpack.UnpackException):
        return 1  # the broker is gone, or sent what no broker sends: it verifies on its loop


def main(argv: list[str]) -> int:
    """``python -m broker.verifier FD``."""
    with socket.socket(fileno=int(argv[0])) as sock:
        return serve(sock)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
