"""The node listener: an aiohttp WebSocket endpoint at ``/v1/node`` around the pure session.

A thin loop: WebSocket messages go into :class:`broker.session.BrokerSession`, its events come
out as frames to send, connection closes, and requests for the :class:`broker.hub.Hub`.
Exceptions are mapped to ``error`` frames here, at the boundary. Each connection has its own
writer task, so a slow reader never blocks the broker. :meth:`BrokerServer.start` returns once the
socket listens (the ready signal); handlers release everything in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import time
from collections.abc import Callable
from types import TracebackType

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from broker import wire
from broker.config import Config
from broker.errors import BrokerError
from broker.hub import Hub
from broker.session import Authenticated, BrokerSession, Close, Event, Request, Send, State
from policies.bundle import Bundle
from policies.loader import load_bundle

log = structlog.get_logger("broker.server")

NODE_PATH = "/v1/node"
_CLOSE_CODES = {"too_large": WSCloseCode.MESSAGE_TOO_BIG, "unavailable": WSCloseCode.GOING_AWAY,
                "replaced": WSCloseCode.POLICY_VIOLATION, "internal": WSCloseCode.INTERNAL_ERROR}


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-connection limits of the node listener."""

    max_frame_bytes: int = 1 << 20
    clock_skew_ms: int = 5 * 60 * 1000
    delivery_window: int = 64
    handshake_timeout_s: float = 10.0
    #: Frames waiting to be written to one connection; a peer that stops reading while still
    #: sending requests is disconnected (``rate_limited``) instead of growing broker memory.
    max_outbound_frames: int = 1024
    max_subscriptions_per_node: int = 1024


class _Peer:
    """One WebSocket connection: a non-blocking ``send`` backed by its own writer task."""

    def __init__(self, ws: web.WebSocketResponse, conn_id: str, max_outbound: int) -> None:
        self.ws = ws
        self.conn_id = conn_id
        self.node = ""
        self._out: asyncio.Queue[bytes | tuple[str, str]] = asyncio.Queue()
        self._max_outbound = max_outbound
        self.closing = False
        self._task = asyncio.create_task(self._write_loop(), name=f"ws-writer-{conn_id}")

    def send(self, frame: wire.Frame) -> None:
        if self.closing:
            return
        if self._out.qsize() >= self._max_outbound:
            # The peer does not read what it asks for: cut it off rather than buffer without
            # bound. The close bypasses the full queue.
            log.warning("peer_not_reading", conn=self.conn_id, node=self.node,
                        queued=self._out.qsize())
            self.closing = True
            self._task.cancel()
            self._task = asyncio.create_task(self._abort())
            return
        self._out.put_nowait(wire.encode_frame(frame))

    def close(self, code: str, reason: str) -> None:
        """Close after everything already queued has been written."""
        if not self.closing:
            self.closing = True
            self._out.put_nowait((code, reason))

    async def aclose(self) -> None:
        self.close("normal", "connection ended")
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(asyncio.shield(self._task), timeout=2)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._task

    async def _abort(self) -> None:
        await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"rate_limited")

    async def _write_loop(self) -> None:
        while True:
            item = await self._out.get()
            if isinstance(item, tuple):
                code, _reason = item
                await self.ws.close(code=_CLOSE_CODES.get(code, WSCloseCode.POLICY_VIOLATION)
                                    if code != "normal" else WSCloseCode.OK,
                                    message=code.encode())
                return
            try:
                await self.ws.send_bytes(item)
            except (ConnectionError, RuntimeError):
                self.closing = True
                return


