"""Worker processes that decide runs of audit entries for the auditor (:mod:`clients.replay`).

``coalition audit verify`` spends nearly all its time parsing entries and re-running their
decisions, which each entry needs on its own; the tree and the copies outstanding follow the log
in order and are cheap. With workers, runs of entries (:data:`CHUNK` each) go round the workers
while the auditor hashes the tree and applies the steps that come back, in log order; the report
is the one the auditor makes in line (tests compare the two).

A worker is ``python -m clients.replay_child FD`` (:func:`broker.child.spawn`; the protocol is
in :mod:`clients.replay_child`): it rebuilds the bundles the auditor verified from their signed
documents, then answers each run with its steps. It exits when its socket closes, so it never
outlives the auditor for long.

Nothing a worker says is needed for the verdict: a worker that fails, or answers anything but
the steps of the run it was given, is dropped, and its runs (and all later ones) are decided in
line. A run decided from a wrong guess of the suspensions at its start (an ``admin`` entry in a
run still in flight) is decided again in line.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack
import structlog

from broker import child
from clients import replay_child
from clients.replay import Replay, Suspensions, decide_steps, is_step
from policies.bundle import Bundle
from policies.cache import DecisionCache

log = structlog.get_logger("clients.replay_workers")

#: Entries per run sent to a worker, and bytes of them (a run ends at whichever comes first).
CHUNK = 2048
RUN_BYTES = 32 << 20
#: Below this many entries the auditor decides in line (starting workers costs ~0.2 s).
MIN_ENTRIES = 20_000
#: A worker that has not said it is ready, or answered a run, after this long is dropped.
TIMEOUT_S = 60.0

Entries = list[tuple[int, bytes]]
#: The suspended and the revoked nodes a run was decided from (Suspensions.snapshot()).
Guess = tuple[list[str], list[str]]
InFlight = collections.deque[tuple["_Worker", Entries, Guess]]


def default_workers(entries: int) -> int:
    """Workers for a log of ``entries``: one per CPU this process may use (at most 4), none
    for a small log or on one CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = min(cpus or 1, 4)
    return cpus if entries >= MIN_ENTRIES and cpus > 1 else 0


class WorkerLost(Exception):
    """A worker failed or answered something else than it was asked."""


class _Worker:
    """The auditor's end of one worker."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.process: subprocess.Popen[bytes] = child.spawn("clients.replay_child", theirs)
        except BaseException:
            ours.close()  # spawn closes theirs
            raise
        self.sock = ours
        self.sock.settimeout(TIMEOUT_S)

    def send(self, message: Any) -> None:
        try:
            replay_child.send(self.sock, message)
        except OSError as exc:
            raise WorkerLost(f"{type(exc).__name__}: {exc}") from exc

    def receive(self) -> Any:
        try:
            return replay_child.receive(self.sock)
        except (OSError, EOFError, ValueError, msgpack.UnpackException) as exc:
            raise WorkerLost(f"{type(exc).__name__}: {exc}") from exc

    def close(self, *, kill: bool = False) -> None:
        """Close its socket (it exits when it reads the end of it) and reap it; ``kill``: at
        once, for one whose work is no longer wanted."""
        self.sock.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Decider:
    """Decides runs of entries into steps (:func:`clients.replay.decide_steps`), with workers
    when it has any, and hands them back in log order for :class:`~clients.replay.Replay`."""

    def __init__(self, bundles: Mapping[bytes, Bundle], contents: Mapping[bytes, bytes],
                 replay: Replay, workers: int) -> None:
        """``contents``: the signed content of each bundle in ``bundles``, for the workers."""
        self.bundles = bundles
        self.replay = replay
        self.cache = DecisionCache(max_entries=1 << 16)
        self.workers: list[_Worker] = []
        self._numbers = 0
        if workers > 0:
            self._start(workers, contents)

    def __enter__(self) -> Decider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, *, kill: bool = False) -> None:
        """Stop the workers (``kill``: without letting them finish a run)."""
        workers, self.workers = self.workers, []
        for worker in workers:  # all told at once, then waited for
            worker.sock.close()
        for worker in workers:
            worker.close(kill=kill)

    def steps(self, runs: Iterator[Entries]) -> Iterator[tuple[Entries, list[list[Any]]]]:
        """``(run, its steps)`` for each run of ``runs``, in order. Between two, the caller
        applies the steps to :attr:`replay` (whose suspensions the next runs start from)."""
        in_flight: InFlight = collections.deque()
        for worker in list(self.workers):
            self._submit(worker, next(runs, None), in_flight)
        while in_flight:
            worker, run, guess = in_flight.popleft()
            steps = self._answer(worker, run, guess)
            if self.workers:  # else lost: what is in flight is decided in line, in order
                # Its next run first, so that it works while the caller applies these steps
                # (the guess misses this run and the other workers' runs: an admin entry in
                # one of them makes it stale, and the run is decided again).
                self._submit(worker, next(runs, None), in_flight)
            yield run, steps
        for run in runs:
            yield run, self._in_line(run)

    def _start(self, count: int, contents: Mapping[bytes, bytes]) -> None:
        try:
            for _ in range(count):
                self.workers.append(_Worker())
        except OSError as exc:
            log.warning("replay_workers_not_started", reason=str(exc))
            self.close(kill=True)
            return
        expected = sorted(self.bundles)
        message = ["bundles", [[digest, contents[digest]] for digest in expected]]
        try:
            for worker in self.workers:
                worker.send(message)
            for worker in self.workers:
                if worker.receive() != ["ready", expected]:
                    raise WorkerLost("it did not build the bundles the auditor verified")
        except WorkerLost as exc:
            log.warning("replay_workers_not_started", reason=str(exc))
            self.close(kill=True)

    def _submit(self, worker: _Worker, run: Entries | None, in_flight: InFlight) -> None:
        if run is None:
            return
        guess = self.replay.suspensions.snapshot()
        self._numbers += 1
        flat: list[Any] = [item for pair in run for item in pair]
        try:
            worker.send([self._numbers, guess[0], guess[1], flat])
        except WorkerLost as exc:
            self._lose(exc)
        in_flight.append((worker, run, guess))

    def _answer(self, worker: _Worker, run: Entries, guess: Guess) -> list[list[Any]]:
        if worker in self.workers:
            try:
                steps = _checked_steps(worker.receive(), run)
            except WorkerLost as exc:
                self._lose(exc)
            else:
                if self.replay.suspensions.snapshot() == guess:
                    return steps
        return self._in_line(run)

    def _in_line(self, run: Entries) -> list[list[Any]]:
        suspensions = Suspensions(*self.replay.suspensions.snapshot())
        return decide_steps(run, self.bundles, self.cache, suspensions)

    def _lose(self, exc: WorkerLost) -> None:
        log.warning("replay_worker_lost", reason=str(exc),
                    detail="the rest of the log is decided in line")
        self.close(kill=True)


def _checked_steps(reply: Any, run: Entries) -> list[list[Any]]:
    """The steps of ``reply`` if they are one well-formed step per entry of ``run``, for that
    entry (:func:`clients.replay.is_step`): what :meth:`Replay.apply` can apply."""
    if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)
            and len(reply[1]) == len(run)):
        raise WorkerLost("it answered something else than the steps of its run")
    steps: list[list[Any]] = reply[1]
    for step, (index, _) in zip(steps, run, strict=True):
        if not is_step(step, index):
            raise WorkerLost(f"it answered a malformed step, or one for another entry than "
                             f"{index}")
    return steps
