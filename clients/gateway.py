"""The gateway client library: how a national gateway node talks to a broker.

``GatewayClient`` is an async context manager: it connects and authenticates (challenge and
signed hello), then offers :meth:`~GatewayClient.subscribe`, :meth:`~GatewayClient.publish` and
async iteration over :meth:`~GatewayClient.messages`. It trusts the broker for nothing it can
check itself: recipients' encryption keys come from node certificates verified against the
pinned trust root (never from the broker's ``routes`` answer), and every delivery is checked
(certificate, signature, label binding, decryption) before the application sees it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import structlog

from broker import canonical, wire
from broker.audit.leaves import RouteEntry, entry_from_bytes
from broker.audit.merkle import leaf_hash, verify_inclusion
from broker.audit.note import Checkpoint, Cosigner, Verifier
from broker.audit.witness import Equivocation, check_offered_checkpoint, verify_log_checkpoint
from broker.envelope import PRECEDENCE_BY_NAME, Envelope, build_envelope
from broker.errors import BrokerError, PolicyDocumentError, ProtocolError, VerificationError
from broker.session import make_hello
from clients.identity import KeyFile
from clients.witness import WitnessState
from policies.documents import SignedDocument, verify_node_cert
from policies.model import Label, NodeCert, TrustRoot

log = structlog.get_logger("clients.gateway")


class GatewayError(BrokerError):
    """Base of the client library's errors."""

    code = "gateway"


class AuthenticationError(GatewayError):
    """The broker refused the handshake (``code`` says why), or is not the expected broker."""


class RequestRejected(GatewayError):
    """The broker answered a request with an ``error`` frame."""


class ConnectionClosed(GatewayError):
    """The connection ended while a request was waiting."""

    code = "closed"


class RequestTimeout(GatewayError):
    code = "timeout"


@dataclasses.dataclass(frozen=True)
class Receipt:
    """The broker's answer to a publish: status per candidate recipient, and the audit index."""

    id: bytes
    audit: int
    recipients: Mapping[str, str]

    @property
    def delivered(self) -> list[str]:
        return sorted(n for n, s in self.recipients.items() if s == "delivered")

    @property
    def queued(self) -> list[str]:
        return sorted(n for n, s in self.recipients.items() if s == "queued")

    @property
    def denied(self) -> dict[str, list[str]]:
        """Denied recipients and their reason codes."""
        return {n: s.removeprefix("denied:").split(",")
                for n, s in self.recipients.items() if s.startswith("denied:")}


