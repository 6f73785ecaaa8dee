"""The store's writer in a process of its own (``[audit] writer = "process"``; opt-in).

By default the audit log commits in the broker's own process: small batches on the event
loop, whose thread then waits for the SQLite work and the fsync, large ones in a thread.
:class:`WriterProcess` moves every commit to a child process that owns a write connection to
the same store file: the loop pickles the batch, sends it over a socket pair and goes on
serving nodes until the child answers. The broker's own connection still reads (WAL: a commit
by the child is visible to the next read once it returned). Measured on two cores it does not
raise throughput and costs ~0.3 ms per commit (docs/decisions.md, "Commits in a writer
process"); what it buys is an event loop that never waits on the disk.

One batch is in flight at a time (the audit log's writer awaits each commit), so the child is
always reading when a batch is sent and the reply is a few bytes. What the child answers is
the truth about durability: ``ok`` after ``COMMIT`` returned, or the error the commit raised
(rolled back: nothing written). If the child dies or the exchange is cancelled, the outcome
of the commit in flight is unknown: the caller treats it as failed and the log stops (nothing
acknowledged is lost; a commit that did complete is found at the next start). The child exits
when its socket closes, so it never outlives the broker for long, also after a ``SIGKILL``.
It runs in its own process group (a terminal's Ctrl-C does not reach it) and ignores
``SIGINT``, ``SIGTERM`` and ``SIGHUP`` (a service manager signals the whole control group), so
that the broker's orderly stop can still commit its last batch and checkpoint through it.

The child is started with ``subprocess`` (``python -m broker.store.writer_process``, by
:mod:`broker.child` as the verify workers are), not :mod:`multiprocessing`: it needs no copy of
the broker's state, and nothing of the parent's ``__main__`` is re-imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgpack

from broker import child
from broker.errors import StorageError
from broker.store.base import Batch
from broker.store.sqlite import open_writer
from broker.store.sqlite_write import commit_batch

#: How long :meth:`WriterProcess.start` waits for the child to open the store.
START_TIMEOUT_S = 30.0


def _gone(what: str, process: subprocess.Popen[bytes]) -> StorageError:
    # A child that closed its socket is usually about to exit: give it a moment, so that the
    # reason names its status (and it is reaped).
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(0.5)
    code = process.poll()
    status = "is still running" if code is None else f"exited with status {code}"
    return StorageError(f"the store writer process {what} (it {status})", code="unavailable")


class WriterProcess:
    """A child process that commits :class:`~broker.store.base.Batch` es to one SQLite store."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        """Use :meth:`start`."""
        self.process = process
        self._sock = sock
        self._exchange: asyncio.Task[list[str]] | None = None
        #: Set when an exchange ended abnormally: the socket may be out of step (a late reply
        #: could be taken for the next batch's), so no commit goes through it again.
        self._broken: str | None = None

    @property
    def pid(self) -> int:
        """The child's process id (its CPU time is the broker's too)."""
        return self.process.pid

    @classmethod
    async def start(cls, path: Path, *, timeout: float = START_TIMEOUT_S) -> WriterProcess:
        """Start a writer for the store at ``path`` (already created by
        :class:`~broker.store.sqlite.SqliteStore`); return once it has opened the store.
        Raises ``StorageError`` if it cannot."""
        ours, theirs = socket.socketpair()
        try:
            process = child.spawn("broker.store.writer_process", theirs, str(path))
        except BaseException as exc:
            ours.close()
            if isinstance(exc, (OSError, subprocess.SubprocessError)):
                raise StorageError(f"cannot start the store writer process: {exc}",
                                   code="unavailable") from exc
            raise
        ours.setblocking(False)
        writer = cls(process, ours)
        try:
            async with asyncio.timeout(timeout):
                reply = await writer._receive()
            if reply[0] != "ready":
                raise StorageError(f"the store writer process did not start: {reply[-1]}",
                                   code=reply[1] if reply[0] == "error" else "unavailable")
        except TimeoutError:
            await writer.close()
            raise _gone(f"did not open the store within {timeout:g} s", process) from None
        except BaseException:
            await writer.close()
            raise
        return writer

    async def commit(self, batch: Batch) -> bool:
        """Commit ``batch`` in the child; ``True`` if the caller was cancelled meanwhile. As
        with a commit in a thread, a cancelled caller still waits for the outcome (the
        exchange with the child runs as a task of its own, shielded): otherwise the caller
        could not tell whether its entries became durable. Raises ``StorageError`` if the
        commit failed or the child is gone (then the outcome is unknown)."""
        if self._exchange is not None:
            raise RuntimeError("one commit at a time")
        if self._broken is not None:
            raise StorageError(f"the store writer process is unusable: {self._broken}",
                               code="unavailable")
        payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        exchange = self._exchange = asyncio.ensure_future(self._round_trip(payload))
        cancelled = False
        try:
            while not exchange.done():
                try:
                    await asyncio.shield(exchange)
                except asyncio.CancelledError:
                    if exchange.cancelled():  # the exchange itself: its outcome is unknown
                        self._broken = "a commit was cancelled mid-exchange"
                        raise
                    # The caller: it still waits for the outcome (which may be there already:
                    # the cancellation can land after the reply).
                    cancelled = True
                except Exception:
                    pass  # raised by result() below
            try:
                reply = exchange.result()
            except BaseException as exc:
                self._broken = str(exc)
                raise
        finally:
            self._exchange = None
        if reply == ["ok"]:
            return cancelled
        if reply[0] == "error" and len(reply) == 3:
            raise StorageError(reply[2], code=reply[1])
        self._broken = f"it answered {reply!r}"
        raise StorageError(f"the store writer process answered {reply!r}", code="unavailable")

    async def _round_trip(self, payload: bytes) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self._sock, _HEADER.pack(len(payload)))
            await loop.sock_sendall(self._sock, payload)
        except OSError as exc:
            raise _gone(f"cannot be reached ({exc})", self.process) from exc
        return await self._receive()

    async def _receive(self) -> list[str]:
        """The child's next reply."""
        (length,) = _HEADER.unpack(await self._read(_HEADER.size))
        if length > _MAX_REPLY:
            raise StorageError("the store writer process answered garbage", code="unavailable")
        try:
            reply = msgpack.unpackb(await self._read(length))
        except (ValueError, msgpack.UnpackException):
            reply = None
        if not (isinstance(reply, list) and reply and all(isinstance(r, str) for r in reply)):
            raise StorageError("the store writer process answered garbage", code="unavailable")
        return reply

    async def _read(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < size:
            try:
                chunk = await loop.sock_recv(self._sock, size - len(data))
            except OSError as exc:
                raise _gone(f"stopped answering ({exc})", self.process) from exc
            if not chunk:
                raise _gone("stopped answering", self.process)
            data += chunk
        return data

    async def close(self, timeout: float = 10.0) -> None:
        """Close the child's socket (it exits when it reads the end) and wait for it; kill it
        if it has not gone within ``timeout``."""
        if self._exchange is not None:  # only if the caller itself was abandoned
            self._exchange.cancel()
            with contextlib.suppress(BaseException):
                await self._exchange
        self._sock.close()
        if not await child.exited(self.process, asyncio.get_running_loop().time() + timeout):
            await child.kill(self.process)


#: Every message is its length (8 bytes, big-endian), then the bytes: a pickled ``Batch`` to
#: the child, a msgpack array of strings back.
_HEADER = struct.Struct("!Q")
_MAX_REPLY = 1 << 20


# --- the child -------------------------------------------------------------------------------

def _send(sock: socket.socket, message: list[str]) -> None:
    body = msgpack.packb(message)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _receive_batch(sock: socket.socket) -> bytes | None:
    """The next request's bytes; ``None`` when the broker closed the socket."""
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    return _read_exactly(sock, _HEADER.unpack(header)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            return None  # a partial request is no request: nothing of it is committed
        data += chunk
    return bytes(data)


def serve(sock: socket.socket, path: Path) -> int:
    """The child's loop: commit each batch received, answer ``ok`` or the error; return when
    the broker closes the socket."""
    # Signals sent to the whole process group are the broker's to act on (stop, reload).
    child.ignore_stop_signals()
    try:
        writer = open_writer(path)
    except StorageError as exc:
        _send(sock, ["error", exc.code, exc.reason])
        return 1
    try:
        _send(sock, ["ready", str(os.getpid())])
        while True:
            try:
                request = _receive_batch(sock)
            except OSError:
                return 0
            if request is None:
                return 0
            try:
                # From the broker that started us, over our socket.
                commit_batch(writer, pickle.loads(request))
            except StorageError as exc:
                reply = ["error", exc.code, exc.reason]
            except Exception as exc:  # rolled back by commit_batch: a definite "not written"
                reply = ["error", "internal", f"the store writer failed: {exc!r}"]
            else:
                reply = ["ok"]
            try:
                _send(sock, reply)
            except OSError:
                return 0  # the broker is gone; what was committed is found at its next start
    finally:
        writer.close()


def main(argv: list[str]) -> int:
    """``python -m broker.store.writer_process FD PATH``."""
    fd, path = int(argv[0]), Path(argv[1])
    with socket.socket(fileno=fd) as sock:
        return serve(sock, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
