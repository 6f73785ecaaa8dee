"""The routing core: what the broker does with each authenticated request.

The hub owns the active policy bundle, durable subscriptions, per-recipient queues, the replay
guard and the registry of live connections. It speaks frames, not sockets: connections are
:class:`Peer` objects whose ``send`` never blocks (the server gives each its own writer task), so a
slow recipient cannot slow a publisher or another recipient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import structlog

from broker import router, wire
from broker.delivery import RecipientQueue
from broker.envelope import Envelope
from broker.errors import ProtocolError, VerificationError
from broker.replay import ReplayGuard
from policies.bundle import Bundle
from policies.cache import DecisionCache
from policies.decide import NO_KEY_FOR_RECIPIENT, Decision
from policies.model import Label, NodeCert

log = structlog.get_logger("broker.hub")

UNKNOWN_NODE = "unknown_node"


class Peer(Protocol):
    """A live, authenticated connection as the hub sees it."""

    node: str

    def send(self, frame: wire.Frame) -> None: ...

    def close(self, code: str, reason: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Published:
    """Outcome of a publish: the receipt, and the decisions for logging and audit."""

    receipt: wire.Receipt
    decisions: dict[str, Decision]


class Hub:
    """Routing state and logic, shared by every connection of one broker."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        clock_ms: Callable[[], int],
        skew_ms: int = 5 * 60 * 1000,
        window: int = 64,
        max_envelope: int = 1 << 20,
    ) -> None:
        self.bundle = bundle
        self.clock_ms = clock_ms
        self.replay = ReplayGuard(skew_ms=skew_ms)
        self.subscriptions: dict[str, set[str]] = {}
        self.queues: dict[str, RecipientQueue] = {}
        self.peers: dict[str, Peer] = {}
        self.inactive: set[str] = set()
        self._window = window
        self._max_envelope = max_envelope
        self._audit_counter = 0
        self.decisions = DecisionCache()

    # --- connections --------------------------------------------------------------------

    def lookup(self, node: str) -> NodeCert | None:
        """The certificate of a node, from the active bundle."""
        return self.bundle.nodes.get(node)

    def is_inactive(self, node: str) -> bool:
        return node in self.inactive

    def attach(self, peer: Peer) -> None:
        """A node authenticated: replace any older connection, then send what it is owed."""
        old = self.peers.get(peer.node)
        if old is not None and old is not peer:
            old.close("replaced", "a newer connection of this node authenticated")
            self._queue(peer.node).requeue_in_flight()
        self.peers[peer.node] = peer
        log.info("node_connected", node=peer.node)
        self._pump(peer.node)

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
        if pattern not in patterns and len(patterns) >= limit:
            raise ProtocolError(f"at most {limit} subscriptions per node", code="rate_limited")
        patterns.add(pattern)

    def unsubscribe(self, node: str, pattern: str) -> None:
        self.subscriptions.get(node, set()).discard(router.validate_pattern(pattern))

    def directory(self) -> wire.Directory:
        """Every known node certificate, signed, for key lookup by gateways."""
        return wire.Directory(certs=tuple(c.signed for _, c in sorted(self.bundle.nodes.items())))

    def route(self, sender: NodeCert, frame: wire.Route) -> wire.Routes:
        """The dry run: the decision per candidate recipient, and the keys of those permitted."""
        topic = router.validate_topic(frame.topic)
        to = frame.to or ()
        candidates = router.candidate_recipients(sender.node, topic, to, self.subscriptions)
        try:
            label: Label | None = Label.from_map(dict(frame.label))
        except ProtocolError:
            label = None
        now = self.clock_ms()
        recipients: dict[str, str] = {}
        keys: dict[str, bytes] = {}
        for node in candidates:
            if label is None:
                decision = Decision.deny("invalid_label")
            else:
                decision = self._decide(label, sender, node, topic, now)
            recipients[node] = decision.status()
            if decision.permit:
                keys[node] = self.bundle.nodes[node].enc_key
        return wire.Routes(recipients=recipients, keys=keys)

    def publish(self, sender: NodeCert, env_bytes: bytes) -> Published:
        """Verify, decide per candidate, queue and push. Raises ``BrokerError`` on a bad envelope
        (nothing of it is routed)."""
        now = self.clock_ms()
        env = Envelope.from_bytes(env_bytes, max_bytes=self._max_envelope)
        ref = env.id
        if env.sender != sender.node or env.label.orig != sender.nation:
            raise ProtocolError("envelope 'from'/label.orig do not match the authenticated node",
                                code="sender_mismatch", ref=ref)
        try:
            env.verify(sender.sign_key)
        except VerificationError as exc:
            raise VerificationError(exc.reason, code=exc.code, ref=ref) from None
        # Only after the signature: a forger must not be able to burn ids in the replay cache.
        stale = self.replay.check(env.id, env.ts, now)
        if stale is not None:
            raise ProtocolError(stale, code="replay", ref=ref)
        self.replay.record(env.id, now)
        candidates = router.candidate_recipients(sender.node, env.topic, env.to,
                                                 self.subscriptions)
        decisions: dict[str, Decision] = {}
        statuses: dict[str, str] = {}
        for node in candidates:
            decision = self._decide(env.label, sender, node, env.topic, now)
            if decision.permit and node not in env.keys:
                decision = decision.with_reason(NO_KEY_FOR_RECIPIENT)
            decisions[node] = decision
            statuses[node] = (self._enqueue(node, env, now) if decision.permit
                              else "denied:" + ",".join(decision.reasons))
        self._audit_counter += 1
        log.info("published", id=env.id.hex(), sender=sender.node, topic=env.topic,
                 prec=env.prec, recipients=statuses)
        receipt = wire.Receipt(id=env.id, audit=self._audit_counter, recipients=statuses)
        return Published(receipt=receipt, decisions=decisions)

    def ack(self, node: str, seqs: tuple[int, ...]) -> None:
        """Acknowledged deliveries leave the queue; the window opens for more."""
        done = self._queue(node).ack(seqs)
        for item in done:
            log.debug("delivery_acked", node=node, id=item.message_id.hex(), seq=item.seq)
        self._pump(node)

    # --- internals ----------------------------------------------------------------------

    def _decide(self, label: Label, sender: NodeCert, node: str, topic: str, now: int) -> Decision:
        recipient = self.bundle.nodes.get(node)
        if recipient is None:
            return Decision.deny(UNKNOWN_NODE)
        return self.decisions.decide(label, sender, recipient, topic, now, self.bundle,
                                     inactive_nodes=self.inactive)

    def _queue(self, node: str) -> RecipientQueue:
        queue = self.queues.get(node)
        if queue is None:
            queue = self.queues[node] = RecipientQueue(self._window)
        return queue

    def _enqueue(self, node: str, env: Envelope, now: int) -> str:
        queue = self._queue(node)
        item = queue.push(
            message_id=env.id, sender=env.sender, envelope=env.raw, prec=env.prec,
            expires_ms=now + env.ttl * 1000,
        )
        self._pump(node)
        return "delivered" if queue.is_in_flight(item.seq) else "queued"

    def _pump(self, node: str) -> None:
        peer = self.peers.get(node)
        if peer is None:
            return
        for item in self._queue(node).take_sendable():
            peer.send(wire.Deliver(env=item.envelope, seq=item.seq))

