"""Copies past their TTL: dropped with an ``expire`` entry, and their senders told.

Each expired copy leaves its queue with an ``expire`` audit entry, committed together with the
queue row's delete and a *notice* for the sender. Once that is durable the sender gets an
``expired`` frame, at once if connected, else when it next connects: the notice stays in the
store until it has been sent (then one write forgets it), so a restart does not lose it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import structlog

from broker import wire
from broker.audit.leaves import ExpireEntry
from broker.audit.log import AuditLog, log_failure
from broker.delivery import QueuedMessage
from broker.errors import StorageError
from broker.metrics import Metrics
from broker.store.base import Batch, Notice

if TYPE_CHECKING:
    from broker.publish import Peer

log = structlog.get_logger("broker.hub")


class Expiry:
    """Expires queued copies and owes their senders the notices (see the module docstring)."""

    def __init__(self, audit: AuditLog, metrics: Metrics, peers: Mapping[str, Peer]) -> None:
        self.audit = audit
        self.metrics = metrics
        #: The hub's live connections by node (read only).
        self._peers = peers
        #: Notices owed to senders, by sender (durable in the store until sent).
        self.notices: dict[str, list[Notice]] = {}

    def restore(self, notices: Iterable[Notice]) -> None:
        """Owe again the notices the store still holds (at start)."""
        for notice in notices:
            self.notices.setdefault(notice.sender, []).append(notice)

    @property
    def owed(self) -> int:
        """Notices not yet sent."""
        return sum(map(len, self.notices.values()))

    def expire(self, node: str, items: list[QueuedMessage], now: int) -> None:
        """Log the ``expire`` entries of ``node``'s copies ``items`` (already out of its
        queue); each sender is told once its entry is durable."""
        self.metrics.expiries.inc(len(items))
        for item in items:
            notice = Notice(sender=item.sender, id=item.message_id, recipient=node)
            entry = ExpireEntry(ts=now, id=item.message_id, to=node, sender=item.sender)
            try:
                future = self.audit.append(entry, dequeue=[(node, item.seq)], notices=[notice])
            except StorageError as exc:
                # Still in the store: restored and expired again after a restart.
                log.error("audit_append_refused", kind=entry.KIND, reason=exc.reason)
                continue
            future.add_done_callback(functools.partial(self._expired, notice=notice))
        log.info("messages_expired", node=node, count=len(items))

    def send_notices(self, sender: str) -> None:
        """Tell a connected sender which of its messages expired, then forget the notices."""
        peer = self._peers.get(sender)
        if peer is None or peer.closing or sender not in self.notices:
            return  # kept (durably) for the sender's next connection
        notices = self.notices.pop(sender)
        for notice in notices:
            peer.send(wire.Expired(id=notice.id, recipient=notice.recipient))
        try:
            self.audit.write(Batch(notices_sent=notices)).add_done_callback(log_failure)
        except StorageError as exc:
            log.error("notices_not_cleared", sender=sender, reason=exc.reason)

    def _expired(self, done: asyncio.Future[int], *, notice: Notice) -> None:
        if done.cancelled() or done.exception() is not None:
            log_failure(done)
            return
        self.notices.setdefault(notice.sender, []).append(notice)
        self.send_notices(notice.sender)
