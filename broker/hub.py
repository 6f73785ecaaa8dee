"""The routing core: what the broker does with each authenticated request.

The hub owns the active policy bundle, durable subscriptions, per-recipient queues, the replay
guard and the registry of live connections. It speaks frames, not sockets: connections are
:class:`Peer` objects whose ``send`` never blocks (the server gives each its own writer task), so a
slow recipient cannot slow a publisher or another recipient.

Every publish is decided synchronously, in the order frames arrive, then written to the audit log
together with its queue rows (:mod:`broker.publish`). The receipt and the deliveries are
released by the log's commit callback: nothing leaves before its ``route`` entry is durable,
and the connection's read loop never waits for a disk.

A publish the broker may not be able to keep is refused (``unavailable``, with the reason)
before anything is written: a permitted recipient's queue over its byte limit, or the store over
its size or disk-space limit. Messages past their TTL leave the queue with an ``expire`` entry;
their sender gets an ``expired`` frame, at once if connected, else at its next connect (the
notice is stored with the entry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

import structlog

from broker import router, wire
from broker.audit.leaves import (
    DeliverEntry,
    Entry,
    PolicyEntry,
)
from broker.audit.log import AuditLog, log_failure
from broker.capacity import StoreCapacity
from broker.coldreads import ColdReads
from broker.delivery import RecipientQueue
from broker.errors import ProtocolError, StorageError
from broker.expiry import Expiry
from broker.limits import EnvelopeLimits, check_route_limits
from broker.metrics import Metrics
from broker.node_status import NodeStatuses
from broker.publish import Peer, Publisher
from broker.release import decide_recipient
from broker.replay import ReplayGuard
from broker.store.base import Batch
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
        self.max_envelope = max_envelope
        self.max_queued_bytes = max_queued_bytes
        self._queue_memory = queue_memory_bytes
        #: Envelopes of copies queued beyond the memory budget, read from the store.
        self.cold_reads = ColdReads(lambda node, seqs: self.audit.store.queued_envelopes(
            node, seqs), self.pump)
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
        #: Each publish, from the frame to its receipt.
        self.publisher = Publisher(self)
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
            self.queue_of(row.recipient).push(
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
            self.queue_of(peer.node).requeue_in_flight()
        self.peers[peer.node] = peer
        log.info("node_connected", node=peer.node)
        self.pump(peer.node)
        self.expiry.send_notices(peer.node)

    def detach(self, peer: Peer) -> None:
        """A connection ended: un-acked deliveries go back to pending."""
        if self.peers.get(peer.node) is peer:
            del self.peers[peer.node]
            self.queue_of(peer.node).requeue_in_flight()
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
        candidates = self.candidates(sender.node, topic, to)
        try:
            label: Label | None = Label.from_map(dict(frame.label))
        except ProtocolError:
            label = None
        now = self.clock_ms()
        recipients: dict[str, str] = {}
        keys: dict[str, bytes] = {}
        for node in candidates:
            decision = (Decision.deny("invalid_label") if label is None else
                        self.decide(label, sender, node, topic, now, sealed_for=None))
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
        """:meth:`broker.publish.Publisher.publish`."""
        self.publisher.publish(sender, env_bytes, origin)

    def ack(self, node: str, seqs: tuple[int, ...]) -> None:
        """Acknowledged deliveries leave the queue (durably, with a ``deliver`` entry)."""
        now = self.clock_ms()
        acked = self.queue_of(node).ack(seqs)
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
        self.pump(node)

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

    # --- shared with the publish path (broker.publish) ------------------------------------

    def candidates(self, sender: str, topic: str, to: Collection[str]) -> list[str]:
        """:func:`router.candidate_recipients`, with the subscribers of a topic memoised: the
        scan of every node's patterns is done once per topic until a subscription changes."""
        subscribed = self._subscribers.get(topic)
        if subscribed is None:
            if len(self._subscribers) >= 4096:  # topics are the publishers' to choose: bounded
                self._subscribers.clear()
            subscribed = self._subscribers[topic] = router.subscribers(topic,
                                                                       self.subscriptions)
        return router.recipients_of(sender, subscribed, to)

    def decide(self, label: Label, sender: NodeCert, node: str, topic: str, now: int, *,
               sealed_for: Collection[str] | None) -> Decision:
        """The decision for one candidate recipient under the bundle in force (cached)."""
        return decide_recipient(label, sender, node, topic, now, self.bundle,
                                sealed_for=sealed_for, inactive_nodes=self.inactive,
                                cache=self.decisions)

    def queue_of(self, node: str) -> RecipientQueue:
        """The node's queue (made empty on first use)."""
        queue = self.queues.get(node)
        if queue is None:
            queue = self.queues[node] = RecipientQueue(self._window, first_seq=self._first_seq,
                                                       memory_bytes=self._queue_memory)
        return queue

    def pump(self, node: str) -> None:
        """Send the node what its delivery window allows, if it is connected."""
        peer = self.peers.get(node)
        if peer is None or self.cold_reads.waiting(node):
            return
        queue, now = self.queue_of(node), self.clock_ms()
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

