"""Gateways as witnesses: the broker offers each new checkpoint with a consistency proof from the
last checkpoint that gateway cosigned, and stores the ``cosignature/v1`` lines it returns.

The broker only relays: a cosignature is accepted if it verifies with the node's certified key
over the latest checkpoint, and is kept with that checkpoint for auditors, who count distinct
nations against the trust root's witness quorum.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

import structlog

from broker import wire
from broker.audit.leaves import DeliverEntry, RouteEntry, entry_from_bytes
from broker.audit.log import AuditLog
from broker.audit.note import (
    SIG_COSIGNATURE_V1,
    Verifier,
    add_signatures,
    parse_note,
    parse_signature_line,
    verify_cosignature,
)
from broker.errors import ProtocolError, VerificationError
from broker.hub import Hub
from broker.publish import Peer
from broker.store.base import StoredCheckpoint
from policies.model import NodeCert

log = structlog.get_logger("broker.witnesses")

#: How many recent checkpoints a late cosignature may be for.
RECENT = 8
#: How many stored checkpoints a re-sent cosignature is looked up in.
OLDER = 64


def witness_verifier(cert: NodeCert) -> Verifier:
    """The cosignature verifier of a gateway: key name = node id, key = its signing key."""
    return Verifier(cert.node, cert.sign_key, SIG_COSIGNATURE_V1)


def cosigned_note(checkpoint: StoredCheckpoint) -> str:
    """The checkpoint note with every cosignature line received for it."""
    return add_signatures(checkpoint.note, [checkpoint.cosignatures[w]
                                            for w in sorted(checkpoint.cosignatures)])


class Witnesses:
    """Offers checkpoints to connected gateways and accepts their cosignatures."""

    def __init__(self, audit: AuditLog, hub: Hub) -> None:
        self.audit = audit
        self.hub = hub
        self._seen: collections.deque[StoredCheckpoint] = collections.deque(maxlen=RECENT)
        # Cosignatures are stored asynchronously: remember the sizes at once for the next offer.
        self._last_cosigned: dict[str, int] = {}

    def latest_note(self) -> str | None:
        """The latest checkpoint with its cosignatures (for ``welcome``)."""
        latest = self.audit.latest
        return None if latest is None else cosigned_note(latest)

    def broadcast(self, checkpoint: StoredCheckpoint) -> None:
        """A new checkpoint was signed: offer it to every connected gateway."""
        self._seen.append(checkpoint)
        for peer in list(self.hub.peers.values()):
            self.offer(peer, checkpoint)

    def offer(self, peer: Peer, checkpoint: StoredCheckpoint | None = None) -> None:
        """Send ``checkpoint`` (default: the latest) with a proof from the peer's last cosigned
        size; a gateway that never cosigned (or cosigned this size) gets an empty proof."""
        checkpoint = checkpoint or self.audit.latest
        if checkpoint is None:
            return
        old = max(self._last_cosigned.get(peer.node, 0),
                  self.audit.store.last_cosigned_size(peer.node))
        if not 0 < old < checkpoint.size:
            old = 0 if old > checkpoint.size else old
            proof: list[bytes] = []
        else:
            proof = self.audit.consistency_proof(old, checkpoint.size)
        peer.send(wire.Checkpoint(note=checkpoint.note, proof=tuple(proof), old=old))

    def accept(self, cert: NodeCert, line: str) -> None:
        """Verify a cosignature over one of the recent checkpoints and store it
        (asynchronously). Raises ``BrokerError`` if it verifies over none of them."""
        signature = parse_signature_line(line)
        verifier = witness_verifier(cert)
        for checkpoint in self._candidates(cert.node):
            try:
                verify_cosignature(parse_note(checkpoint.note).text, signature, verifier)
            except VerificationError:
                continue
            task = asyncio.ensure_future(
                self.audit.add_cosignature(checkpoint.size, cert.node, line))
            task.add_done_callback(_log_failure)
            self._last_cosigned[cert.node] = max(self._last_cosigned.get(cert.node, 0),
                                                 checkpoint.size)
            log.info("checkpoint_cosigned", node=cert.node, size=checkpoint.size)
            return
        raise VerificationError("the cosignature verifies over none of the recent checkpoints")

    def prove(self, node: str, index: int) -> wire.Proof:
        """The inclusion proof of entry ``index`` in the latest checkpoint, for the node the
        entry is about (its own publish or delivery: other nodes' metadata is not served)."""
        latest = self.audit.latest
        if latest is None or index >= latest.size:
            raise ProtocolError(f"entry {index} is not covered by a checkpoint yet; retry after "
                                "the next one", code="unavailable")
        (data,) = self.audit.store.entries(index, index + 1)
        entry = entry_from_bytes(data)
        about = (entry.sender if isinstance(entry, RouteEntry) else
                 entry.to if isinstance(entry, DeliverEntry) else None)
        if about != node:
            raise ProtocolError(f"entry {index} is not about {node}", code="unexpected_frame")
        return wire.Proof(index=index, size=latest.size, entry=data,
                          proof=tuple(self.audit.inclusion_proof(index, latest.size)),
                          checkpoint=cosigned_note(latest))

    def _candidates(self, node: str) -> Iterator[StoredCheckpoint]:
        """Recent checkpoints first; then (read only if needed) the stored ones since this
        node's last stored cosignature: a gateway re-sends its last cosignature when the broker
        lost it in a crash."""
        recent = self._recent()
        yield from recent
        seen = {c.size for c in recent}
        since = self.audit.store.last_cosigned_size(node)
        for checkpoint in reversed(self.audit.store.checkpoints(since)[-OLDER:]):
            if checkpoint.size not in seen:
                yield checkpoint

    def _recent(self) -> list[StoredCheckpoint]:
        # A gateway may answer a checkpoint just after the next one was signed.
        latest = self.audit.latest
        if latest is not None and (not self._seen or self._seen[-1] is not latest):
            self._seen.append(latest)
        return list(reversed(self._seen))


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("cosignature_not_stored", reason=str(done.exception()))