class BrokerServer:
    """An embedded or standalone broker: ``async with BrokerServer(...) as server``."""

    def __init__(
        self,
        *,
        name: str,
        bundle: Bundle,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: Limits = Limits(),
        clock_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.limits = limits
        self.clock_ms = clock_ms
        self.hub = Hub(bundle, clock_ms=clock_ms, skew_ms=limits.clock_skew_ms,
                       window=limits.delivery_window, max_envelope=limits.max_frame_bytes)
        self.app = web.Application()
        self.app.router.add_get(NODE_PATH, self._node_endpoint)
        self._runner: web.AppRunner | None = None
        self._peers: set[_Peer] = set()
        self.ready = asyncio.Event()

    @classmethod
    def from_config(cls, config: Config) -> BrokerServer:
        """Build from a validated configuration (loads and verifies the policy directory)."""
        bundle = load_bundle(config.policy.dir, pinned_root_sha256=config.policy.trust_root_sha256)
        limits = Limits(
            max_frame_bytes=config.limits.max_frame_bytes,
            clock_skew_ms=config.limits.clock_skew_seconds * 1000,
            delivery_window=config.limits.delivery_window,
            handshake_timeout_s=config.limits.handshake_timeout_seconds,
            max_outbound_frames=config.limits.max_outbound_frames,
            max_subscriptions_per_node=config.limits.max_subscriptions_per_node,
        )
        return cls(name=config.broker.name, bundle=bundle, host=config.listen.host,
                   port=config.listen.port, limits=limits)

    @property
    def url(self) -> str:
        """The node endpoint URL (with the port actually bound)."""
        return f"ws://{self.host}:{self.port}{NODE_PATH}"

    async def start(self) -> None:
        """Listen; returns once the socket accepts connections."""
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.ready.set()
        log.info("broker_ready", broker=self.name, url=self.url,
                 bundle=self.hub.bundle.hash.hex(), nodes=len(self.hub.bundle.nodes))

    async def stop(self) -> None:
        """Close every connection and the listener."""
        for peer in list(self._peers):
            peer.close("unavailable", "broker shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("broker_stopped", broker=self.name)

    async def __aenter__(self) -> BrokerServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- one connection -----------------------------------------------------------------

    async def _node_endpoint(self, request: web.Request) -> web.WebSocketResponse:
        # aiohttp's own limit is set above ours so that an oversized frame still gets a
        # too_large error frame; beyond twice the limit aiohttp closes with 1009 by itself.
        ws = web.WebSocketResponse(max_msg_size=2 * self.limits.max_frame_bytes, autoping=True)
        await ws.prepare(request)
        peer = _Peer(ws, secrets.token_hex(6), self.limits.max_outbound_frames)
        self._peers.add(peer)
        session = BrokerSession(
            broker=self.name, nonce=os.urandom(32), lookup=self.hub.lookup,
            is_inactive=self.hub.is_inactive, max_frame=self.limits.max_frame_bytes,
            skew_ms=self.limits.clock_skew_ms,
        )
        clog = log.bind(conn=peer.conn_id, remote=request.remote)
        try:
            self._apply(session.start(), session, peer, clog)
            await self._read_loop(ws, session, peer, clog)
        finally:
            if peer.node:
                self.hub.detach(peer)
            self._peers.discard(peer)
            await peer.aclose()
        return ws

    async def _read_loop(self, ws: web.WebSocketResponse, session: BrokerSession, peer: _Peer,
                         clog: structlog.typing.FilteringBoundLogger) -> None:
        # One deadline for the whole pre-welcome phase: a per-receive timeout would restart
        # whenever aiohttp handles a WebSocket ping inside receive().
        deadline = asyncio.get_running_loop().time() + self.limits.handshake_timeout_s
        # A replaced or cut-off peer is not served any further, even before its close completes.
        while session.state is not State.CLOSED and not peer.closing:
            try:
                if session.state is State.AWAIT_HELLO:
                    async with asyncio.timeout_at(deadline):
                        msg = await ws.receive()
                else:
                    msg = await ws.receive()
            except TimeoutError:
                self._apply(session.fail("not_authenticated", "no hello before the handshake "
                                         "timeout", close=True), session, peer, clog)
                return
            if msg.type is WSMsgType.BINARY:
                events = session.receive(msg.data, self.clock_ms())
            elif msg.type is WSMsgType.TEXT:
                events = session.fail("bad_frame", "frames must be binary WebSocket messages",
                                      close=session.state is State.AWAIT_HELLO)
            elif msg.type is WSMsgType.ERROR and "exceeds limit" in str(msg.data):
                clog.warning("frame_too_large", detail=str(msg.data))
                return
            else:
                return
            self._apply(events, session, peer, clog)

    def _apply(self, events: list[Event], session: BrokerSession, peer: _Peer,
               clog: structlog.typing.FilteringBoundLogger) -> None:
        for event in events:
            if isinstance(event, Send):
                peer.send(event.frame)
            elif isinstance(event, Close):
                clog.info("connection_refused" if not peer.node else "connection_closed",
                          code=event.code, reason=event.reason)
                peer.close(event.code, event.reason)
            elif isinstance(event, Authenticated):
                peer.node = event.cert.node
                peer.send(wire.Welcome(node=peer.node))
                self.hub.attach(peer)
            elif isinstance(event, Request):
                self._apply(self._handle(event.frame, session, peer, clog), session, peer, clog)

    def _handle(self, frame: wire.Frame, session: BrokerSession, peer: _Peer,
                clog: structlog.typing.FilteringBoundLogger) -> list[Event]:
        """Act on one request; map errors to error frames (the connection survives them)."""
        assert session.node is not None
        try:
            if isinstance(frame, wire.Pub):
                return [Send(self.hub.publish(session.node, frame.env).receipt)]
            if isinstance(frame, wire.Route):
                return [Send(self.hub.route(session.node, frame))]
            if isinstance(frame, wire.Directory):
                return [Send(self.hub.directory())]
            if isinstance(frame, wire.Sub):
                self.hub.subscribe(peer.node, frame.topic,
                                   limit=self.limits.max_subscriptions_per_node)
                return []
            if isinstance(frame, wire.Unsub):
                self.hub.unsubscribe(peer.node, frame.topic)
                return []
            if isinstance(frame, wire.Ack):
                self.hub.ack(peer.node, frame.seqs)
                return []
            return session.fail("unexpected_frame", f"'{frame.T}' is not supported yet")
        except BrokerError as exc:
            clog.info("request_rejected", frame=frame.T, code=exc.code, reason=exc.reason)
            return session.fail(exc.code, exc.reason, ref=exc.ref)
        except Exception:
            clog.exception("request_failed", frame=frame.T)
            return session.fail("internal", "the broker failed on this request", close=True)


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Run a broker from configuration until ``stop`` is set (or forever)."""
    server = BrokerServer.from_config(config)
    async with server:
        await (stop or asyncio.Event()).wait()
