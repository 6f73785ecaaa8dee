"""Slow-client protection shared by the node and the admin listeners.

What aiohttp's server offers, and what it does not (aiohttp 3.14):

- ``keepalive_timeout`` is armed when a connection is accepted and re-armed after each response;
  when it fires while no complete request head has arrived, the connection is closed. Set to
  ``request_timeout_s`` it bounds how long a client may take to send a request head (one byte
  every few seconds, or an upgrade request it never finishes), and how long an idle keep-alive
  connection stays. It does not fire while a handler runs (a WebSocket, a streamed export).
- ``lingering_time`` bounds how long the server reads and discards a request body the handler
  did not read before it closes the connection.
- ``max_line_size``, ``max_field_size`` and ``max_headers`` bound the memory of a request head.
- Nothing bounds a response write to a client that does not read: the writer waits on the
  transport's drain for ever. :class:`StallWatchdog` (ours) samples every connection of a
  listener and aborts one whose transport stays paused for writing, without progress, for
  ``write_stall_timeout_s``.

- aiohttp's ``TCPSite`` does not expose the event loop's ``ssl_handshake_timeout`` (60 s by
  default): a client that opens a connection and never finishes its TLS handshake would hold it
  that long. :class:`TlsSite` (ours) binds the handshake to the node protocol's own handshake
  timeout (``limits.handshake_timeout_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from broker.guard import StallTracker

log = structlog.get_logger("broker.listener")

#: Bounds of a request head: ample for a WebSocket upgrade or an admin request with a token.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 64


def http_server_kwargs(request_timeout_s: float) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` that bound slow request heads and bodies."""
    return {"keepalive_timeout": request_timeout_s, "lingering_time": request_timeout_s,
            "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
            "max_headers": MAX_HEADERS}


class TlsSite(web.TCPSite):
    """A ``TCPSite`` whose TLS handshakes must complete within ``handshake_timeout`` seconds."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext, handshake_timeout: float) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self.handshake_timeout = handshake_timeout

    async def start(self) -> None:
        # What TCPSite.start does, plus the one argument it does not pass through.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.handshake_timeout)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


class StallWatchdog:
    """Aborts the connections of one listener that cannot write for ``timeout`` seconds.

    Every ``min(1 s, timeout / 4)`` it samples each connection's transport (paused for writing?
    bytes still buffered?) into a :class:`broker.guard.StallTracker`.
    """

    def __init__(self, runner: web.BaseRunner, timeout: float, *, listener: str) -> None:
        self.runner = runner
        self.tracker: StallTracker[RequestHandler] = StallTracker(timeout)
        self.interval = min(1.0, timeout / 4)
        self.listener = listener
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling (once the runner is set up)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"stall-watchdog-{self.listener}")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def sweep(self, now: float) -> int:
        """One round: abort the stalled connections; return how many."""
        server = self.runner.server
        if server is None:
            return 0
        samples = []
        for handler in server.connections:
            transport = handler.transport
            if transport is not None:
                samples.append((handler, handler.writing_paused,
                                transport.get_write_buffer_size()))
        stalled = self.tracker.sweep(samples, now)
        for handler in stalled:
            transport = handler.transport
            if transport is None:
                continue
            log.warning("write_stalled", listener=self.listener,
                        remote=_peer(transport), buffered=transport.get_write_buffer_size(),
                        timeout=self.tracker.timeout)
            transport.abort()
        return len(stalled)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.sweep(loop.time())
            except Exception:  # never let the watchdog die silently
                log.exception("stall_watchdog_failed", listener=self.listener)


async def close_listener(watchdog: StallWatchdog | None, runner: web.BaseRunner | None) -> None:
    """Stop a listener's stall watchdog, then its runner (either may never have started)."""
    if watchdog is not None:
        await watchdog.stop()
    if runner is not None:
        await runner.cleanup()


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return None


class ReadDeadline:
    """A deadline for the reads of the current task, moved with :meth:`move`.

    ``asyncio.timeout_at`` around every read creates a context and re-arms a timer per frame,
    a few per cent of the broker at load. Here one timer is armed at a time: when it fires
    before the deadline (moved later meanwhile), it re-arms for the new one; once the deadline
    has passed during a read, it cancels the task, and :meth:`reading` turns that
    cancellation, and only that one, into ``TimeoutError``. Nothing outside a read is ever
    cancelled by it: a deadline that passes between reads fails the next read at once.
    """

    def __init__(self, at: float) -> None:
        self._at = at
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._armed_for: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._reading = False
        self._fired = False

    def move(self, at: float) -> None:
        """The new deadline (later, or earlier: then the timer is re-armed)."""
        self._at = at
        if self._armed_for is not None and at < self._armed_for:
            self._disarm()
            if self._reading:  # else the next read arms it
                self._arm()

    def _arm(self) -> None:
        self._armed_for = self._at
        self._handle = self._loop.call_at(self._at, self._check)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._armed_for = None

    def _check(self) -> None:
        self._handle = self._armed_for = None
        if self._loop.time() < self._at:
            self._arm()
        elif self._reading and self._task is not None:
            self._fired = True
            self._task.cancel()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Wrap one read: ``TimeoutError`` if the deadline passes before it completes."""
        if self._task is None or self._loop.time() >= self._at:
            raise TimeoutError
        if self._handle is None:
            self._arm()
        cancelling = self._task.cancelling()
        self._reading = True
        try:
            yield
        except asyncio.CancelledError:
            if self._fired and self._task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise  # cancelled by someone else: not ours to swallow
        finally:
            self._reading = self._fired = False

    def close(self) -> None:
        """Disarm (in ``finally``: no timer outlives the connection)."""
        self._disarm()
