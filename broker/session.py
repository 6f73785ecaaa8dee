"""The broker side of one node connection as a pure state machine (sans-IO, like h11).

Bytes go in through :meth:`BrokerSession.receive`; events come out: frames to :class:`Send`,
a :class:`Close` after a fatal error, :class:`Authenticated` once the hello answers the
challenge, and :class:`Request` for every well-formed frame after ``welcome`` that the broker must
act on. Protocol errors are *data* (an ``error`` frame to send), never exceptions escaping to the
I/O layer. No sockets, no clock (``now_ms`` is passed in).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import nacl.signing

from broker import crypto, wire
from broker.errors import ProtocolError
from policies.model import NodeCert

DEFAULT_SKEW_MS = 5 * 60 * 1000
NONCE_BYTES = 32
#: Reasons and claimed node ids can carry attacker-chosen text into error frames, logs and the
#: permanent audit log (``auth_failed``): they are cut to these lengths.
MAX_REASON_CHARS = 256
MAX_CLAIMED_CHARS = 64


def bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_frame(code: str, reason: str, ref: bytes | None = None) -> wire.Error:
    """The ``error`` frame for ``code``, its reason bounded to :data:`MAX_REASON_CHARS`."""
    return wire.Error(code=code, reason=bounded(reason, MAX_REASON_CHARS), ref=ref)


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class Send:
    frame: wire.Frame


@dataclasses.dataclass(frozen=True)
class Close:
    code: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Authenticated:
    cert: NodeCert


@dataclasses.dataclass(frozen=True)
class Request:
    frame: wire.Frame


Event = Send | Close | Authenticated | Request


def hello_message(broker: str, node: str, nonce: bytes, ts: int) -> bytes:
    """The bytes a node signs (after the hello domain) to answer a challenge."""
    return f"{broker}\n{node}\n{nonce.hex()}\n{ts}".encode()


def make_hello(
    challenge: wire.Challenge, node: str, key: nacl.signing.SigningKey, now_ms: int
) -> wire.Hello:
    """The node's answer to a challenge (used by the client library)."""
    message = hello_message(challenge.broker, node, challenge.nonce, now_ms)
    return wire.Hello(
        v=wire.PROTOCOL_VERSION, node=node, nonce=challenge.nonce, ts=now_ms,
        sig=crypto.sign(key, crypto.DOMAIN_HELLO, message),
    )


class BrokerSession:
    """Handshake and frame discipline for one connection, broker side.

    ``lookup`` returns the certificate of a node id (``None`` when unknown); ``is_inactive``
    tells whether a node is suspended or revoked.
    """

    def __init__(
        self,
        *,
        broker: str,
        nonce: bytes,
        lookup: Callable[[str], NodeCert | None],
        is_inactive: Callable[[str], bool] = lambda node: False,
        max_frame: int = 1 << 20,
        skew_ms: int = DEFAULT_SKEW_MS,
    ) -> None:
        if len(nonce) != NONCE_BYTES:
            raise ValueError("challenge nonce must be 32 bytes")
        self.broker = broker
        self.nonce = nonce
        self.state = State.AWAIT_HELLO
        self.node: NodeCert | None = None
        #: The node a hello claimed to be (authenticated or not), for the audit log.
        self.claimed: str | None = None
        self._lookup = lookup
        self._is_inactive = is_inactive
        self._max_frame = max_frame
        self._skew_ms = skew_ms

    def start(self) -> list[Event]:
        """The events that open the connection: send the challenge."""
        return [Send(wire.Challenge(v=wire.PROTOCOL_VERSION, broker=self.broker, nonce=self.nonce))]

    def receive(self, data: bytes, now_ms: int) -> list[Event]:
        """Feed one received WebSocket message."""
        if self.state is State.CLOSED:
            return []
        try:
            frame = wire.decode_frame(data, max_bytes=self._max_frame)
        except ProtocolError as exc:
            fatal = self.state is State.AWAIT_HELLO or exc.code == "too_large"
            return self._error(exc.code, exc.reason, close=fatal)
        if self.state is State.AWAIT_HELLO:
            return self._on_handshake(frame, now_ms)
        return self._on_open(frame)

    def fail(self, code: str, reason: str, *, ref: bytes | None = None,
             close: bool = False) -> list[Event]:
        """Events for an error the broker found while acting on a request."""
        return self._error(code, reason, ref=ref, close=close)

    def _on_handshake(self, frame: wire.Frame, now_ms: int) -> list[Event]:
        if not isinstance(frame, wire.Hello):
            return self._error("not_authenticated", f"'{frame.T}' before welcome", close=True)
        self.claimed = bounded(frame.node, MAX_CLAIMED_CHARS)
        problem = self._check_hello(frame, now_ms)
        if problem is not None:
            return self._error(*problem, close=True)
        cert = self._lookup(frame.node)
        assert cert is not None  # _check_hello found it
        self.node = cert
        self.state = State.OPEN
        return [Authenticated(cert)]

    def _check_hello(self, hello: wire.Hello, now_ms: int) -> tuple[str, str] | None:
        """``(code, reason)`` for a hello that does not answer the challenge, else ``None``."""
        if hello.v != wire.PROTOCOL_VERSION:
            return "unsupported_version", f"protocol version {hello.v} is not supported"
        cert = self._lookup(hello.node)
        if cert is None:
            return "unknown_node", f"no certificate for node {hello.node!r}"
        if hello.nonce != self.nonce:
            return "handshake_failed", "hello does not echo the challenge nonce"
        if abs(hello.ts - now_ms) > self._skew_ms:
            return "handshake_failed", "hello timestamp is outside the allowed clock skew"
        message = hello_message(self.broker, hello.node, hello.nonce, hello.ts)
        if not crypto.check_signature(cert.sign_key, crypto.DOMAIN_HELLO, message, hello.sig):
            return "bad_signature", "hello signature does not verify with the node's key"
        if not cert.is_valid_at(now_ms):
            return "node_inactive", f"certificate of {hello.node} is outside its validity window"
        if self._is_inactive(hello.node):
            return "node_inactive", f"node {hello.node} is suspended or revoked"
        return None

    def _on_open(self, frame: wire.Frame) -> list[Event]:
        if (frame.T not in wire.NODE_FRAMES or isinstance(frame, wire.Hello)
                or (isinstance(frame, wire.Directory) and frame.certs is not None)):
            return self._error("unexpected_frame", f"'{frame.T}' is not accepted from a node now")
        if isinstance(frame, wire.Ping):
            return [Send(wire.Pong())]
        if isinstance(frame, wire.Pong):
            return []
        return [Request(frame)]

    def _error(self, code: str, reason: str, *, ref: bytes | None = None,
               close: bool = False) -> list[Event]:
        frame = error_frame(code, reason, ref)
        events: list[Event] = [Send(frame)]
        if close:
            self.state = State.CLOSED
            events.append(Close(code, frame.reason))
        return events
