"""The transport under a gateway client: one authenticated WebSocket at a time, re-established
with backoff when it drops for a reason a new connection can cure.

:func:`authenticate` opens a WebSocket and runs the handshake (challenge, signed hello,
welcome). :class:`Connection` keeps one :class:`Link` up: it matches answers to requests, hands
every other frame to its owner and, when the link ends, fails the requests in flight, then either
reconnects with :class:`Backoff` or ends for good. It ends for good after :meth:`Connection.close`,
when the broker closes with a reason in :data:`FINAL_CLOSE_REASONS`, when a reconnection is
refused for a reason not in :data:`RETRYABLE_REFUSALS`, when the owner's frame handler fails, or
at the first drop if reconnection is off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from ssl import SSLContext

import aiohttp
import structlog

from broker import wire
from broker.errors import BrokerError, ProtocolError
from broker.session import make_hello
from clients.identity import KeyFile

log = structlog.get_logger("clients.connection")

#: Handshake refusals a later attempt can overcome: the broker is busy or shutting down, or our
#: hello arrived after its deadline. Every other refusal (``bad_signature``, ``unknown_node``,
#: ``node_inactive``, ``handshake_failed`` — the hello is outside the clock skew —,
#: ``unsupported_version``, and the client's own ``wrong_broker``) needs a person to act;
#: retrying would only fill the broker's audit log with failed handshakes.
RETRYABLE_REFUSALS = frozenset({"unavailable", "rate_limited", "not_authenticated", "internal"})

#: Close reasons after which the client must not reconnect: a newer connection of the same node
#: took over (reconnecting would take it back, and the two would evict each other forever).
FINAL_CLOSE_REASONS = frozenset({"replaced"})


class GatewayError(BrokerError):
    """Base of the client library's errors."""

    code = "gateway"


class AuthenticationError(GatewayError):
    """The broker refused the handshake (``code`` says why), or is not the expected broker."""


class RequestRejected(GatewayError):
    """The broker answered a request with an ``error`` frame."""


class ConnectionClosed(GatewayError):
    """The connection ended while a request was waiting, or the client ended for good
    (``code``: ``closed``, ``replaced``, or the refusal code of a failed reconnection)."""

    code = "closed"


class RequestTimeout(GatewayError):
    """No answer (or no connection to ask on) within the client's ``timeout``."""

    code = "timeout"


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Delays between reconnection attempts: exponential from ``initial`` by ``factor`` up to
    ``maximum`` seconds, with full jitter (each delay uniform in ``[0, ceiling]``) so that the
    gateways a broker restart cut off do not all come back in the same instant."""

    initial: float = 0.1
    factor: float = 2.0
    maximum: float = 10.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1:
            raise ValueError("backoff needs 0 < initial <= maximum and factor >= 1")

    def ceiling(self, attempt: int) -> float:
        """The longest delay before attempt ``attempt`` (0 for the first)."""
        try:
            return min(self.maximum, self.initial * self.factor ** attempt)
        except OverflowError:
            return self.maximum

    def delay(self, attempt: int, rng: random.Random) -> float:
        """A jittered delay before attempt ``attempt``."""
        return rng.uniform(0.0, self.ceiling(attempt))

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The delays before attempts 0, 1, 2, … (endless)."""
        return (self.delay(attempt, rng) for attempt in itertools.count())


