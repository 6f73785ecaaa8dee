"""The node listener: an aiohttp WebSocket endpoint at ``/v1/node`` around the pure session.

A thin loop: WebSocket messages go into :class:`broker.session.BrokerSession`, its events come
out as frames to send, connection closes, and requests for the :class:`broker.hub.Hub`.
Exceptions are mapped to ``error`` frames here, at the boundary. Each connection has its own
writer task (:mod:`broker.peer`), so a slow reader never blocks the broker. Abuse limits are
pure bookkeeping elsewhere, applied here: admission and handshake back-off
(:mod:`broker.guard`), per-connection rates (:mod:`broker.ratelimit`), slow clients
(:mod:`broker.listener`). :meth:`BrokerServer.start` returns once the socket listens (the ready
signal); handlers release everything in ``finally``.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import secrets
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import WSMsgType, web

from broker import wire
from broker.audit.commit_policy import DEFAULT_COMMIT, CommitPolicy
from broker.audit.leaves import SessionEntry
from broker.audit.log import AuditLog
from broker.audit.note import Signer
from broker.capacity import StoreCapacity
from broker.config import Config
from broker.errors import BrokerError, ConfigError
from broker.guard import ConnectionGuard, LogLimiter, Refusal, address_key
from broker.hub import Hub
from broker.limits import Limits as Limits  # re-exported: callers build servers with it
from broker.limits import limits_from_section
from broker.listener import (
    ReadDeadline,
    StallWatchdog,
    TlsSite,
    close_listener,
    http_server_kwargs,
)
from broker.looplag import watch_loop_lag
from broker.peer import WsPeer
from broker.ratelimit import ConnectionRate
from broker.session import Authenticated, BrokerSession, Close, Event, Request, Send, State
from broker.store.sqlite import SqliteStore
from broker.store.writer_process import WriterProcess
from broker.stored_bundle import earlier_broker_keys, stored_bundle
from broker.tls import server_context_for
from broker.verifier import VerifyPool
from broker.witnesses import Witnesses
from clients.identity import KeyFile
from policies.bundle import Bundle
from policies.loader import load_bundle

log = structlog.get_logger("broker.server")

NODE_PATH = "/v1/node"
#: WebSocket messages that are traffic (charged to the rate limit, activity for the idle
#: timeout); anything else (close, error) ends the read loop.
_TRAFFIC = frozenset({WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.PING, WSMsgType.PONG})
DEFAULT_LIMITS = Limits()


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def read_broker_key(config: Config) -> KeyFile:
    """The broker's own key file (kind ``broker``), named in ``broker.key``."""
    key = KeyFile.read(config.broker.key)
    if key.kind != "broker":
        raise ConfigError(f"broker.key {config.broker.key} is a {key.kind} key, not a broker key")
    return key


def check_broker_key(bundle: Bundle, name: str, key: KeyFile) -> None:
    """Refuse to run under a name or key the trust root does not list: witnesses and auditors
    would reject every checkpoint it signs."""
    listed = {b.name: b.key for b in bundle.trust_root.brokers}
    if name not in listed:
        raise ConfigError(f"broker {name!r} is not listed in the trust root's brokers")
    if listed[name] != key.sign_public:
        raise ConfigError(f"the key of broker {name!r} is not the one the trust root lists")


