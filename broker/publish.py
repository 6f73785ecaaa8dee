"""A publish, from the ``pub`` frame to its receipt.

The envelope is parsed and checked against the authenticated node, its signature verified
(on the loop, or by a signature worker, :mod:`broker.verifier`), the replay guard consulted,
every candidate recipient decided, the publish refused (``unavailable``) if a permitted
recipient's queue or the store has no room, and the ``route`` entry appended to the audit log
together with the queue rows of the permitted recipients. The log's commit completes it: the
copies are queued and pumped, and the sender gets its receipt — nothing leaves before the
``route`` entry is durable (DESIGN). A commit that fails refuses the publish
(``unavailable``) and releases the reserved queue slots.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from broker import wire
from broker.audit.leaves import RouteEntry, envelope_digest
from broker.crypto import DOMAIN_ENVELOPE, bad_signature_reason, check_signature
from broker.envelope import Envelope
from broker.errors import BrokerError, ProtocolError, StorageError, VerificationError
from broker.limits import check_envelope_limits
from broker.session import error_frame
from broker.store.base import QueueRow
from policies.decide import Decision
from policies.model import NodeCert

if TYPE_CHECKING:
    from broker.hub import Hub

#: The hub's logger: the publish path's events are the hub's, as they were.
log = structlog.get_logger("broker.hub")

Reply = Callable[[wire.Frame], None]

#: What an envelope whose signature does not verify is refused with (``bad_signature``).
BAD_SIGNATURE = bad_signature_reason("envelope")


class Peer(Protocol):
    """A live, authenticated connection as the hub sees it."""

    node: str
    #: Set once the connection is being closed: frames sent now are dropped.
    closing: bool

    def send(self, frame: wire.Frame) -> None: ...

    def close(self, code: str, reason: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class _Publish:
    env: Envelope
    decisions: dict[str, Decision]
    rows: list[QueueRow]
    reply: Reply


class Publisher:
    """The publish path of one :class:`~broker.hub.Hub` (its state: the bundle in force, the
    audit log, the queues, the replay guard, the signature workers)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def publish(self, sender: NodeCert, env_bytes: bytes, origin: Peer) -> None:
        """Verify and decide (now, or when a signature worker answers); ``origin``, the
        connection that sent it, gets the receipt once the route entry is durable.

        Raises ``BrokerError`` on a bad envelope (nothing of it is routed or logged) and
        ``StorageError`` when the audit log no longer accepts entries or has no room; what is
        found after a worker's verdict is sent to ``origin`` as an error frame instead.
        """
        hub = self.hub
        try:
            self._publish(sender, env_bytes, origin)
        except BrokerError as exc:
            hub.metrics.refused(exc.code)
            raise

    def _publish(self, sender: NodeCert, env_bytes: bytes, origin: Peer) -> None:
        hub = self.hub
        env = Envelope.from_bytes(env_bytes, max_bytes=hub.max_envelope)
        check_envelope_limits(env, hub.envelope_limits)
        if env.sender != sender.node or env.label.orig != sender.nation:
            raise ProtocolError("envelope 'from'/label.orig do not match the authenticated node",
                                code="sender_mismatch", ref=env.id)
        self._check_in_force(sender, env.id)
        if hub.verifier is None:
            if not check_signature(sender.sign_key, DOMAIN_ENVELOPE, env.body, env.sig):
                raise VerificationError(BAD_SIGNATURE, code="bad_signature", ref=env.id)
            self._route(env, sender, origin.send)
        else:
            hub.verifier.submit(sender.sign_key, env.body, env.sig,
                                functools.partial(self._verified, env, sender, origin))

    def _verified(self, env: Envelope, sender: NodeCert, origin: Peer, ok: bool) -> None:
        """The rest of a publish whose signature a worker checked. What may have changed while
        it waited is checked again: the connection (closed meanwhile: replaced, suspended,
        revoked, or gone; the envelope is not accepted, as it could not be acknowledged, and
        its sender sends it again), the certificate in force, the replay guard, the policy
        (decided now, under the bundle in force)."""
        hub = self.hub
        if origin.closing:
            log.info("publish_abandoned", node=sender.node, id=env.id.hex(),
                     reason="its connection closed before its signature was checked")
            return
        try:
            if not ok:
                raise VerificationError(BAD_SIGNATURE, code="bad_signature", ref=env.id)
            self._check_in_force(sender, env.id)
            if hub.is_inactive(sender.node):
                raise ProtocolError("the node was suspended or revoked", code="node_inactive",
                                    ref=env.id)
            self._route(env, sender, origin.send)
        except BrokerError as exc:
            # As the connection's own handler does for a request refused at once.
            hub.metrics.refused(exc.code)
            log.info("request_rejected", frame="pub", node=sender.node, code=exc.code,
                     reason=exc.reason)
            origin.send(error_frame(exc.code, exc.reason, env.id))
        except Exception:
            log.exception("request_failed", frame="pub", node=sender.node)
            reason = "the broker failed on this request"
            origin.send(error_frame("internal", reason, env.id))
            origin.close("internal", reason)

    def _check_in_force(self, sender: NodeCert, ref: bytes) -> None:
        hub = self.hub
        current = hub.bundle.nodes.get(sender.node)
        if current is not sender and current != sender:  # identity first: the usual case
            # The connection predates a bundle that replaced or revoked its certificate (it is
            # being closed): nothing more is accepted under the old key.
            raise ProtocolError("the certificate this connection authenticated with is no "
                                "longer in force", code="node_inactive", ref=ref)

    def _route(self, env: Envelope, sender: NodeCert, reply: Reply) -> None:
        """Decide for every candidate and log the route entry; its commit completes the
        publish (:meth:`_published`). The envelope's signature is verified."""
        hub = self.hub
        now = hub.clock_ms()
        ref = env.id
        # Only after the signature: a forger must not be able to burn ids in the replay cache.
        stale = hub.replay.check(env.id, env.ts, now)
        if stale is not None:
            raise ProtocolError(stale, code="replay", ref=ref)
        candidates = hub.candidates(sender.node, env.topic, env.to)
        decisions = {node: hub.decide(env.label, sender, node, env.topic, now,
                                      sealed_for=env.keys) for node in candidates}
        permitted = [node for node, decision in decisions.items() if decision.permit]
        self._check_room(permitted, len(env.raw), ref)
        rows = [QueueRow(node, hub.queue_of(node).reserve_seq(len(env.raw)), env.prec, env.id,
                         env.sender, env.raw, now + env.ttl * 1000, now)
                for node in permitted]
        entry = RouteEntry(
            ts=now, id=env.id, env=envelope_digest(env.raw), sender=env.sender, topic=env.topic,
            label=env.label, prec=env.prec, ttl=env.ttl, bundle=hub.bundle.hash,
            sealed=tuple(sorted(env.keys)), decisions=decisions)
        try:
            future = hub.audit.append(entry, enqueue=rows)
        except StorageError as exc:
            self._cancel(rows)
            raise StorageError(exc.reason, ref=ref) from None
        hub.replay.record(env.id, now)
        pending = _Publish(env, decisions, rows, reply)
        future.add_done_callback(lambda done: self._published(done, pending))

    def _check_room(self, recipients: list[str], size: int, ref: bytes) -> None:
        """Refuse (``unavailable``) a publish the store or a recipient's queue has no room
        for: nothing is written, so the publisher may send the same envelope again later."""
        hub = self.hub
        full = hub.capacity.check() if hub.capacity is not None else None
        for node in recipients:
            if full is not None:
                break
            owed = hub.queue_of(node).committed_bytes
            if owed + size > hub.max_queued_bytes:
                full = (f"the queue of {node} is full: {owed} bytes owed, limit "
                        f"{hub.max_queued_bytes} (limits.max_queued_bytes_per_node)")
        if full is not None:
            log.warning("publish_refused_no_room", id=ref.hex(), reason=full)
            raise StorageError(full, code="unavailable", ref=ref)

    def _cancel(self, rows: list[QueueRow]) -> None:
        hub = self.hub
        for row in rows:
            hub.queue_of(row.recipient).cancel(row.seq)

    def _published(self, done: asyncio.Future[int], pending: _Publish) -> None:
        hub = self.hub
        env = pending.env
        if done.cancelled() or done.exception() is not None:
            reason = "the broker stopped" if done.cancelled() else str(done.exception())
            log.error("publish_not_durable", id=env.id.hex(), reason=reason)
            hub.metrics.refused("unavailable")
            self._cancel(pending.rows)
            pending.reply(wire.Error(code="unavailable", reason="not stored: " + reason,
                                     ref=env.id))
            return
        index = done.result()
        statuses = {node: "denied:" + ",".join(d.reasons)
                    for node, d in pending.decisions.items() if not d.permit}
        for row in pending.rows:
            queue = hub.queue_of(row.recipient)
            queue.push(message_id=row.id, sender=row.sender, envelope=row.envelope,
                       prec=row.prec, expires_ms=row.expires_ms, seq=row.seq,
                       queued_ms=row.queued_ms)
            hub.pump(row.recipient)
            statuses[row.recipient] = "delivered" if queue.is_in_flight(row.seq) else "queued"
        # Debug: one line per message costs ~5 % of the broker at load, and the audit log
        # already records every decision (docs/performance.md).
        log.debug("published", id=env.id.hex(), sender=env.sender, topic=env.topic,
                  prec=env.prec, audit=index, recipients=statuses)
        hub.metrics.published(pending.decisions)
        pending.reply(wire.Receipt(id=env.id, audit=index, recipients=statuses))

