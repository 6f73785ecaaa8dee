"""One authenticated WebSocket to the broker (:class:`Link`), how it is opened
(:func:`authenticate`: connect, challenge, signed hello, welcome), where and as whom
(:class:`Endpoint`), the reconnection backoff (:class:`Backoff`), and the client library's
errors. :class:`clients.connection.Connection` keeps one link up at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import Callable, Iterator
from ssl import SSLContext

import aiohttp
import structlog

from broker import wire
from broker.errors import BrokerError, ProtocolError
from broker.session import make_hello
from clients.control import AnswerOrder
from clients.identity import KeyFile

log = structlog.get_logger("clients.link")

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
        #: Control answers owed on this link to nobody (:mod:`clients.control`).
        self.answers = AnswerOrder()
        #: The frames of the last control request sent on this link, while they go out: the
        #: next one's wait for them, or could overtake them and take their answers.
        self.control_sending: asyncio.Future[None] | None = None

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
