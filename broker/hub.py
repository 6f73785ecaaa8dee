"""The routing core: what the broker does with each authenticated request.

The hub owns the active policy bundle, durable subscriptions, per-recipient queues, the replay
guard and the registry of live connections. It speaks frames, not sockets: connections are
:class:`Peer` objects whose ``send`` never blocks (the server gives each its own writer task), so a
slow recipient cannot slow a publisher or another recipient.

Every publish is decided synchronously, in the order frames arrive, then written to the audit log
together with its queue rows. The receipt and the deliveries are released by the log's commit
callback: nothing leaves before its ``route`` entry is durable, and the connection's read loop
never waits for a disk.

A publish the broker may not be able to keep is refused (``unavailable``, with the reason)
before anything is written: a permitted recipient's queue over its byte limit, or the store over
its size or disk-space limit. Messages past their TTL leave the queue with an ``expire`` entry;
their sender gets an ``expired`` frame, at once if connected, else at its next connect (the
notice is stored with the entry).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Collection
from typing import Protocol

import structlog

from broker import router, wire
from broker.audit.leaves import (
    DeliverEntry,
    Entry,
    PolicyEntry,
    RouteEntry,
    envelope_digest,
)
from broker.audit.log import AuditLog, log_failure
from broker.capacity import StoreCapacity
from broker.coldreads import ColdReads
from broker.crypto import DOMAIN_ENVELOPE, bad_signature_reason, check_signature
from broker.delivery import RecipientQueue
from broker.envelope import Envelope
from broker.errors import BrokerError, ProtocolError, StorageError, VerificationError
from broker.expiry import Expiry
from broker.limits import EnvelopeLimits, check_envelope_limits, check_route_limits
from broker.metrics import Metrics
from broker.node_status import NodeStatuses
from broker.release import decide_recipient
from broker.replay import ReplayGuard
from broker.session import error_frame
from broker.store.base import Batch, QueueRow
from broker.stored_bundle import stored_high_water
from broker.verifier import VerifyPool
from policies.bundle import (
    Bundle,
    bundle_content,
)
from policies.cache import DecisionCache
from policies.catalogue import label_catalogue
from policies.decide import Decision
from policies.highwater import HighWater
from policies.model import Label, NodeCert

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


class Hub:
    """Routing state and logic, shared by every connection of one broker."""

    def __init__(
        self,
        bundle: Bundle,
        audit: AuditLog,
        *,
        clock_ms: Callable[[], int],
        skew_ms: int = 5 * 60 * 1000,
        window: int = 64,
        max_envelope: int = 1 << 20,
        max_queued_bytes: int = 256 << 20,
        queue_memory_bytes: int = 1 << 20,
        capacity: StoreCapacity | None = None,
        metrics: Metrics | None = None,
        envelope_limits: EnvelopeLimits | None = None,
        verifier: VerifyPool | None = None,
    ) -> None:
        #: Sizes of topic, label, ``to`` and ``keys`` accepted (``too_large`` beyond).
        self.envelope_limits = envelope_limits or EnvelopeLimits()
        self.bundle = bundle
        self.audit = audit
        self.clock_ms = clock_ms
        self.replay = ReplayGuard(skew_ms=skew_ms)
        self.subscriptions: dict[str, set[str]] = {}
        #: Subscribers per topic, memoised; cleared whenever ``subscriptions`` changes.
        self._subscribers: dict[str, frozenset[str]] = {}
        self.queues: dict[str, RecipientQueue] = {}
        self.peers: dict[str, Peer] = {}
        self._window = window
        self._first_seq = 1
        self._max_envelope = max_envelope
        self.max_queued_bytes = max_queued_bytes
        self._queue_memory = queue_memory_bytes
        #: Envelopes of copies queued beyond the memory budget, read from the store.
        self.cold_reads = ColdReads(lambda node, seqs: self.audit.store.queued_envelopes(
            node, seqs), self._pump)
        self.capacity = capacity
        self.decisions = DecisionCache()
        #: The bundle last activated, here or (after :meth:`restore`) in the previous run:
        #: the one a new bundle must succeed.
        self._in_force: Bundle | None = None
        #: The highest of every document any bundle in force here ever held (policies.highwater):
        #: a document removed in one reload cannot come back older in a later one.
        self.high_water = HighWater()
        #: Worker processes that check envelope signatures; ``None``: checked on the loop.
        self.verifier = verifier
        self.metrics = metrics or Metrics()
        #: Copies past their TTL, and the notices owed to their senders.
        self.expiry = Expiry(audit, self.metrics, self.peers)
        #: Nodes an operator suspended, resumed or revoked.
        self.node_status = NodeStatuses(audit, clock_ms, self.peers)
        self.metrics.watch(self, clock_ms)
        audit.commit_observers.append(self.metrics.committed)

    @property
    def statuses(self) -> dict[str, str]:
        """Nodes an operator suspended or revoked (also in :attr:`inactive`; durable)."""
        return self.node_status.statuses

    @property
    def inactive(self) -> set[str]:
        """Nodes no copy may go to or come from now (suspended or revoked by an operator)."""
        return self.node_status.inactive

    # --- state --------------------------------------------------------------------------

    def restore(self, in_force: Bundle | None) -> None:
        """Reload durable subscriptions and queued messages from the store (at start);
        ``in_force`` is the bundle the store records as in force
        (:func:`broker.stored_bundle.stored_bundle`): a new one must succeed it."""
        for node, pattern in self.audit.store.subscriptions():
            self.subscriptions.setdefault(node, set()).add(pattern)
        self._subscribers.clear()
        self._first_seq = self.audit.store.seq_high() + 1
        # Without the envelopes: a backlog is restored as small records, each read from the
        # store when its copy is sent.
        queued = 0
        for row in self.audit.store.queue_records():
            queued += 1
            self._queue(row.recipient).push(
                message_id=row.id, sender=row.sender, envelope=None, size=row.size,
                prec=row.prec, expires_ms=row.expires_ms, seq=row.seq, queued_ms=row.queued_ms)
        self.node_status.restore(self.audit.store.node_statuses())
        self.expiry.restore(self.audit.store.notices())
        self._in_force = in_force
        self.high_water = stored_high_water(self.audit.store, in_force)
        # The replay guard is memory: refill it, or an envelope accepted just before a restart
        # could be accepted again (and routed and logged twice) for the rest of its window.
        recent = self.audit.recent_routes(self.clock_ms() - 2 * self.replay.skew_ms)
        for message_id, seen_ms in sorted(recent, key=lambda route: route[1]):
            self.replay.record(message_id, seen_ms)  # in time order: the guard expires FIFO
        log.info("hub_restored", subscriptions=sum(map(len, self.subscriptions.values())),
                 queued=queued, notices=self.expiry.owed,
                 recent_ids=len(recent))

    def activate(self, bundle: Bundle) -> asyncio.Future[int]:
        """Make ``bundle`` the policy in force: the one seam every activation goes through, so
        each is a ``policy`` audit entry (with the bundle's content, for replay).

        Refuses (``PolicyDocumentError`` ``rollback``, nothing changed) a bundle that steps back
        from the one in force, also across restarts, or below the highest of every document any
        bundle in force here ever held (:meth:`policies.highwater.HighWater.check_successor`).
        Connections whose certificate the new bundle replaced or revoked are closed.
        """
        # The marks apply also when the store lost its record of the bundle in force (it is
        # then compared with itself): those of every stored bundle still hold.
        self.high_water.check_successor(self._in_force or self.bundle, bundle)
        marks = self.high_water.merge(bundle)
        # The marks are stored in the bundle's commit: a start reads them, not every bundle.
        future = self.audit.append(PolicyEntry(ts=self.clock_ms(), bundle=bundle.hash),
                                   bundles=[(bundle.hash, bundle_content(bundle))],
                                   marks=[marks.to_bytes()])
        previous, self.bundle, self._in_force = self.bundle, bundle, bundle
        self.high_water = marks
        self.decisions.clear()
        log.info("policy_activated", bundle=bundle.hash.hex(), previous=previous.hash.hex(),
                 nodes=len(bundle.nodes), agreements=len(bundle.agreements),
                 revocations=len(bundle.revocations))
        self._close_superseded(previous)
        return future

    def _close_superseded(self, previous: Bundle) -> None:
        """Close every connection authenticated with a certificate that is no longer the one in
        force (rotated to a new key, revoked by its nation, or removed)."""
        for node, peer in list(self.peers.items()):
            old, new = previous.nodes.get(node), self.bundle.nodes.get(node)
            revoked = new is not None and self.bundle.revocation_of(new) is not None
            if new is None or new != old or revoked:
                log.warning("certificate_superseded", node=node, revoked=revoked)
                peer.close("node_inactive", "the certificate this connection authenticated "
                           "with was replaced or revoked; reconnect with the current one")

    def record(self, entry: Entry) -> None:
        """Append an entry nothing waits for (sessions, deliveries); failures are logged."""
        try:
            self.audit.append(entry).add_done_callback(log_failure)
        except StorageError as exc:
            log.error("audit_append_refused", kind=entry.KIND, reason=exc.reason)

    # --- connections --------------------------------------------------------------------

    def lookup(self, node: str) -> NodeCert | None:
        """The certificate of a node, from the active bundle."""
        return self.bundle.nodes.get(node)

    def is_inactive(self, node: str) -> bool:
        """Suspended or revoked by an operator, or its certificate revoked by its nation."""
        if node in self.inactive:
            return True
        cert = self.bundle.nodes.get(node)
        return cert is not None and self.bundle.revocation_of(cert) is not None

    def attach(self, peer: Peer) -> None:
        """A node authenticated: replace any older connection, then send what it is owed."""
        old = self.peers.get(peer.node)
        if old is not None and old is not peer:
            old.close("replaced", "a newer connection of this node authenticated")
            self._queue(peer.node).requeue_in_flight()
        self.peers[peer.node] = peer
        log.info("node_connected", node=peer.node)
        self._pump(peer.node)
        self.expiry.send_notices(peer.node)

    def detach(self, peer: Peer) -> None:
        """A connection ended: un-acked deliveries go back to pending."""
        if self.peers.get(peer.node) is peer:
            del self.peers[peer.node]
            self._queue(peer.node).requeue_in_flight()
            log.info("node_disconnected", node=peer.node)

    # --- requests -----------------------------------------------------------------------

    def subscribe(self, node: str, pattern: str, *, limit: int = 1024) -> None:
        """Add a durable subscription (kept while the node is offline), at most ``limit``."""
        patterns = self.subscriptions.setdefault(node, set())
        router.validate_pattern(pattern)
        if pattern in patterns:
            return
        if len(patterns) >= limit:
            raise ProtocolError(f"at most {limit} subscriptions per node", code="rate_limited")
        self.audit.write(Batch(subscribe=[(node, pattern)])).add_done_callback(log_failure)
        patterns.add(pattern)
        self._subscribers.clear()

    def unsubscribe(self, node: str, pattern: str) -> None:
        patterns = self.subscriptions.get(node, set())
        if router.validate_pattern(pattern) in patterns:
            self.audit.write(Batch(unsubscribe=[(node, pattern)])).add_done_callback(log_failure)
            patterns.discard(pattern)
            self._subscribers.clear()

    def directory(self) -> wire.Directory:
        """Every node certificate in force (revoked ones left out), signed, for key lookup."""
        return wire.Directory(certs=tuple(c.signed for c in self.bundle.usable_certs()))

    def route(self, sender: NodeCert, frame: wire.Route) -> wire.Routes:
        """The dry run: the decision per candidate recipient, and the keys of those permitted."""
        check_route_limits(frame, self.envelope_limits)
        topic = router.validate_topic(frame.topic)
        to = frame.to or ()
        candidates = self._candidates(sender.node, topic, to)
        try:
            label: Label | None = Label.from_map(dict(frame.label))
        except ProtocolError:
            label = None
        now = self.clock_ms()
        recipients: dict[str, str] = {}
        keys: dict[str, bytes] = {}
        for node in candidates:
            decision = (Decision.deny("invalid_label") if label is None else
                        self._decide(label, sender, node, topic, now, sealed_for=None))
            recipients[node] = decision.status()
            if decision.permit:
                keys[node] = self.bundle.nodes[node].enc_key
        catalogue = None
        if frame.catalogue:
            nations = {n for n in map(self.bundle.nation_of, candidates) if n is not None}
            catalogue = {nation: label_catalogue(self.bundle, sender.nation, nation, now_ms=now,
                                                 topic=topic).to_map()
                         for nation in sorted(nations)}
        return wire.Routes(recipients=recipients, keys=keys, catalogue=catalogue)

    def audit_size(self) -> int:
        return self.audit.size

    def publish(self, sender: NodeCert, env_bytes: bytes, origin: Peer) -> None:
        """Verify and decide (now, or when a signature worker answers); ``origin``, the
        connection that sent it, gets the receipt once the route entry is durable.

        Raises ``BrokerError`` on a bad envelope (nothing of it is routed or logged) and
        ``StorageError`` when the audit log no longer accepts entries or has no room; what is
        found after a worker's verdict is sent to ``origin`` as an error frame instead.
        """
        try:
            self._publish(sender, env_bytes, origin)
        except BrokerError as exc:
            self.metrics.refused(exc.code)
            raise

    def _publish(self, sender: NodeCert, env_bytes: bytes, origin: Peer) -> None:
        env = Envelope.from_bytes(env_bytes, max_bytes=self._max_envelope)
        check_envelope_limits(env, self.envelope_limits)
        if env.sender != sender.node or env.label.orig != sender.nation:
            raise ProtocolError("envelope 'from'/label.orig do not match the authenticated node",
                                code="sender_mismatch", ref=env.id)
        self._check_in_force(sender, env.id)
        if self.verifier is None:
            if not check_signature(sender.sign_key, DOMAIN_ENVELOPE, env.body, env.sig):
                raise VerificationError(BAD_SIGNATURE, code="bad_signature", ref=env.id)
            self._route(env, sender, origin.send)
        else:
            self.verifier.submit(sender.sign_key, env.body, env.sig,
                                 functools.partial(self._verified, env, sender, origin))

    def _verified(self, env: Envelope, sender: NodeCert, origin: Peer, ok: bool) -> None:
        """The rest of a publish whose signature a worker checked. What may have changed while
        it waited is checked again: the connection (closed meanwhile: replaced, suspended,
        revoked, or gone; the envelope is not accepted, as it could not be acknowledged, and
        its sender sends it again), the certificate in force, the replay guard, the policy
        (decided now, under the bundle in force)."""
        if origin.closing:
            log.info("publish_abandoned", node=sender.node, id=env.id.hex(),
                     reason="its connection closed before its signature was checked")
            return
        try:
            if not ok:
                raise VerificationError(BAD_SIGNATURE, code="bad_signature", ref=env.id)
            self._check_in_force(sender, env.id)
            if self.is_inactive(sender.node):
                raise ProtocolError("the node was suspended or revoked", code="node_inactive",
                                    ref=env.id)
            self._route(env, sender, origin.send)
        except BrokerError as exc:
            # As the connection's own handler does for a request refused at once.
            self.metrics.refused(exc.code)
            log.info("request_rejected", frame="pub", node=sender.node, code=exc.code,
                     reason=exc.reason)
            origin.send(error_frame(exc.code, exc.reason, env.id))
        except Exception:
            log.exception("request_failed", frame="pub", node=sender.node)
            reason = "the broker failed on this request"
            origin.send(error_frame("internal", reason, env.id))
            origin.close("internal", reason)

    def _check_in_force(self, sender: NodeCert, ref: bytes) -> None:
        current = self.bundle.nodes.get(sender.node)
        if current is not sender and current != sender:  # identity first: the usual case
            # The connection predates a bundle that replaced or revoked its certificate (it is
            # being closed): nothing more is accepted under the old key.
            raise ProtocolError("the certificate this connection authenticated with is no "
                                "longer in force", code="node_inactive", ref=ref)

    def _route(self, env: Envelope, sender: NodeCert, reply: Reply) -> None:
        """Decide for every candidate and log the route entry; its commit completes the
        publish (:meth:`_published`). The envelope's signature is verified."""
        now = self.clock_ms()
        ref = env.id
        # Only after the signature: a forger must not be able to burn ids in the replay cache.
        stale = self.replay.check(env.id, env.ts, now)
        if stale is not None:
            raise ProtocolError(stale, code="replay", ref=ref)
        candidates = self._candidates(sender.node, env.topic, env.to)
        decisions = {node: self._decide(env.label, sender, node, env.topic, now,
                                        sealed_for=env.keys) for node in candidates}
        permitted = [node for node, decision in decisions.items() if decision.permit]
        self._check_room(permitted, len(env.raw), ref)
        rows = [QueueRow(node, self._queue(node).reserve_seq(len(env.raw)), env.prec, env.id,
                         env.sender, env.raw, now + env.ttl * 1000, now)
                for node in permitted]
        entry = RouteEntry(
            ts=now, id=env.id, env=envelope_digest(env.raw), sender=env.sender, topic=env.topic,
            label=env.label, prec=env.prec, ttl=env.ttl, bundle=self.bundle.hash,
            sealed=tuple(sorted(env.keys)), decisions=decisions)
        try:
            future = self.audit.append(entry, enqueue=rows)
        except StorageError as exc:
            self._cancel(rows)
            raise StorageError(exc.reason, ref=ref) from None
        self.replay.record(env.id, now)
        pending = _Publish(env, decisions, rows, reply)
        future.add_done_callback(lambda done: self._published(done, pending))

    def ack(self, node: str, seqs: tuple[int, ...]) -> None:
        """Acknowledged deliveries leave the queue (durably, with a ``deliver`` entry)."""
        now = self.clock_ms()
        acked = self._queue(node).ack(seqs)
        if acked:
            self.metrics.deliveries.inc(len(acked))
            # One request for the frame's acks: their entries are consecutive and durable
            # together, as they would be in one group commit anyway. Lazy: nothing waits for
            # it (were it lost in a crash, the copies would be delivered again).
            entries = [DeliverEntry(ts=now, id=item.message_id, to=node, seq=item.seq)
                       for item in acked]
            try:
                self.audit.append_all(entries, dequeue=[(node, item.seq) for item in acked],
                                      lazy=True).add_done_callback(log_failure)
            except StorageError as exc:
                log.error("audit_append_refused", kind="deliver", reason=exc.reason)
        self._pump(node)

    # --- operator actions ---------------------------------------------------------------

    def set_status(self, node: str, status: str, *, operator: str) -> asyncio.Future[int]:
        """Suspend (``suspended``), resume (``active``) or revoke (``revoked``) ``node``
        (:meth:`broker.node_status.NodeStatuses.change`)."""
        return self.node_status.change(node, status, operator=operator)

    # --- expiry -------------------------------------------------------------------------

    def expire_due(self) -> int:
        """Drop every pending message past its TTL (each with an ``expire`` entry and a notice
        for its sender); returns how many. Called periodically by :meth:`run_expiry`."""
        now = self.clock_ms()
        count = 0
        for node, queue in self.queues.items():
            expired = queue.take_expired(now)
            if expired:
                self.expiry.expire(node, expired, now)
                count += len(expired)
        return count

    async def run_expiry(self, interval_s: float) -> None:
        """Expire due messages every ``interval_s`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.expire_due()

    # --- internals ----------------------------------------------------------------------

    def _check_room(self, recipients: list[str], size: int, ref: bytes) -> None:
        """Refuse (``unavailable``) a publish the store or a recipient's queue has no room
        for: nothing is written, so the publisher may send the same envelope again later."""
        full = self.capacity.check() if self.capacity is not None else None
        for node in recipients:
            if full is not None:
                break
            owed = self._queue(node).committed_bytes
            if owed + size > self.max_queued_bytes:
                full = (f"the queue of {node} is full: {owed} bytes owed, limit "
                        f"{self.max_queued_bytes} (limits.max_queued_bytes_per_node)")
        if full is not None:
            log.warning("publish_refused_no_room", id=ref.hex(), reason=full)
            raise StorageError(full, code="unavailable", ref=ref)

    def _cancel(self, rows: list[QueueRow]) -> None:
        for row in rows:
            self._queue(row.recipient).cancel(row.seq)

    def _published(self, done: asyncio.Future[int], pending: _Publish) -> None:
        env = pending.env
        if done.cancelled() or done.exception() is not None:
            reason = "the broker stopped" if done.cancelled() else str(done.exception())
            log.error("publish_not_durable", id=env.id.hex(), reason=reason)
            self.metrics.refused("unavailable")
            self._cancel(pending.rows)
            pending.reply(wire.Error(code="unavailable", reason="not stored: " + reason,
                                     ref=env.id))
            return
        index = done.result()
        statuses = {node: "denied:" + ",".join(d.reasons)
                    for node, d in pending.decisions.items() if not d.permit}
        for row in pending.rows:
            queue = self._queue(row.recipient)
            queue.push(message_id=row.id, sender=row.sender, envelope=row.envelope,
                       prec=row.prec, expires_ms=row.expires_ms, seq=row.seq,
                       queued_ms=row.queued_ms)
            self._pump(row.recipient)
            statuses[row.recipient] = "delivered" if queue.is_in_flight(row.seq) else "queued"
        # Debug: one line per message costs ~5 % of the broker at load, and the audit log
        # already records every decision (docs/performance.md).
        log.debug("published", id=env.id.hex(), sender=env.sender, topic=env.topic,
                  prec=env.prec, audit=index, recipients=statuses)
        self.metrics.published(pending.decisions)
        pending.reply(wire.Receipt(id=env.id, audit=index, recipients=statuses))

    def _candidates(self, sender: str, topic: str, to: Collection[str]) -> list[str]:
        """:func:`router.candidate_recipients`, with the subscribers of a topic memoised: the
        scan of every node's patterns is done once per topic until a subscription changes."""
        subscribed = self._subscribers.get(topic)
        if subscribed is None:
            if len(self._subscribers) >= 4096:  # topics are the publishers' to choose: bounded
                self._subscribers.clear()
            subscribed = self._subscribers[topic] = router.subscribers(topic,
                                                                       self.subscriptions)
        return router.recipients_of(sender, subscribed, to)

    def _decide(self, label: Label, sender: NodeCert, node: str, topic: str, now: int, *,
                sealed_for: Collection[str] | None) -> Decision:
        return decide_recipient(label, sender, node, topic, now, self.bundle,
                                sealed_for=sealed_for, inactive_nodes=self.inactive,
                                cache=self.decisions)

    def _queue(self, node: str) -> RecipientQueue:
        queue = self.queues.get(node)
        if queue is None:
            queue = self.queues[node] = RecipientQueue(self._window, first_seq=self._first_seq,
                                                       memory_bytes=self._queue_memory)
        return queue

    def _pump(self, node: str) -> None:
        peer = self.peers.get(node)
        if peer is None or self.cold_reads.waiting(node):
            return
        queue, now = self._queue(node), self.clock_ms()
        expired = queue.take_expired(now)
        if expired:
            self.expiry.expire(node, expired, now)
        items = queue.take_sendable()
        cold = [item.seq for item in items if item.envelope is None]
        stored = self.cold_reads.read(node, cold) if cold else {}
        if stored is None:  # the read failed: back to pending, tried again later
            queue.unsend(cold)
            self.cold_reads.retry_later(node)
            stored = {}
        for item in items:
            env = item.envelope if item.envelope is not None else stored.get(item.seq)
            if env is not None:
                peer.send(wire.Deliver(env=env, seq=item.seq))
            # else: unsent back in pending, or missing from the store (logged; it stays in
            # flight, one window slot, and is tried again after a reconnect; damage only).