@dataclasses.dataclass(frozen=True)
class Message:
    """A verified, decrypted delivery."""

    id: bytes
    sender: str
    nation: str
    topic: str
    label: Label
    precedence: int
    ts: int
    payload: bytes
    seq: int


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """The dry-run answer: status per candidate (``permit``/``deny:…``) and keys to seal to."""

    recipients: Mapping[str, str]
    keys: Mapping[str, bytes]
    #: Destination nation → label catalogue (highest level, releasable categories), if asked.
    catalogue: Mapping[str, Any] | None = None

    @property
    def permitted(self) -> list[str]:
        return sorted(n for n, s in self.recipients.items() if s == "permit")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class GatewayClient:
    """A gateway node's connection to a broker."""

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
        state_dir: Path | None = None,
        on_alarm: Callable[[Equivocation], None] | None = None,
    ) -> None:
        if identity.kind != "node" or identity.enc_key is None:
            raise ValueError("a gateway needs a node key file")
        self.url = url
        self.identity = identity
        self.node = identity.name
        self.trust_root = trust_root
        self.broker_name = broker_name
        self.timeout = timeout
        self.max_frame = max_frame
        self.certs: dict[str, NodeCert] = {}
        self.welcome: wire.Welcome | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._control = asyncio.Lock()
        self._control_waiter: asyncio.Future[wire.Frame] | None = None
        self._receipts: dict[bytes, asyncio.Future[wire.Frame]] = {}
        self._deliveries: asyncio.Queue[wire.Deliver | None] = asyncio.Queue()
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._dedup_capacity = dedup_capacity
        self._closed_reason: str | None = None
        #: The gateway is a witness of the broker's audit log (state kept in ``state_dir``).
        self.witness = WitnessState(state_dir)
        self.on_alarm = on_alarm
        self.alarms: list[Equivocation] = []
        self.cosigned = 0  # checkpoints cosigned on this connection
        self._log_key = self._broker_log_key()
        self._background: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the WebSocket and authenticate; raise :class:`AuthenticationError` if refused."""
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url, max_msg_size=2 * self.max_frame,
                                                   autoping=True)
            challenge = await self._receive_handshake_frame()
            if not isinstance(challenge, wire.Challenge):
                raise AuthenticationError(f"expected challenge, got '{challenge.T}'",
                                          code="handshake_failed")
            if challenge.broker != self.broker_name:
                raise AuthenticationError(f"broker is {challenge.broker!r}, expected "
                                          f"{self.broker_name!r}", code="wrong_broker")
            hello = make_hello(challenge, self.node, self.identity.signing_key, _now_ms())
            await self._ws.send_bytes(wire.encode_frame(hello))
            answer = await self._receive_handshake_frame()
            if isinstance(answer, wire.Error):
                raise AuthenticationError(answer.reason, code=answer.code)
            if not isinstance(answer, wire.Welcome) or answer.node != self.node:
                raise AuthenticationError("broker did not welcome this node",
                                          code="handshake_failed")
            self.welcome = answer
            if answer.checkpoint is not None:
                self._check_checkpoint(answer.checkpoint, None, 0, cosign=False)
        except BaseException:
            await self.close()
            raise
        self._reader = asyncio.create_task(self._read_loop(), name=f"gateway-{self.node}")
        log.info("gateway_connected", node=self.node, broker=challenge.broker)

    async def close(self) -> None:
        """Close the connection and release everything (idempotent)."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._fail_pending("client closed")
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- requests -----------------------------------------------------------------------

    async def subscribe(self, pattern: str) -> None:
        """Add a durable subscription; returns once the broker has processed it."""
        await self._confirmed(wire.Sub(topic=pattern))

    async def unsubscribe(self, pattern: str) -> None:
        await self._confirmed(wire.Unsub(topic=pattern))

    async def directory(self) -> dict[str, NodeCert]:
        """Fetch node certificates and keep those that verify against the trust root."""
        answer = await self._control_request(wire.Directory())
        if not isinstance(answer, wire.Directory) or answer.certs is None:
            raise RequestRejected("unexpected answer to directory", code="bad_frame")
        certs: dict[str, NodeCert] = {}
        duplicated: set[str] = set()
        now = _now_ms()
        for raw in answer.certs:
            try:
                cert = verify_node_cert(SignedDocument.from_bytes(raw), self.trust_root)
            except PolicyDocumentError as exc:
                log.error("directory_cert_rejected", reason=exc.reason)
                continue
            if not cert.is_valid_at(now):
                continue
            if cert.node in certs and certs[cert.node] != cert:
                duplicated.add(cert.node)
            certs[cert.node] = cert
        for node in duplicated:
            # Two different certificates for one node id (say, one nation certifying a name
            # another nation uses): trust neither rather than guess.
            log.error("directory_conflicting_certs", node=node)
            del certs[node]
        self.certs = certs
        return certs

    async def route(self, topic: str, label: Label, to: tuple[str, ...] = (), *,
                    catalogue: bool = False) -> RoutePlan:
        """Ask the broker whom a message with this label and topic would be released to (and,
        with ``catalogue``, what may be released to each destination nation at all)."""
        frame = wire.Route(topic=topic, label=label.to_map(),
                           to=tuple(canonical.canonical_set(list(to))) or None,
                           catalogue=True if catalogue else None)
        answer = await self._control_request(frame)
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
        """Encrypt for the recipients the policy permits, sign, publish, await the receipt."""
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
        """Publish pre-built envelope bytes; await the receipt."""
        message_id = Envelope.from_bytes(env, max_bytes=self.max_frame).id
        future: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        self._receipts[message_id] = future
        try:
            await self._send(wire.Pub(env=env))
            answer = await self._wait(future)
        finally:
            self._receipts.pop(message_id, None)
        assert isinstance(answer, wire.Receipt)
        return Receipt(id=answer.id, audit=answer.audit, recipients=dict(answer.recipients))

    async def prove(self, receipt: Receipt) -> Checkpoint:
        """Prove that the broker logged this publish: fetch the inclusion proof of the
        receipt's audit entry and verify it against a checkpoint signed by the broker's key
        (and consistent with what this gateway cosigned). Returns that checkpoint."""
        answer = await self._control_request(wire.Prove(index=receipt.audit))
        if not isinstance(answer, wire.Proof) or answer.index != receipt.audit:
            raise RequestRejected("unexpected answer to prove", code="bad_frame")
        if self._log_key is None:
            raise VerificationError(f"the trust root lists no key for {self.broker_name}")
        checkpoint = verify_log_checkpoint(answer.checkpoint, self._log_key)
        if checkpoint.size != answer.size:
            raise VerificationError("the proof is for another tree size", code="bad_proof")
        known = self.witness.cosigned.get(checkpoint.size)
        if known is None:
            # Only a checkpoint this gateway checked for consistency proves anything to it.
            raise VerificationError(f"the checkpoint of size {checkpoint.size} is not one this "
                                    "gateway cosigned yet; retry after it is", code="bad_proof")
        if known != checkpoint.root:
            alarm = Equivocation(f"two different roots for size {checkpoint.size}",
                                 previous=self.witness.latest_note, offered=answer.checkpoint)
            self._raise_alarm(alarm, list(answer.proof))
            raise alarm
        entry = entry_from_bytes(answer.entry)
        if not isinstance(entry, RouteEntry) or entry.id != receipt.id or entry.sender != self.node:
            raise VerificationError("the proven entry is not this message's route entry",
                                    code="bad_proof")
        verify_inclusion(answer.index, answer.size, leaf_hash(answer.entry), answer.proof,
                         checkpoint.root)
        return checkpoint

    async def ack(self, seqs: list[int]) -> None:
        """Acknowledge deliveries by sequence number."""
        await self._send(wire.Ack(seqs=tuple(seqs)))

    async def messages(self) -> AsyncGenerator[Message, None]:
        """Verified, decrypted, de-duplicated messages. A message is acknowledged once the
        consumer asks for the next one (so a crash mid-processing means redelivery)."""
        while True:
            frame = await self._deliveries.get()
            if frame is None:
                raise ConnectionClosed(self._closed_reason or "connection closed")
            try:
                message = await self._accept(frame)
                if message is not None:
                    yield message
            finally:
                # Also when the consumer breaks out of its loop: an un-acked delivery would
                # hold a slot of the in-flight window until the next reconnect.
                with contextlib.suppress(GatewayError):
                    await self.ack([frame.seq])

    # --- internals ----------------------------------------------------------------------

    async def _accept(self, frame: wire.Deliver) -> Message | None:
        """Verify and open a delivery; ``None`` for a duplicate or a delivery that fails."""
        try:
            env = Envelope.from_bytes(frame.env, max_bytes=self.max_frame)
        except ProtocolError as exc:
            log.error("delivery_rejected", seq=frame.seq, code=exc.code, reason=exc.reason)
            return None
        if env.id in self._seen:
            return None
        try:
            cert = self.certs.get(env.sender) or (await self.directory()).get(env.sender)
            if cert is None or not cert.is_valid_at(_now_ms()):
                raise ProtocolError(f"no valid certificate for sender {env.sender}",
                                    code="unknown_node")
            if env.label.orig != cert.nation:
                raise ProtocolError("label.orig is not the sender's nation",
                                    code="sender_mismatch")
            env.verify(cert.sign_key)
            assert self.identity.enc_key is not None
            payload = env.open(self.node, self.identity.enc_key)
        except BrokerError as exc:
            log.error("delivery_rejected", id=env.id.hex(), sender=env.sender, code=exc.code,
                      reason=exc.reason)
            return None
        self._remember(env.id)
        return Message(id=env.id, sender=env.sender, nation=cert.nation, topic=env.topic,
                       label=env.label, precedence=env.prec, ts=env.ts, payload=payload,
                       seq=frame.seq)

    def _remember(self, message_id: bytes) -> None:
        self._seen[message_id] = None
        while len(self._seen) > self._dedup_capacity:
            self._seen.popitem(last=False)

    async def _verified_keys(self, plan: RoutePlan, label: Label) -> dict[str, bytes]:
        """Encryption keys for the permitted recipients, from verified certificates only, and
        only for nations in the label's own audience (whatever the broker's answer says)."""
        if any(node not in self.certs for node in plan.permitted):
            await self.directory()
        audience = self.trust_root.expand_audience(label.rel) | {label.orig}
        keys = {}
        for node in plan.permitted:
            cert = self.certs.get(node)
            if cert is None:
                log.warning("recipient_without_certificate", node=node)
                continue
            if cert.nation not in audience:
                log.error("broker_permitted_outside_audience", node=node, nation=cert.nation)
                continue
            if plan.keys.get(node) != cert.enc_key:
                log.error("broker_key_mismatch", node=node)
            keys[node] = cert.enc_key
        return keys

    async def _confirmed(self, frame: wire.Frame) -> None:
        """Send a frame that has no answer, then a ping: the pong confirms it was processed."""
        async with self._control:
            await self._send(frame)
            answer = await self._control_roundtrip(wire.Ping())
        if not isinstance(answer, wire.Pong):
            raise RequestRejected(f"unexpected answer '{answer.T}'", code="bad_frame")

    async def _control_request(self, frame: wire.Frame) -> wire.Frame:
        async with self._control:
            return await self._control_roundtrip(frame)

    async def _control_roundtrip(self, frame: wire.Frame) -> wire.Frame:
        future: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        self._control_waiter = future
        try:
            await self._send(frame)
            return await self._wait(future)
        finally:
            self._control_waiter = None

    async def _wait(self, future: asyncio.Future[wire.Frame]) -> wire.Frame:
        try:
            answer = await asyncio.wait_for(future, timeout=self.timeout)
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer within {self.timeout} s") from exc
        if isinstance(answer, wire.Error):
            raise RequestRejected(answer.reason, code=answer.code, ref=answer.ref)
        return answer

    async def _send(self, frame: wire.Frame) -> None:
        if self._ws is None or self._ws.closed:
            raise ConnectionClosed(self._closed_reason or "not connected")
        await self._ws.send_bytes(wire.encode_frame(frame))

    async def _receive_handshake_frame(self) -> wire.Frame:
        assert self._ws is not None
        msg = await self._ws.receive(timeout=self.timeout)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            raise AuthenticationError(f"connection ended during handshake ({msg.type.name})",
                                      code="handshake_failed")
        return wire.decode_frame(msg.data, max_bytes=self.max_frame)

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    frame = wire.decode_frame(msg.data, max_bytes=2 * self.max_frame)
                except ProtocolError as exc:
                    log.error("bad_frame_from_broker", code=exc.code, reason=exc.reason)
                    continue
                self._dispatch(frame)
        finally:
            code = self._ws.close_code
            self._closed_reason = f"connection closed by broker (code {code})"
            self._fail_pending(self._closed_reason)

    def _dispatch(self, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Deliver):
            self._deliveries.put_nowait(frame)
        elif isinstance(frame, wire.Checkpoint):
            self._check_checkpoint(frame.note, list(frame.proof), frame.old, cosign=True)
        elif isinstance(frame, wire.Receipt):
            self._resolve(self._receipts.get(frame.id), frame)
        elif isinstance(frame, wire.Error) and frame.ref in self._receipts:
            assert frame.ref is not None
            self._resolve(self._receipts.get(frame.ref), frame)
        elif isinstance(frame, (wire.Routes, wire.Directory, wire.Proof, wire.Pong, wire.Error)):
            if isinstance(frame, wire.Error) and self._control_waiter is None:
                log.error("broker_error", code=frame.code, reason=frame.reason)
            self._resolve(self._control_waiter, frame)
        else:
            log.debug("frame_ignored", frame=frame.T)

    # --- witness ------------------------------------------------------------------------

    def _broker_log_key(self) -> Verifier | None:
        for broker in self.trust_root.brokers:
            if broker.name == self.broker_name:
                return Verifier(broker.name, broker.key)
        return None

    def _check_checkpoint(self, note: str, proof: list[bytes] | None, old: int, *,
                          cosign: bool) -> None:
        """Check an offered checkpoint against the ones this gateway cosigned; cosign it if it
        is consistent, raise the alarm if it is evidence of a forked log."""
        if self._log_key is None:
            log.error("checkpoint_not_cosigned", reason="the trust root lists no key for broker "
                      f"{self.broker_name}")
            return
        try:
            checkpoint = check_offered_checkpoint(
                self.witness.cosigned, note, proof, old, self._log_key,
                previous_note=self.witness.latest_note)
        except Equivocation as alarm:
            self._raise_alarm(alarm, proof or [])
            return
        except BrokerError as exc:
            log.warning("checkpoint_not_cosigned", code=exc.code, reason=exc.reason)
            if cosign and self.witness.latest_note is not None and proof is not None:
                # The broker proves from an older size (it lost our last cosignature): tell it
                # again which checkpoint we cosigned last, so the next proof starts there.
                self._send_cosignature(verify_log_checkpoint(self.witness.latest_note,
                                                             self._log_key))
            return
        if not cosign:
            return
        self.witness.record(checkpoint, note)
        self.cosigned += 1
        self._send_cosignature(checkpoint)

    def _send_cosignature(self, checkpoint: Checkpoint) -> None:
        cosigner = Cosigner.from_seed(self.node, bytes(self.identity.signing_key))
        line = cosigner.cosign(checkpoint.to_text(), _now_ms() // 1000).to_line()
        self._in_background(self._send(wire.Cosign(line=line)))

    def _raise_alarm(self, alarm: Equivocation, proof: list[bytes]) -> None:
        evidence = self.witness.save_evidence(alarm, proof, _now_ms())
        log.error("broker_equivocation", broker=self.broker_name, reason=alarm.reason,
                  evidence=None if evidence is None else str(evidence))
        self.alarms.append(alarm)
        if self.on_alarm is not None:
            self.on_alarm(alarm)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_send_failed", reason=str(task.exception()))

    @staticmethod
    def _resolve(future: asyncio.Future[wire.Frame] | None, frame: wire.Frame) -> None:
        if future is not None and not future.done():
            future.set_result(frame)

    def _fail_pending(self, reason: str) -> None:
        for future in [*self._receipts.values(), self._control_waiter]:
            if future is not None and not future.done():
                future.set_exception(ConnectionClosed(reason))
        self._deliveries.put_nowait(None)


def label(policy: str, cls: str, orig: str, rel: list[str] | tuple[str, ...] = (),
          cats: Mapping[str, list[str]] | None = None) -> Label:
    """Convenience: build a :class:`Label` with canonical sets from plain lists."""
    cat_map: dict[str, Any] = {t: canonical.canonical_set(list(v)) for t, v in (cats or {}).items()}
    return Label.from_map({"policy": policy, "class": cls, "orig": orig,
                           "rel": canonical.canonical_set(list(rel)), "cats": cat_map})
