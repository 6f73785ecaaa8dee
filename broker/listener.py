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

Refused TLS handshakes. With ``loop.create_server(ssl=...)`` a failed server-side handshake is
invisible, under asyncio's loop as under uvloop: both only debug-log it when the loop is in
debug mode (the error is an ``OSError``, so ``call_exception_handler`` never sees it), and the
application protocol is never called (its ``connection_made`` comes after a successful
handshake). ``loop.start_tls`` from a plain protocol would raise the error, but uvloop starts
reading right after ``connection_made`` (``pause_reading`` there is ignored), so the ClientHello
can reach the plain protocol before ``start_tls`` runs and is lost. So :class:`TlsAcceptor`
accepts connections itself and hands each to ``loop.connect_accepted_socket(ssl=...)``, which
runs the same handshake (the same ``SSLProtocol`` of the loop) and raises its error, on both
loops alike; :class:`HandshakeRefusals` logs and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from broker.guard import LogLimiter, StallTracker, address_key
from broker.metrics import Metrics
from broker.tls import handshake_refusal

log = structlog.get_logger("broker.listener")

#: Bounds of a request head: ample for a WebSocket upgrade or an admin request with a token.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 64

#: A refused TLS handshake is logged at most once per this many seconds per address and kind
#: (a scanner must not flood the log); the line says how many were held back since the last.
REFUSAL_LOG_INTERVAL_S = 10.0
#: How long to stop accepting after ``accept()`` fails for lack of resources (EMFILE, ENOBUFS):
#: asyncio's own server waits as long.
ACCEPT_RETRY_DELAY_S = 1.0

#: What the acceptor calls with the peer address and the error of a failed handshake.
RefusalSink = Callable[[tuple[str, int], BaseException], None]