#: The default reconnection backoff: 0.1 s doubling up to 10 s, with full jitter.
DEFAULT_BACKOFF = Backoff()


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect."""

    url: str
    identity: KeyFile
    broker_name: str
    timeout: float
    max_frame: int
    #: Seconds between WebSocket pings; a missing pong ends the link (a silent dead network).
    heartbeat: float | None
    #: TLS for ``wss://`` URLs (:func:`broker.tls.client_context`: the coalition's CA, and a
    #: client certificate for mutual TLS); ``None``: the system's CAs.
    ssl: SSLContext | None = None


class Link:
    """One authenticated WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: wire.Welcome,
                 max_frame: int) -> None:
        self.ws = ws
        self.welcome = welcome
        self._max_frame = max_frame
        #: The reason the broker gave in its WebSocket close message (e.g. ``replaced``).
        self.close_reason = ""

    async def send(self, frame: wire.Frame) -> None:
        """Send one frame; :class:`ConnectionClosed` if the connection is gone."""
        try:
            await self.ws.send_bytes(wire.encode_frame(frame))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise ConnectionClosed(f"connection lost while sending: {exc}") from exc

    async def pump(self, on_frame: Callable[[wire.Frame], None]) -> None:
        """Hand every frame received to ``on_frame`` until the connection ends."""
        while True:
            msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                try:
                    frame = wire.decode_frame(msg.data, max_bytes=2 * self._max_frame)
                except ProtocolError as exc:
                    log.error("bad_frame_from_broker", code=exc.code, reason=exc.reason)
                    continue
                on_frame(frame)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                self.close_reason = str(msg.extra or "")
                return
            elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                              aiohttp.WSMsgType.ERROR):
                return

    def describe(self) -> str:
        """Why the link ended, for errors and logs."""
        return (f"connection closed by broker (code {self.ws.close_code}"
                f"{', ' + self.close_reason if self.close_reason else ''})")


async def authenticate(http: aiohttp.ClientSession, endpoint: Endpoint) -> Link:
    """Connect and run the handshake within one ``timeout``. Raises
    :class:`AuthenticationError` if the broker refuses (or is not ``broker_name``),
    :class:`ConnectionClosed` if the connection ends during the handshake, and the network's
    own errors (``OSError``, ``aiohttp.ClientError``, ``TimeoutError``)."""
    async with asyncio.timeout(endpoint.timeout):
        ws = await http.ws_connect(endpoint.url, max_msg_size=2 * endpoint.max_frame,
                                   autoping=True, heartbeat=endpoint.heartbeat,
                                   ssl=endpoint.ssl if endpoint.ssl is not None else True)
        try:
            welcome = await _handshake(ws, endpoint)
        except BaseException:
            await ws.close()
            raise
    return Link(ws, welcome, endpoint.max_frame)