class BrokerServer:
    """An embedded or standalone broker: ``async with BrokerServer(...) as server``."""

    def __init__(
        self,
        *,
        name: str,
        bundle: Bundle,
        key: KeyFile,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        commit: CommitPolicy = DEFAULT_COMMIT,
        clock_ms: Callable[[], int] = wall_clock_ms,
        ssl_context: ssl.SSLContext | None = None,
        writer_process: bool = False,
        verify_workers: int = 0,
    ) -> None:
        """``ssl_context`` (see :mod:`broker.tls`): serve ``wss://``; ``None``: plain ``ws://``,
        for loopback trials and tests only. ``writer_process``: the audit log commits through a
        child process (:mod:`broker.store.writer_process`), not on the event loop.
        ``verify_workers``: envelope signatures are checked by that many child processes
        (:mod:`broker.verifier`); 0, on the event loop."""
        #: Freeze the start-up heap before listening (:func:`settle_heap`): set by
        #: :func:`serve`, which owns its process; never in a process that embeds brokers.
        self.settle_heap_before_listening = False
        self.name = name
        self.bundle = bundle
        self.key = key
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.limits = limits
        self.commit = commit
        self.clock_ms = clock_ms
        self.ssl_context = ssl_context
        self.writer_process = writer_process
        self._writer: WriterProcess | None = None
        self.verify_workers = verify_workers
        self._verifier: VerifyPool | None = None
        self.app = web.Application()
        self.app.router.add_get(NODE_PATH, self._node_endpoint)
        self._runner: web.AppRunner | None = None
        self._watchdog: StallWatchdog | None = None
        self._peers: set[WsPeer] = set()
        self._hub: Hub | None = None
        self._audit: AuditLog | None = None
        #: The expiry sweep and the loop-lag probe, from start to stop.
        self._background: list[asyncio.Task[None]] = []
        #: Admission control, handshake back-off and per-node connect rate (pure bookkeeping).
        self.guard = ConnectionGuard(limits.connections)
        #: Refusals and back-offs are logged at most every 10 s per address and limit.
        self._quiet = LogLimiter(interval=10.0, capacity=4096)
        self.ready = asyncio.Event()

    @classmethod
    def from_config(cls, config: Config) -> BrokerServer:
        """Build from a validated configuration (loads and verifies the policy directory)."""
        bundle = load_bundle(config.policy.dir, pinned_root_sha256=config.policy.trust_root_sha256)
        limits = limits_from_section(config.limits)
        commit = CommitPolicy(max_batch=config.audit.max_batch,
                              max_delay_s=config.audit.max_delay_ms / 1000,
                              checkpoint_interval_s=config.audit.checkpoint_interval_ms / 1000)
        return cls(name=config.broker.name, bundle=bundle, key=read_broker_key(config),
                   data_dir=config.broker.data_dir, host=config.listen.host,
                   port=config.listen.port, limits=limits, commit=commit,
                   ssl_context=server_context_for(config.tls),
                   writer_process=config.audit.writer == "process",
                   verify_workers=config.broker.verify_workers)

    @property
    def hub(self) -> Hub:
        """The routing core (exists once started)."""
        if self._hub is None:
            raise RuntimeError("the broker is not started")
        return self._hub

    @property
    def audit(self) -> AuditLog:
        """The audit log (open once started)."""
        if self._audit is None:
            raise RuntimeError("the broker is not started")
        return self._audit

    @property
    def url(self) -> str:
        """The node endpoint URL (with the port actually bound); ``wss://`` with TLS."""
        scheme = "ws" if self.ssl_context is None else "wss"
        return f"{scheme}://{self.host}:{self.port}{NODE_PATH}"

    async def start(self) -> None:
        """Open the store and the audit log, then listen; returns once the socket accepts
        connections. Refuses to start (``BrokerError``) if this broker's key is not the one the
        trust root lists for its name, or if the log does not extend its last checkpoint."""
        check_broker_key(self.bundle, self.name, self.key)
        strangers = sorted(set(self.limits.node_rates) - set(self.bundle.nodes))
        if strangers:  # a typo, or a node still to come: the rates wait for it
            log.warning("node_rates_for_unknown_nodes", nodes=strangers)
        store = SqliteStore.in_dir(self.data_dir)
        try:
            # Read (and verified) once: the log accepts a checkpoint signed with the key it
            # listed, the hub refuses a bundle that does not succeed it.
            in_force = stored_bundle(store)
            if self.writer_process:
                self._writer = await WriterProcess.start(store.path)
            if self.verify_workers:
                self._verifier = await VerifyPool.start(self.verify_workers)
            self._audit = AuditLog(store, Signer.from_seed(self.name, bytes(self.key.signing_key)),
                                   policy=self.commit, clock_ms=self.clock_ms,
                                   earlier_keys=earlier_broker_keys(in_force, self.name),
                                   writer=self._writer)
            self._audit.open()
            self._hub = Hub(self.bundle, self._audit, clock_ms=self.clock_ms,
                            skew_ms=self.limits.clock_skew_ms,
                            window=self.limits.delivery_window,
                            max_envelope=self.limits.max_frame_bytes,
                            max_queued_bytes=self.limits.max_queued_bytes_per_node,
                            queue_memory_bytes=self.limits.queue_memory_bytes_per_node,
                            capacity=StoreCapacity(store, self.limits.store),
                            envelope_limits=self.limits.envelope,
                            verifier=self._verifier)
            self._hub.restore(in_force)
            await self._audit.start()
            await self._hub.activate(self.bundle)
            self._background = [
                asyncio.create_task(self._hub.run_expiry(self.limits.expiry_interval_s),
                                    name="expiry"),
                asyncio.create_task(watch_loop_lag(self._hub.metrics.loop_lag.observe),
                                    name="loop-lag")]
        except BaseException:
            await self._close_audit()
            if self._audit is None:
                store.close()
            raise
        self.witnesses = Witnesses(self._audit, self._hub)
        self._audit.on_checkpoint(self.witnesses.broadcast)
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     **http_server_kwargs(self.limits.request_timeout_s))
        try:
            await self._runner.setup()
            if self.settle_heap_before_listening:
                settle_heap()  # before any connection's objects exist: they must stay collectable
            site = (web.TCPSite(self._runner, self.host, self.port)
                    if self.ssl_context is None else
                    TlsSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                            handshake_timeout=self.limits.handshake_timeout_s,
                            metrics=self._hub.metrics))
            await site.start()
        except BaseException:  # e.g. the port is taken: release the log and the store too
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]
        self._watchdog = StallWatchdog(self._runner, self.limits.write_stall_timeout_s,
                                       listener="node")
        self._watchdog.start()
        self.ready.set()
        log.info("broker_ready", broker=self.name, url=self.url,
                 bundle=self.bundle.hash.hex(), nodes=len(self.bundle.nodes),
                 audit_size=self._audit.size)

    async def stop(self) -> None:
        """Close every connection and the listener, then commit and close the audit log."""
        for peer in list(self._peers):
            peer.close("unavailable", "broker shutting down")
        await close_listener(self._watchdog, self._runner)
        self._watchdog = self._runner = None
        for task in self._background:
            task.cancel()
        try:
            # All cancelled first, then awaited together: one that had died (and raises) must
            # neither keep another running nor stop the audit log's close below.
            for outcome in await asyncio.gather(*self._background, return_exceptions=True):
                if not isinstance(outcome, (asyncio.CancelledError, type(None))):
                    log.error("background_task_failed", error=repr(outcome))
        finally:
            self._background = []
            await self._close_audit()
        log.info("broker_stopped", broker=self.name)

    async def reload(self, policy_dir: Path, *, pinned_root_sha256: bytes) -> Bundle:
        """Load the policy directory again and activate it atomically.

        A bundle that does not load (bad or missing signature, unpinned trust root, a trust
        root that no longer lists this broker's key) or does not succeed the one in force
        (``rollback``) is logged with its reason and changes nothing: the previous bundle stays
        in force. Raises the refusal as ``BrokerError``.
        """
        try:
            bundle = load_bundle(policy_dir, pinned_root_sha256=pinned_root_sha256)
            check_broker_key(bundle, self.name, self.key)
            if bundle.hash == self.bundle.hash:
                log.info("policy_reload_unchanged", bundle=bundle.hash.hex())
                return bundle
            activated = self.hub.activate(bundle)  # in force from here (or refused, unchanged)
        except BrokerError as exc:
            log.error("policy_reload_refused", code=exc.code, reason=exc.reason,
                      active=self.bundle.hash.hex())
            raise
        self.bundle = bundle
        await activated
        return bundle

    async def _close_audit(self) -> None:
        try:
            if self._verifier is not None:
                # Before the log: a publish still waiting for its verdict was not accepted.
                await self._verifier.close()
                self._verifier = None
            if self._audit is not None:
                await self._audit.stop()
        finally:
            try:
                if self._writer is not None:
                    await self._writer.close()
            finally:
                self._writer = None
                if self._audit is not None:
                    self._audit.store.close()

    async def __aenter__(self) -> BrokerServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- one connection -----------------------------------------------------------------

    async def _node_endpoint(self, request: web.Request) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        ticket = self.guard.admit(request.remote, loop.time())
        if isinstance(ticket, Refusal):
            return self._refuse(request, ticket)
        try:
            # aiohttp's own limit is set above ours so that an oversized frame still gets a
            # too_large error frame; beyond twice the limit aiohttp closes with 1009 by itself.
            # No autoping: WebSocket pings go through the rate limit and count as activity.
            # No permessage-deflate: envelopes are ciphertext (nothing to gain), and compressing
            # what different senders wrote in one context is how CRIME-style attacks read data.
            ws = web.WebSocketResponse(max_msg_size=2 * self.limits.max_frame_bytes,
                                       autoping=False, compress=False)
            await ws.prepare(request)
            peer = WsPeer(ws, request, secrets.token_hex(6), self.limits.max_outbound_frames,
                          ticket)
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
                    self.hub.record(SessionEntry(ts=self.clock_ms(), event="disconnect",
                                                 node=peer.node, conn=peer.conn_id))
                self._peers.discard(peer)
                await peer.aclose()
        finally:
            self.guard.release(ticket)
        return ws

    def _refuse(self, request: web.Request, refusal: Refusal) -> web.Response:
        """Refuse an upgrade with an HTTP error before any WebSocket or signature work. Not
        audited (nobody is identified yet, and the log must not be floodable); logged at most
        every 10 s per limit and address, with the count held back."""
        key = (refusal.kind, "" if refusal.kind == "capacity" else address_key(request.remote))
        held_back = self._quiet.note(key, asyncio.get_running_loop().time())
        if held_back is not None:
            log.warning("upgrade_refused", remote=request.remote, status=refusal.status,
                        code=refusal.code, limit=refusal.kind, reason=refusal.reason,
                        held_back=held_back)
        headers = ({"Retry-After": str(math.ceil(refusal.retry_after))}
                   if refusal.retry_after is not None else None)
        response = web.json_response({"error": refusal.code, "detail": refusal.reason},
                                     status=refusal.status, headers=headers)
        response.force_close()
        return response

    async def _read_loop(self, ws: web.WebSocketResponse, session: BrokerSession, peer: WsPeer,
                         clog: structlog.typing.FilteringBoundLogger) -> None:
        loop = asyncio.get_running_loop()
        # One deadline for the whole pre-welcome phase, which WebSocket pings do not extend;
        # after welcome, any message (a WebSocket ping too) restarts the idle timeout.
        deadline = loop.time() + self.limits.handshake_timeout_s
        reads = ReadDeadline(deadline)
        try:
            await self._read_frames(ws, session, peer, clog, reads, deadline)
        finally:
            reads.close()

    async def _read_frames(self, ws: web.WebSocketResponse, session: BrokerSession,
                           peer: WsPeer, clog: structlog.typing.FilteringBoundLogger,
                           reads: ReadDeadline, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        # The listener's rates until the hello, then the node's own (limits.node_rates).
        rate = ConnectionRate(self.limits.rate, loop.time())
        # A replaced or cut-off peer is not served any further, even before its close completes.
        while session.state is not State.CLOSED and not peer.closing:
            handshake = session.state is State.AWAIT_HELLO
            if not handshake:
                reads.move(loop.time() + self.limits.idle_timeout_s)
            try:
                with reads.reading():
                    msg = await ws.receive()
            except TimeoutError:
                self._timed_out(session, peer, clog)
                return
            if msg.type not in _TRAFFIC:
                if msg.type is WSMsgType.ERROR and "exceeds limit" in str(msg.data):
                    clog.warning("frame_too_large", detail=str(msg.data))
                return
            verdict = rate.admit(len(msg.data), loop.time())
            if verdict.refuse:
                self._apply(session.fail("rate_limited", verdict.reason, close=True),
                            session, peer, clog)
                return
            if verdict.wait > 0:  # throttle: read nothing more until the buckets refill
                if handshake and loop.time() + verdict.wait >= deadline:
                    self._timed_out(session, peer, clog)
                    return
                if self._quiet.note(("throttled", peer.conn_id), loop.time()) is not None:
                    clog.info("connection_throttled", node=peer.node or None,
                              wait=round(verdict.wait, 3))
                await asyncio.sleep(verdict.wait)
                if peer.closing:
                    return
            if msg.type is WSMsgType.BINARY:
                events = session.receive(msg.data, self.clock_ms())
            elif msg.type is WSMsgType.TEXT:
                events = session.fail("bad_frame", "frames must be binary WebSocket messages",
                                      close=handshake)
            else:
                if msg.type is WSMsgType.PING:
                    peer.pong(msg.data)
                continue
            self._apply(events, session, peer, clog)
            if handshake and session.node is not None:  # authenticated just now
                rate.retune(self.limits.rate_of(session.node.node), loop.time())

    def _timed_out(self, session: BrokerSession, peer: WsPeer,
                   clog: structlog.typing.FilteringBoundLogger) -> None:
        """The handshake deadline passed (``not_authenticated``), or the idle timeout after
        welcome (closed 1001 ``idle_timeout``, no error frame)."""
        if session.state is State.AWAIT_HELLO:
            self._apply(session.fail("not_authenticated", "no hello before the handshake "
                                     "timeout", close=True), session, peer, clog)
            return
        clog.info("connection_idle", node=peer.node, timeout=self.limits.idle_timeout_s)
        peer.close("idle_timeout", f"nothing received for {self.limits.idle_timeout_s:g} s")

    def _apply(self, events: list[Event], session: BrokerSession, peer: WsPeer,
               clog: structlog.typing.FilteringBoundLogger) -> None:
        now = asyncio.get_running_loop().time()
        for event in events:
            if isinstance(event, Send):
                peer.send(event.frame)
            elif isinstance(event, Close):
                clog.info("connection_refused" if not peer.node else "connection_closed",
                          code=event.code, reason=event.reason)
                if not peer.node:
                    self.hub.record(SessionEntry(
                        ts=self.clock_ms(), event="auth_failed", node=session.claimed or "",
                        conn=peer.conn_id, reason=f"{event.code}: {event.reason}"))
                    self._failed(peer, now)
                peer.close(event.code, event.reason)
            elif isinstance(event, Authenticated):
                refusal = self.guard.authenticated(peer.ticket, event.cert.node, now)
                if refusal is not None:  # the node (re)connects too often: keep the old one
                    self._apply(session.fail(refusal.code, refusal.reason, close=True),
                                session, peer, clog)
                    continue
                peer.node = event.cert.node
                peer.send(wire.Welcome(node=peer.node, checkpoint=self.witnesses.latest_note()))
                self.hub.record(SessionEntry(ts=self.clock_ms(), event="connect",
                                             node=peer.node, conn=peer.conn_id))
                self.hub.attach(peer)
                self.witnesses.offer(peer)
            elif isinstance(event, Request):
                self._apply(self._handle(event.frame, session, peer, clog), session, peer, clog)

    def _failed(self, peer: WsPeer, now: float) -> None:
        """Count a failed handshake against its address; log a back-off it starts."""
        period = self.guard.failed(peer.ticket, now)
        if period > 0 and self._quiet.note(("auth_backoff", peer.ticket.key), now) is not None:
            log.warning("auth_backoff", address=peer.ticket.key, seconds=period,
                        failures_free=self.limits.connections.auth_backoff_free_failures)

    def _handle(self, frame: wire.Frame, session: BrokerSession, peer: WsPeer,
                clog: structlog.typing.FilteringBoundLogger) -> list[Event]:
        """Act on one request; map errors to error frames (the connection survives them)."""
        assert session.node is not None
        try:
            if isinstance(frame, wire.Pub):
                self.hub.publish(session.node, frame.env, peer)
                return []
            if isinstance(frame, wire.Cosign):
                self.witnesses.accept(session.node, frame.line)
                return []
            if isinstance(frame, wire.Prove):
                return [Send(self.witnesses.prove(peer.node, frame.index))]
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


def settle_heap() -> None:
    """Exempt everything alive now from the cyclic garbage collector's full passes.

    After start-up the heap holds ~55,000 container objects (modules, classes, the policy
    bundle) that live as long as the process. A full collection walked all of them every couple
    of seconds under load: 25-45 ms with the event loop stopped, the largest single stall in a
    latency run (docs/performance.md). Frozen, a full pass walks only what the traffic
    allocated since (~1-8 ms). Reference counting still frees frozen objects that are dropped;
    garbage is collected first so that none of it is kept. Once, before the node listener
    accepts: a frozen object in a reference cycle is never freed, so no connection or request
    may be alive when it runs. (The first policy bundle is; were a reload to replace it, any
    reference cycle in it would stay: once, bounded by one bundle.)"""
    gc.collect()
    gc.freeze()