def http_server_kwargs(request_timeout_s: float) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` that bound slow request heads and bodies."""
    return {"keepalive_timeout": request_timeout_s, "lingering_time": request_timeout_s,
            "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
            "max_headers": MAX_HEADERS}


class TlsSite(web.TCPSite):
    """A ``TCPSite`` whose TLS handshakes must complete within ``handshake_timeout`` seconds, and
    whose failed handshakes are logged and counted (:class:`HandshakeRefusals`).

    ``metrics`` is the broker's (``hub.metrics``, exported at ``/metrics``); without it the
    counter lives in a registry of its own, which nothing exports.
    """

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 ssl_context: ssl.SSLContext, handshake_timeout: float,
                 metrics: Metrics | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self.handshake_timeout = handshake_timeout
        self.refusals = HandshakeRefusals(metrics if metrics is not None else Metrics())

    async def start(self) -> None:
        # What TCPSite.start does, with our acceptor instead of create_server's (see above).
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None and self._ssl_context is not None
        sockets = await listening_sockets(self._host, self._port, backlog=self._backlog,
                                          reuse_port=bool(self._reuse_port))
        self._server = TlsAcceptor(sockets, server, self._ssl_context,
                                   handshake_timeout=self.handshake_timeout,
                                   on_refused=self.refusals.record)
        self._bound_port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, drop the handshakes in progress, and wait until both are done."""
        acceptor = self._server
        await super().stop()
        if isinstance(acceptor, TlsAcceptor):
            await acceptor.wait_closed()


class HandshakeRefusals:
    """Logs (``tls_handshake_refused``) and counts (``coalition_tls_handshakes_refused``) the
    failed TLS handshakes of one listener.

    Every failure is counted; the log line comes at most once per ``interval`` seconds per
    address (an IPv6 /64 counts as one) and kind, with ``held_back``: the failures of that
    address and kind not logged since the previous line. Only the peer address and OpenSSL's
    reason are logged, never anything the client sent.
    """

    def __init__(self, metrics: Metrics, *, interval: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.metrics = metrics
        self._quiet = LogLimiter(interval=interval, capacity=4096)

    def record(self, peer: tuple[str, int], exc: BaseException, now: float | None = None) -> None:
        """One failed handshake from ``peer`` (host, port), with the error the loop raised;
        ``now`` on the loop's clock (default: the running loop's time)."""
        refusal = handshake_refusal(exc)
        self.metrics.tls_refused(refusal.kind)
        host, port = peer
        if now is None:
            now = asyncio.get_running_loop().time()
        held_back = self._quiet.note((address_key(host), refusal.kind), now)
        if held_back is None:
            return
        extra = {"detail": refusal.detail} if refusal.detail else {}
        # A client that gives up by itself (a TCP health check, a gateway that does not trust
        # the broker's certificate) is no attack on the broker: info, not a warning.
        emit = log.info if refusal.kind == "client_aborted" else log.warning
        emit("tls_handshake_refused", remote=host, remote_port=port, kind=refusal.kind,
             reason=refusal.reason, held_back=held_back, **extra)


async def listening_sockets(host: str | None, port: int, *, backlog: int,
                            reuse_port: bool = False) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address of ``host`` (every interface when
    ``None`` or empty), bound as ``loop.create_server`` binds them: ``SO_REUSEADDR``, and IPv6
    sockets IPv6-only. Raises ``OSError`` naming the address that cannot be bound."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sock = socket.create_server(address, family=family, backlog=backlog,
                                        reuse_port=reuse_port)
            sockets.append(sock)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    return sockets


class TlsAcceptor(asyncio.AbstractServer):
    """Accepts the connections of ``sockets`` and runs each one's TLS handshake with
    ``loop.connect_accepted_socket``, then hands it to a protocol from ``factory`` (aiohttp's
    server), as ``loop.create_server(ssl=...)`` would; a handshake that fails or does not finish
    within ``handshake_timeout`` seconds is reported to ``on_refused``, its connection closed.
    Serves from construction; :meth:`close` stops accepting and drops the handshakes still in
    progress (connections already handed over belong to the factory's server).
    """

    def __init__(self, sockets: list[socket.socket],
                 factory: Callable[[], asyncio.BaseProtocol], ssl_context: ssl.SSLContext, *,
                 handshake_timeout: float, on_refused: RefusalSink) -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._factory = factory
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout
        self._on_refused = on_refused
        self._accepting = [self._loop.create_task(self._accept(sock), name="tls-accept")
                           for sock in sockets]
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing: list[asyncio.Task[None]] = []

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (none once closed)."""
        return () if self._closed else tuple(self._sockets)

    def close(self) -> None:
        """Stop accepting and drop the handshakes in progress (:meth:`wait_closed` waits)."""
        if not self._closed:
            self._closed = True
            self._closing = [*self._accepting, *self._handshakes]
            for task in self._closing:
                task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the listening sockets and the dropped handshakes are closed."""
        if self._closed:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed

    async def start_serving(self) -> None:
        """Nothing to do: the acceptor serves from construction."""

    async def serve_forever(self) -> None:
        """Serve until cancelled or closed, then close."""
        try:
            await asyncio.gather(*self._accepting)
        finally:
            self.close()
            await self.wait_closed()

    async def _accept(self, listening: socket.socket) -> None:
        try:
            while True:
                try:
                    conn, address = await self._loop.sock_accept(listening)
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the client left before accept(): nothing to report
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait, never die
                    log.error("accept_failed", error=errno.errorcode.get(exc.errno or 0, str(exc)),
                              retry_in=ACCEPT_RETRY_DELAY_S)
                    await asyncio.sleep(ACCEPT_RETRY_DELAY_S)
                    continue
                task = self._loop.create_task(self._handshake(conn, (address[0], address[1])),
                                              name="tls-handshake")
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
        finally:
            # Here, not in close(): the cancelled accept has unregistered the socket by now.
            listening.close()

    async def _handshake(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            # From here the loop owns ``conn``: on failure it has closed it already.
            await self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._ssl_context,
                ssl_handshake_timeout=self._handshake_timeout)
        except Exception as exc:  # what failed the handshake (CancelledError: closing)
            try:
                self._on_refused(peer, exc)
            except Exception:  # a bug in reporting must not go unseen, nor stop the listener
                log.exception("tls_refusal_not_recorded", remote=peer[0])


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