async def _handshake(ws: aiohttp.ClientWebSocketResponse, endpoint: Endpoint) -> wire.Welcome:
    node = endpoint.identity.name
    challenge = await _handshake_frame(ws, endpoint.max_frame)
    if not isinstance(challenge, wire.Challenge):
        raise AuthenticationError(f"expected challenge, got '{challenge.T}'",
                                  code="handshake_failed")
    if challenge.broker != endpoint.broker_name:
        raise AuthenticationError(f"broker is {challenge.broker!r}, expected "
                                  f"{endpoint.broker_name!r}", code="wrong_broker")
    hello = make_hello(challenge, node, endpoint.identity.signing_key, time.time_ns() // 10**6)
    await ws.send_bytes(wire.encode_frame(hello))
    answer = await _handshake_frame(ws, endpoint.max_frame)
    if isinstance(answer, wire.Error):
        raise AuthenticationError(answer.reason, code=answer.code)
    if not isinstance(answer, wire.Welcome) or answer.node != node:
        raise AuthenticationError("broker did not welcome this node", code="handshake_failed")
    return answer


async def _handshake_frame(ws: aiohttp.ClientWebSocketResponse, max_frame: int) -> wire.Frame:
    msg = await ws.receive()
    if msg.type is aiohttp.WSMsgType.BINARY:
        try:
            return wire.decode_frame(msg.data, max_bytes=max_frame)
        except ProtocolError as exc:
            raise AuthenticationError(f"bad handshake frame: {exc.reason}",
                                      code="handshake_failed") from exc
    if msg.type is aiohttp.WSMsgType.TEXT:
        raise AuthenticationError("text message during the handshake", code="handshake_failed")
    raise ConnectionClosed(f"connection ended during the handshake ({msg.type.name})")


class Connection:
    """Keeps one :class:`Link` up for its owner (see the module docstring) and matches the
    broker's answers to requests.

    ``on_link`` runs for every new link before requests may use it (the owner checks the
    welcome and re-sends its subscriptions); ``on_frame`` gets every frame that is not an
    answer; ``on_end`` runs once, when the connection ends for good.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        reconnect: Backoff | None,
        on_frame: Callable[[wire.Frame], None],
        on_link: Callable[[Link], Awaitable[None]],
        on_end: Callable[[GatewayError], None],
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.reconnect = reconnect
        self._on_frame = on_frame
        self._on_link = on_link
        self._on_end = on_end
        self._rng = rng or random.Random()
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.link: Link | None = None
        #: Why the connection is not usable for good; ``None`` while it is up or reconnecting.
        self.failure: GatewayError | None = ConnectionClosed("not connected")
        #: Set while a link is up or the connection ended for good: what :meth:`ready` waits for.
        self._settled = asyncio.Event()
        self.reconnections = 0
        self.generation = 0
        # Who waits for an answer: a message id for a receipt, ``None`` for the control channel.
        self._waiters: dict[bytes | None, asyncio.Future[wire.Frame]] = {}
        #: Control answers still owed to requests given up after they were sent on this link
        #: (timed out, cancelled), oldest first: dropped as they come, or the next control
        #: request would take one for its own. ``True``: the request ended with a ping (an
        #: ``error`` for its frame may come first): drop through the pong.
        self._abandoned: collections.deque[bool] = collections.deque()
        #: Control pongs received (not dropped as late answers): how ``confirmed`` tells
        #: whether its pong came with its error.
        self._pongs = 0
        self._control = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def open(self) -> Link:
        """The first connection; its errors propagate (it is not retried)."""
        if self._http is not None:
            raise RuntimeError("already connected")
        self.failure = None
        self._http = aiohttp.ClientSession()
        try:
            link = await authenticate(self._http, self.endpoint)
            await self._on_link(link)
        except BaseException as exc:
            self._end(exc if isinstance(exc, GatewayError)
                      else ConnectionClosed(f"connection failed: {exc!r}"))
            await self._http.close()
            self._http = None
            raise
        self._up(link)
        self._task = asyncio.create_task(self._supervise(link),
                                         name=f"gateway-{self.endpoint.identity.name}")
        return link

    async def ready(self) -> Link:
        """The current link; while reconnecting, wait for the next one (the caller bounds the
        wait). :class:`ConnectionClosed` once the connection ended for good."""
        while True:
            if self.link is not None:
                return self.link
            if self.failure is not None:
                raise self.closed_error()
            await self._settled.wait()

    def closed_error(self) -> ConnectionClosed:
        """A fresh :class:`ConnectionClosed` saying why the connection ended for good."""
        failure = self.failure or ConnectionClosed("connection closed")
        error = ConnectionClosed(failure.reason, code=failure.code)
        error.__cause__ = failure
        return error

    async def close(self) -> None:
        """End for good and release everything (idempotent)."""
        self._end(ConnectionClosed("client closed"))
        if self.link is not None:
            await self.link.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- requests -----------------------------------------------------------------------

    async def request(self, *frames: wire.Frame, key: bytes | None = None) -> wire.Frame:
        """Send ``frames`` on one link and await the answer for ``key`` (a message id for a
        receipt, ``None`` for a control answer). One deadline, the endpoint's ``timeout``,
        covers waiting for a (re)connection, sending and the answer: :class:`RequestTimeout`.
        :class:`ConnectionClosed` if the link drops meanwhile (the request was in flight),
        :class:`RequestRejected` for an ``error`` answer."""
        future: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        sent_on: Link | None = None
        try:
            async with asyncio.timeout(self.endpoint.timeout):
                link = await self.ready()
                # No await between taking the link and registering: if it drops from now on,
                # _fail_waiters fails the future.
                self._waiters[key] = future
                if frames:
                    # All of them or none: given up halfway (a sub written, its ping not),
                    # nobody could tell which answers are still to come. The broker may
                    # answer from the first write on.
                    sending = asyncio.ensure_future(self._send_all(link, frames))
                    self._background.add(sending)
                    sending.add_done_callback(self._background_done)
                    sent_on = link
                    await asyncio.shield(sending)
                answer = await future
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer within {self.endpoint.timeout} s") from exc
        finally:
            if self._waiters.get(key) is future:
                del self._waiters[key]
            answered = future.done() and not future.cancelled()
            if answered:
                future.exception()  # retrieved: failing a waiter nobody awaits is not an error
            elif key is None and sent_on is not None and sent_on is self.link:
                self._abandon(sent_on, through_pong=isinstance(frames[-1], wire.Ping))
        if isinstance(answer, wire.Error):
            raise RequestRejected(answer.reason, code=answer.code, ref=answer.ref)
        return answer

    @staticmethod
    async def _send_all(link: Link, frames: Sequence[wire.Frame]) -> None:
        for frame in frames:
            await link.send(frame)

    def _abandon(self, link: Link, *, through_pong: bool) -> None:
        """A control request on ``link`` was given up after it was sent: its answer, still to
        come, is dropped when it does. If an earlier one's is still owed too, the broker is
        not answering in the time allowed, or an answer the count expected will not come
        (an unsolicited ``error``): the count cannot be trusted, and a new link starts clean
        (what was in flight on this one is sent again by the broker)."""
        if self._abandoned:
            self._abandoned.clear()
            task = asyncio.ensure_future(self.recycle("control answers out of step"))
            self._background.add(task)
            task.add_done_callback(self._background_done)
            return
        self._abandoned.append(through_pong)

    async def control(self, *frames: wire.Frame) -> wire.Frame:
        """A control request: its answer carries no id and answers come in request order, so
        one at a time."""
        async with self._control:
            return await self.request(*frames)

    async def confirmed(self, frame: wire.Frame) -> None:
        """Send a frame that has no answer, then a ping: the pong confirms it was processed."""
        async with self._control:
            pongs = self._pongs
            try:
                answer = await self.request(frame, wire.Ping())
            except RequestRejected:
                # The broker still answers the ping. Come already (with the error, and thrown
                # away by _resolve), or still to come: then dropped when it does, or the next
                # control request would take it for its own answer. (Waiting for it here
                # waited out the whole timeout when it had come with the error.)
                if self._pongs == pongs:
                    self._abandoned.append(True)
                raise
        if not isinstance(answer, wire.Pong):
            raise RequestRejected(f"unexpected answer '{answer.T}'", code="bad_frame")

    async def recycle(self, reason: str) -> None:
        """Drop the current link so that a new one is made (the broker takes back what it had
        in flight on it and sends it again); nothing happens without reconnection."""
        if self.link is not None and self.reconnect is not None:
            log.warning("gateway_recycling_link", node=self.endpoint.identity.name,
                        reason=reason)
            await self.link.ws.close()

    async def send_now(self, frame: wire.Frame) -> None:
        """Send on the current link, without waiting for a reconnection."""
        if self.link is None:
            raise self.closed_error() if self.failure is not None \
                else ConnectionClosed("not connected right now")
        await self.link.send(frame)

    def send_soon(self, frame: wire.Frame) -> None:
        """:meth:`send_now` in the background (from a frame handler, which must not block);
        a failure is logged."""
        task = asyncio.ensure_future(self.send_now(frame))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_send_failed", reason=str(task.exception()))

    def _received(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Receipt):
            self._resolve(frame.id, frame)
        elif isinstance(frame, wire.Error) and frame.ref is not None:
            if frame.ref in self._waiters:
                self._resolve(frame.ref, frame)
            else:  # for a publish given up (timed out): never a control answer
                log.info("late_error_dropped", code=frame.code, ref=frame.ref.hex())
        elif isinstance(frame, (wire.Routes, wire.Directory, wire.Proof, wire.Pong, wire.Error)):
            if self._abandoned:  # the late answer of a request given up
                if not self._abandoned[0] or isinstance(frame, wire.Pong):
                    self._abandoned.popleft()
                log.info("late_answer_dropped", frame=frame.T)
                return
            if isinstance(frame, wire.Error) and None not in self._waiters:
                log.error("broker_error", code=frame.code, reason=frame.reason)
            self._pongs += isinstance(frame, wire.Pong)
            self._resolve(None, frame)
        else:
            self._on_frame(frame)

    def _resolve(self, key: bytes | None, frame: wire.Frame) -> None:
        future = self._waiters.get(key)
        if future is not None and not future.done():
            future.set_result(frame)

    def _fail_waiters(self, reason: str) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(ConnectionClosed(reason))

    # --- the link's life ----------------------------------------------------------------

    def _up(self, link: Link) -> None:
        self.link = link
        self._abandoned.clear()  # owed on the link that ended: they will not come
        #: Which link frames came on: deliveries of an earlier link are stale (the broker
        #: took them back when it ended and sends them again on this one).
        self.generation += 1
        self._settled.set()

    def _down(self, link: Link) -> None:
        self.link = None
        if self.failure is None:
            self._settled.clear()
        log.info("gateway_disconnected", node=self.endpoint.identity.name,
                 code=link.ws.close_code, reason=link.close_reason)
        self._fail_waiters(link.describe())

    def _end(self, failure: GatewayError) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        self._settled.set()
        self._fail_waiters(failure.reason)
        self._on_end(failure)

    async def _supervise(self, first: Link) -> None:
        link: Link | None = first
        while link is not None:
            try:
                await link.pump(self._received)
            except Exception as exc:
                # A failure in the owner's handler (say, its witness state cannot be written):
                # stop rather than go on half-working.
                log.exception("gateway_failed", node=self.endpoint.identity.name)
                await link.ws.close()
                self._down(link)
                self._end(ConnectionClosed(f"the client failed: {exc}",
                                           code=getattr(exc, "code", "internal")))
                return
            self._down(link)
            final = self._final(link)
            if final is not None:
                if final is not self.failure:  # not the owner's own close()
                    log.error("gateway_ended", node=self.endpoint.identity.name,
                              code=final.code, reason=final.reason)
                self._end(final)
                return
            link = await self._reconnect()

    def _final(self, link: Link) -> GatewayError | None:
        """The error that ends the connection after ``link`` ended, or ``None`` to reconnect."""
        if self.failure is not None:
            return self.failure
        if link.close_reason in FINAL_CLOSE_REASONS:
            return ConnectionClosed(f"{link.describe()}: a newer connection of this node took "
                                    "over", code=link.close_reason)
        if self.reconnect is None:
            return ConnectionClosed(link.describe())
        return None

    async def _reconnect(self) -> Link | None:
        """A new authenticated link, trying until one comes up; ``None`` if refused."""
        assert self.reconnect is not None and self._http is not None
        node = self.endpoint.identity.name
        for attempt, delay in enumerate(self.reconnect.delays(self._rng), start=1):
            await asyncio.sleep(delay)
            try:
                link = await authenticate(self._http, self.endpoint)
            except AuthenticationError as exc:
                if exc.code not in RETRYABLE_REFUSALS:
                    log.error("gateway_refused", node=node, code=exc.code, reason=exc.reason,
                              attempt=attempt)
                    self._end(exc)
                    return None
                log.warning("gateway_reconnect_failed", node=node, attempt=attempt,
                            reason=str(exc))
                continue
            except (OSError, aiohttp.ClientError, TimeoutError, GatewayError) as exc:
                log.warning("gateway_reconnect_failed", node=node, attempt=attempt,
                            reason=str(exc) or type(exc).__name__)
                continue
            try:
                await self._on_link(link)
            except GatewayError as exc:  # the link dropped while subscriptions were re-sent
                log.warning("gateway_reconnect_failed", node=node, attempt=attempt,
                            reason=str(exc))
                await link.ws.close()
                continue
            except Exception as exc:  # the owner's handler failed (say, its witness state)
                log.exception("gateway_failed", node=node)
                await link.ws.close()
                self._end(ConnectionClosed(f"the client failed: {exc}",
                                           code=getattr(exc, "code", "internal")))
                return None
            self._up(link)
            self.reconnections += 1
            log.info("gateway_reconnected", node=node, attempt=attempt)
            return link
        raise AssertionError("unreachable: the backoff is endless")  # pragma: no cover
