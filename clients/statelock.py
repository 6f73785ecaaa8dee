"""One gateway client per state directory at a time.

A gateway's ``state_dir`` holds the ids its application finished (:mod:`clients.dedup`), the
highest node certificates it took (:mod:`clients.certs`) and its witness state
(:mod:`clients.witness`). Two clients writing them at once (two gateway processes given the
same directory by mistake, or two clients in one process) would overwrite each other's files:
finished ids lost (a message shown twice), a witness forgetting what it cosigned. So a client
takes an exclusive ``flock`` on ``state_dir/lock`` before it reads anything there, and a second
one is refused with :class:`StateInUse`, naming the process that holds it. The kernel drops the
lock when its holder exits, however it exits: a crashed gateway never leaves it stale.

``flock`` locks belong to an open file description, so a second client in the same process is
refused too. Where ``fcntl`` does not exist (Windows), there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path

from clients.dedup import StateWriteFailed
from clients.link import GatewayError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms the broker runs on
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "lock"


class StateInUse(GatewayError):
    """Another gateway client holds this state directory."""

    code = "state_in_use"


class StateLock:
    """The exclusive lock on a state directory, held from construction to :meth:`release` (or
    until the object is collected: a client never closed does not keep it for good). A child
    process forked meanwhile does not inherit it."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateWriteFailed(f"cannot lock {directory}: {exc.strerror}") from exc
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise StateInUse(f"{directory} is in use by another gateway client"
                                 + (f" (pid {holder})" if holder else "")) from None
        # Whose it is, for the message a second client gets (not part of the lock itself).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let another client have the directory (idempotent)."""
        if self._fd is not None:
            self._fd = None
            self._closer()  # closing the file description drops the flock
            _HELD.discard(self)

    def _forget_in_child(self) -> None:
        # The child's copy of the descriptor would keep the parent's lock after the parent
        # exits; closing it leaves the parent's own copy, and its lock, alone.
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._closer.detach()
            with contextlib.suppress(OSError):
                os.close(fd)


#: Locks held in this process (closed in a forked child: see StateLock._forget_in_child).
_HELD: weakref.WeakSet[StateLock] = weakref.WeakSet()


def _forget_all_in_child() -> None:
    for lock in list(_HELD):
        lock._forget_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_all_in_child)


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
