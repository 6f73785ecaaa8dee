"""The gateway client library: how a national gateway node talks to a broker.

``GatewayClient`` is an async context manager: it connects and authenticates (challenge and
signed hello), then offers :meth:`~GatewayClient.subscribe`, :meth:`~GatewayClient.publish` and
async iteration over :meth:`~GatewayClient.messages`. It trusts the broker for nothing it can
check itself: recipients' encryption keys come from node certificates verified against the
pinned trust root (never from the broker's ``routes`` answer), and every delivery is checked
(certificate, signature, label binding, decryption) before the application sees it.

Delivery is exactly once for the application: the broker delivers at least once, and the
client drops the ids the application already finished (:mod:`clients.dedup`, durable with a
``state_dir``). The connection (:mod:`clients.connection`) is re-established with backoff when
it drops; the client is also a witness of the broker's audit log (:mod:`clients.witness`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from ssl import SSLContext
from types import TracebackType

import structlog

from broker import canonical, crypto, wire
from broker.audit.note import Checkpoint
from broker.audit.witness import Equivocation
from broker.envelope import PRECEDENCE_BY_NAME, Envelope, build_envelope
from broker.errors import BrokerError, ProtocolError, VerificationError
from clients.certs import CertBook, CertFloorFile, certs_from_directory, recipient_keys
from clients.connection import Connection
from clients.dedup import SeenIds, StateWriteFailed
from clients.identity import KeyFile
from clients.link import (
    DEFAULT_BACKOFF,
    AuthenticationError,
    Backoff,
    ConnectionClosed,
    Endpoint,
    GatewayError,
    Link,
    RequestRejected,
    RequestTimeout,
)
from clients.statelock import StateInUse, StateLock
from clients.values import Expired, Message, Receipt, RoutePlan, label
from clients.witness import LogWitness, WitnessState
from policies.model import Label, NodeCert, TrustRoot

__all__ = [
    "AuthenticationError", "Backoff", "ConnectionClosed", "Expired", "GatewayClient",
    "GatewayError", "Message", "Receipt", "RequestRejected", "RequestTimeout", "RoutePlan",
    "StateInUse", "StateWriteFailed", "label",
]

log = structlog.get_logger("clients.gateway")


#: How many expiry notices :attr:`GatewayClient.expired` keeps.
EXPIRED_KEPT = 1024
#: Deliveries acknowledged in one ``ack`` frame while more wait (:meth:`GatewayClient.messages`).
ACK_BATCH = 16
#: The most finished ids one write may cover: copies held un-acked take slots of the broker's
#: delivery window (64 per recipient by default), so a batch must stay well inside it.
MAX_FINISH_BATCH = 32


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class GatewayClient:
    """A gateway node's connection to a broker, re-established by itself when it drops."""

    def __init__(
        self,
        url: str,
        identity: KeyFile,
        trust_root: TrustRoot,
        *,
        broker_name: str,
        timeout: float = 30.0,
        max_frame: int = 1 << 20,
        dedup_capacity: int = 100_000,
        finish_batch: int = 1,
        state_dir: Path | None = None,
        on_alarm: Callable[[Equivocation], None] | None = None,
        reconnect: Backoff | None = DEFAULT_BACKOFF,
        heartbeat: float | None = 15.0,
        on_expired: Callable[[Expired], None] | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        """``state_dir`` keeps the witness state, the last ``dedup_capacity`` ids of the
        messages the application finished and the highest node certificates taken
        (:mod:`clients.certs`; memory only without it). ``reconnect``: the backoff
        to reconnect with when the connection drops (see :mod:`clients.connection` for when it
        does not); ``None``: the first drop ends the client. ``heartbeat``: seconds between
        WebSocket pings. ``timeout`` bounds each request, including a wait for reconnection.
        ``finish_batch``: how many finished messages :meth:`messages` may make durable with
        one write while more deliveries wait; 1 (the default) writes each before the next
        message is handed over, so that even a crash never shows a finished message again;
        more trades that for throughput (see :meth:`messages`). ``ssl``: for a ``wss://``
        URL, the context that says which CA the broker's certificate must chain to (and, for
        mutual TLS, this gateway's client certificate): see
        :func:`broker.tls.client_context`; ``None`` trusts the system's CAs. A broker
        certificate that does not verify makes :meth:`connect` raise (an
        ``aiohttp.ClientConnectorCertificateError``), like any other failed first connection."""
        if identity.kind != "node" or identity.enc_key is None:
            raise ValueError("a gateway needs a node key file")
        if not 1 <= finish_batch <= MAX_FINISH_BATCH:
            raise ValueError(f"finish_batch must be 1 to {MAX_FINISH_BATCH}")
        self.finish_batch = finish_batch
        self.url = url
        self.identity = identity
        self.node = identity.name
        self.trust_root = trust_root
        self.broker_name = broker_name
        self.timeout = timeout
        self.max_frame = max_frame
        #: Held until :meth:`close`: no second client may write the same state (StateInUse).
        self._state_lock = StateLock(state_dir) if state_dir is not None else None
        try:
            self._cert_floor = CertFloorFile(state_dir) if state_dir is not None else None
            #: Verified node certificates (with the ones a key rotation replaced).
            self.certs = CertBook(self._cert_floor.load(trust_root) if self._cert_floor else ())
            #: Ids of the messages the application finished (durable with ``state_dir``).
            self.seen = SeenIds(state_dir, dedup_capacity)
            #: The gateway is a witness of the broker's audit log (state in ``state_dir``).
            self.log_witness = LogWitness(trust_root, broker_name, identity, state_dir,
                                          send_cosignature=self._send_cosignature,
                                          on_alarm=on_alarm)
        except BaseException:  # a state that cannot be read: nobody holds the lock then
            if self._state_lock is not None:
                self._state_lock.release()
            raise
        self.welcome: wire.Welcome | None = None
        #: Patterns subscribed to through this client: re-sent after every reconnect.
        self.subscriptions: set[str] = set()
        #: The latest notices that a message this gateway sent expired undelivered.
        self.expired: collections.deque[Expired] = collections.deque(maxlen=EXPIRED_KEPT)
        self.on_expired = on_expired
        #: Deliveries with the generation of the link they came on; ``None`` ends.
        self._deliveries: asyncio.Queue[tuple[int, wire.Deliver] | None] = asyncio.Queue()
        #: Deliveries taken from the queue but not handed over when ``messages()`` was
        #: cancelled (checking one or sending acks): the next ``messages()`` starts with them.
        self._held: collections.deque[tuple[int, wire.Deliver]] = collections.deque()
        self._connection = Connection(
            Endpoint(url, identity, broker_name, timeout, max_frame, heartbeat, ssl),
            reconnect=reconnect, on_frame=self._dispatch, on_link=self._on_link,
            on_end=self._on_end)

    @property
    def witness(self) -> WitnessState:
        """The checkpoints this gateway cosigned."""
        return self.log_witness.state

    @property
    def alarms(self) -> list[Equivocation]:
        """Evidence, so far, that the broker equivocated."""
        return self.log_witness.alarms

    @property
    def cosigned(self) -> int:
        """How many checkpoints this client cosigned."""
        return self.log_witness.cosigned

    @property
    def connected(self) -> bool:
        """Whether a connection is up right now."""
        return self._connection.link is not None

    @property
    def failure(self) -> GatewayError | None:
        """Why the client cannot be used (not connected yet, closed, replaced, refused on
        reconnection); ``None`` while it is connected or reconnecting."""
        return self._connection.failure

    @property
    def reconnections(self) -> int:
        return self._connection.reconnections

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> GatewayClient:
        try:
            await self.connect()
        except BaseException:  # __aexit__ will not run: release the state directory here
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket and authenticate; raise :class:`AuthenticationError` if refused
        (this first connection is not retried; later drops are, in the background)."""
        await self._connection.open()
        log.info("gateway_connected", node=self.node, broker=self.broker_name)

    async def close(self) -> None:
        """Close the connection for good and release everything (idempotent), the state
        directory's lock last."""
        try:
            await self._connection.close()
            self._deliveries.put_nowait(None)  # also if it never connected
        finally:
            self.seen.close()  # a generator still open writes nothing after this
            if self._state_lock is not None:
                self._state_lock.release()

    # --- requests -----------------------------------------------------------------------

    async def subscribe(self, pattern: str) -> None:
        """Add a durable subscription; returns once the broker has processed it. It is kept
        (and re-sent after reconnects) unless the broker rejects it."""
        self.subscriptions.add(pattern)  # first, so a reconnect during the request re-sends it
        try:
            await self._connection.confirmed(wire.Sub(topic=pattern))
        except RequestRejected:
            self.subscriptions.discard(pattern)
            raise

    async def unsubscribe(self, pattern: str) -> None:
        """Remove a subscription (no longer re-sent after reconnects)."""
        self.subscriptions.discard(pattern)
        await self._connection.confirmed(wire.Unsub(topic=pattern))

    async def directory(self) -> dict[str, NodeCert]:
        """Fetch node certificates, keep those that verify against the trust root and do not
        step back from the ones held (:class:`~clients.certs.CertBook`); return those held
        that are valid now. (The book may hold one that has expired since: kept over a
        refused rollback, it stays in the floor, but is not handed out.)"""
        answer = await self._connection.control(wire.Directory(), expect=wire.Directory)
        if not isinstance(answer, wire.Directory) or answer.certs is None:
            raise RequestRejected("unexpected answer to directory", code="bad_frame")
        now = _now_ms()
        certs = certs_from_directory(answer.certs, self.trust_root, now)
        for problem in self.certs.update(certs):
            log.error("directory_rollback_refused", reason=problem)
        if self._cert_floor is not None:
            self._cert_floor.save_if_changed(self.certs.floor)
        return {node: cert for node, cert in self.certs.current.items() if cert.is_valid_at(now)}

    async def route(self, topic: str, label: Label, to: tuple[str, ...] = (), *,
                    catalogue: bool = False) -> RoutePlan:
        """Ask the broker whom a message with this label and topic would be released to (and,
        with ``catalogue``, what may be released to each destination nation at all)."""
        frame = wire.Route(topic=topic, label=label.to_map(),
                           to=tuple(canonical.canonical_set(list(to))) or None,
                           catalogue=True if catalogue else None)
        answer = await self._connection.control(frame, expect=wire.Routes)
        if not isinstance(answer, wire.Routes):
            raise RequestRejected(f"unexpected answer '{answer.T}' to route", code="bad_frame")
        return RoutePlan(recipients=dict(answer.recipients), keys=dict(answer.keys),
                         catalogue=None if answer.catalogue is None else dict(answer.catalogue))

    async def publish(
        self,
        topic: str,
        payload: bytes,
        label: Label,
        *,
        precedence: int | str = 0,
        ttl: int = 3600,
        to: tuple[str, ...] = (),
    ) -> Receipt:
        """Encrypt for the recipients the policy permits, sign, publish, await the receipt
        (see :meth:`publish_envelope` for a connection lost meanwhile)."""
        prec = PRECEDENCE_BY_NAME[precedence] if isinstance(precedence, str) else precedence
        plan = await self.route(topic, label, to)
        keys = await self._verified_keys(plan, label)
        now = _now_ms()
        env = build_envelope(
            signing_key=self.identity.signing_key, sender=self.node, topic=topic,
            payload=payload, label=label, prec=prec, ttl=ttl, recipient_keys=keys,
            now_ms=now, to=to,
        )
        return await self.publish_envelope(env)

    async def publish_envelope(self, env: bytes) -> Receipt:
        """Publish pre-built envelope bytes; await the receipt.

        If the connection drops before the receipt arrives, this raises
        :class:`ConnectionClosed` and the outcome is unknown: the broker may have accepted the
        envelope. Publishing the same bytes again (within the broker's clock skew of the
        envelope's ``ts``) settles it: an envelope already accepted is rejected as ``replay``,
        one never received is accepted."""
        message_id = Envelope.from_bytes(env, max_bytes=self.max_frame).id
        answer = await self._connection.request(wire.Pub(env=env), key=message_id)
        assert isinstance(answer, wire.Receipt)
        return Receipt(id=answer.id, audit=answer.audit, recipients=dict(answer.recipients))

    async def prove(self, receipt: Receipt) -> Checkpoint:
        """Prove that the broker logged this publish: fetch the inclusion proof of the
        receipt's audit entry and verify it against a checkpoint signed by the broker's key
        (and consistent with what this gateway cosigned). Returns that checkpoint."""
        answer = await self._connection.control(wire.Prove(index=receipt.audit),
                                                expect=wire.Proof)
        if not isinstance(answer, wire.Proof) or answer.index != receipt.audit:
            raise RequestRejected("unexpected answer to prove", code="bad_frame")
        return self.log_witness.verify_proof(answer, receipt.id)

    async def ack(self, seqs: list[int]) -> None:
        """Acknowledge deliveries by sequence number, on the current connection only:
        :class:`ConnectionClosed` if there is none right now (the broker then redelivers them
        after the reconnect)."""
        await self._connection.send_now(wire.Ack(seqs=tuple(seqs)))

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Verified, decrypted messages, each yielded once, across reconnects and restarts.

        A message is finished when the consumer asks for the next one or leaves the loop (the
        generator is closed; ``contextlib.aclosing`` makes that immediate). Its id is then made
        durable in :attr:`seen` (or :class:`StateWriteFailed`, and no ack), then acknowledged:
        a crash mid-processing means redelivery; a redelivered finished message (also after a
        restart with the same ``state_dir``) is acknowledged, not yielded.

        While more deliveries already wait, acknowledgements are sent together (once
        :data:`ACK_BATCH` are due, before the last waiting message is handed over, and before
        the next wait), always after their ids are durable; and with :attr:`finish_batch`
        above 1, up to that many finished ids share one write (one fsync), written before the
        next wait, when the batch is full and when the loop is left. A crash before that write
        shows those messages again: at least once still, but a finished message may come back.
        Leave the loop with ``break`` inside ``contextlib.aclosing`` (or close the generator):
        one left open holds its un-acked copies until the connection ends. Cancelled (a
        consumer's timeout), the generator ends; a delivery it had taken but not handed over
        is handed over first by the next ``messages()``. Raises :class:`ConnectionClosed`
        once the client ended for good."""
        finished: dict[bytes, int] = {}  # id → seq: finished, not durable yet
        unacked: list[int] = []  # durable, not acknowledged yet
        try:
            while True:
                idle = self._deliveries.empty() and not self._held
                if finished and (idle or len(finished) >= self.finish_batch):
                    unacked += self._make_durable(finished)
                if unacked and (idle or len(unacked) >= ACK_BATCH):
                    await self._ack_quietly(unacked)
                    unacked = []
                item = self._held.popleft() if self._held else await self._deliveries.get()
                if item is None:
                    self._deliveries.put_nowait(None)  # ends the next iterator too
                    raise self._connection.closed_error()
                generation, frame = item
                if generation != self._connection.generation:
                    # From a link that ended: the broker took it back and sends it again on
                    # this one (or it expired meanwhile, and its sender was told so).
                    continue
                try:
                    try:
                        message = await self._accept(frame, finished)
                        if message is not None and unacked and self._deliveries.empty():
                            # Nothing to batch with; the consumer may hold this one for long.
                            await self._ack_quietly(unacked)
                            unacked = []
                    except GatewayError as exc:
                        # The sender's certificate could not be fetched: not acked, and a new
                        # link makes the broker send it again (it would otherwise hold a
                        # window slot).
                        log.warning("delivery_deferred", seq=frame.seq, code=exc.code)
                        await self._connection.recycle("a delivery could not be checked")
                        continue
                except asyncio.CancelledError:
                    # Not handed over: kept for the next messages() (skipped there if its link
                    # ended). Dropped, it would stay in flight at the broker, unacked, until
                    # this link ends (hours, maybe).
                    self._held.appendleft(item)
                    raise
                if message is None:
                    # A copy of a finished id still to be written is acked with it, after it.
                    if frame.seq not in finished.values():
                        unacked.append(frame.seq)
                    continue
                try:
                    yield message
                finally:
                    finished[message.id] = frame.seq
                    if self.finish_batch == 1:  # durable before the consumer gets another
                        unacked += self._make_durable(finished)
        finally:
            try:
                if finished:
                    unacked += self._make_durable(finished)
            finally:  # the durable ones are acknowledged even if the last write failed
                if unacked:
                    await self._ack_quietly(unacked)

    def _make_durable(self, finished: dict[bytes, int]) -> list[int]:
        """Write the ids of ``finished`` to :attr:`seen` (durably) and forget them; return
        their seqs, now to acknowledge. Raises :class:`StateWriteFailed` if they cannot be
        written: they are not acknowledged then, so the broker delivers them again after the
        next reconnect."""
        ids, seqs = list(finished), list(finished.values())
        finished.clear()
        self.seen.add_durably(ids)
        return seqs

    # --- internals ----------------------------------------------------------------------

    async def _accept(self, frame: wire.Deliver,
                      finished: dict[bytes, int] | None = None) -> Message | None:
        """Verify and open a delivery; ``None`` for a duplicate (of an id in :attr:`seen` or
        in ``finished``) or a delivery that fails its checks. Raises :class:`GatewayError` if
        the sender's certificate cannot be fetched."""
        try:
            env = Envelope.from_bytes(frame.env, max_bytes=self.max_frame)
        except ProtocolError as exc:
            log.error("delivery_rejected", seq=frame.seq, code=exc.code, reason=exc.reason)
            return None
        if finished is not None and env.id in finished:  # its write is still to come: acked
            finished[env.id] = frame.seq                  # with it, after it
            return None
        if env.id in self.seen:
            return None
        try:
            cert = await self._signer_of(env)
            assert self.identity.enc_key is not None
            payload = env.open(self.node, self.identity.enc_key)
        except GatewayError:
            raise  # the certificate could not be fetched: not a verdict on the delivery
        except BrokerError as exc:
            log.error("delivery_rejected", id=env.id.hex(), sender=env.sender, code=exc.code,
                      reason=exc.reason)
            return None
        return Message(id=env.id, sender=env.sender, nation=cert.nation, topic=env.topic,
                       label=env.label, precedence=env.prec, ts=env.ts, payload=payload,
                       seq=frame.seq)

    async def _signer_of(self, env: Envelope) -> NodeCert:
        """The verified certificate whose key signed ``env``; the directory is fetched again
        once if the cached one does not verify (the sender's key may have been rotated)."""
        if env.sender not in self.certs:
            await self.directory()
        for attempt in range(2):
            candidates = [c for c in self.certs.for_envelope(env.sender, env.ts)
                          if c.is_valid_at(_now_ms())]
            for cert in candidates:
                if crypto.check_signature(cert.sign_key, crypto.DOMAIN_ENVELOPE, env.body,
                                          env.sig):
                    if env.label.orig != cert.nation:
                        raise ProtocolError("label.orig is not the sender's nation",
                                            code="sender_mismatch")
                    return cert
            if attempt == 0:
                await self.directory()
        if not candidates:
            raise ProtocolError(f"no valid certificate for sender {env.sender}",
                                code="unknown_node")
        raise VerificationError("envelope: signature does not verify", code="bad_signature")

    async def _ack_quietly(self, seqs: list[int]) -> None:
        # An ack that cannot be sent now is not needed: the broker redelivers un-acked
        # messages after the reconnect, and the seen ids drop them then.
        with contextlib.suppress(GatewayError):
            await self.ack(seqs)

    async def _verified_keys(self, plan: RoutePlan, label: Label) -> dict[str, bytes]:
        """Encryption keys for the permitted recipients, from verified certificates only, and
        only for nations in the label's own audience (whatever the broker's answer says)."""
        def stale(node: str) -> bool:
            cert = self.certs.get(node)
            return cert is None or plan.keys.get(node) != cert.enc_key

        if any(map(stale, plan.permitted)):  # unknown, or another key: maybe rotated since
            await self.directory()
        return recipient_keys(plan, label, self.certs, self.trust_root, _now_ms())

    async def _on_link(self, link: Link) -> None:
        """A new authenticated connection: check the welcome's checkpoint and re-send the
        subscriptions (before any request: the broker processes a node's frames in order)."""
        self.welcome = link.welcome
        if link.welcome.checkpoint is not None:
            self.log_witness.check(link.welcome.checkpoint, None, 0, cosign=False)
        if self.subscriptions:
            for pattern in sorted(self.subscriptions):
                await link.send(wire.Sub(topic=pattern))
            # Nobody waits for their answers (a refusal, an error without a ref): the ping's
            # pong ends them, and they are dropped, not taken by the first request.
            await link.send(wire.Ping())
            link.answers.owe(through_pong=True)

    def _dispatch(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Deliver):
            self._deliveries.put_nowait((self._connection.generation, frame))
        elif isinstance(frame, wire.Checkpoint):
            self.log_witness.check(frame.note, list(frame.proof), frame.old, cosign=True)
        elif isinstance(frame, wire.Expired):
            self._note_expired(Expired(id=frame.id, recipient=frame.recipient))
        else:
            log.debug("frame_ignored", frame=frame.T)

    def _note_expired(self, notice: Expired) -> None:
        self.expired.append(notice)
        log.info("message_expired", id=notice.id.hex(), recipient=notice.recipient)
        if self.on_expired is not None:
            try:
                self.on_expired(notice)
            except Exception:  # the application's bug must not end the connection
                log.exception("on_expired_failed")

    def _send_cosignature(self, line: str) -> None:
        # Confirmed, not sent blind: a refusal (an error without a ref) is the cosign's answer,
        # where it was taken by whichever control request waited next.
        self._connection.confirm_soon(wire.Cosign(line=line))

    def _on_end(self, failure: GatewayError) -> None:
        self._deliveries.put_nowait(None)  # messages() raises ConnectionClosed
