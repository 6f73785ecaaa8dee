"""Nodes an operator suspended, resumed or revoked (the admin API).

A change is in force at once — a suspended or revoked node is disconnected and denied as a
recipient (``node_inactive``) — and recorded as an ``admin`` audit entry appended in the same
tick, so every decision logged after the entry was taken under the new status, as the
auditor's replay expects. A resume whose entry does not become durable is undone (the store
and the log still say suspended). The caller checks that the transition is allowed.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from broker.audit.leaves import AdminEntry
from broker.audit.log import AuditLog

if TYPE_CHECKING:
    from broker.publish import Peer

log = structlog.get_logger("broker.hub")

#: The audit entry's action for each status an operator sets.
ACTIONS = {"suspended": "suspend", "active": "resume", "revoked": "revoke"}


class NodeStatuses:
    """The statuses operators set, durable in the store, and the nodes they make inactive."""

    def __init__(self, audit: AuditLog, clock_ms: Callable[[], int],
                 peers: Mapping[str, Peer]) -> None:
        self.audit = audit
        self.clock_ms = clock_ms
        #: The hub's live connections by node (read only: a suspended node's is closed).
        self._peers = peers
        #: ``suspended`` or ``revoked``, by node (durable).
        self.statuses: dict[str, str] = {}
        #: Nodes no copy may go to or come from now: those of ``statuses``.
        self.inactive: set[str] = set()

    def restore(self, statuses: Mapping[str, str]) -> None:
        """The statuses the store holds (at start)."""
        self.statuses = dict(statuses)
        self.inactive |= set(self.statuses)

    def change(self, node: str, status: str, *, operator: str) -> asyncio.Future[int]:
        """Suspend (``suspended``), resume (``active``) or revoke (``revoked``) ``node``; see
        the module docstring. The future gives the ``admin`` entry's index once durable."""
        entry = AdminEntry(ts=self.clock_ms(), operator=operator, action=ACTIONS[status],
                           target=node, outcome="ok")
        future = self.audit.append(entry, node_status=[(node, status)])
        if status == "active":
            previous = self.statuses.pop(node, "suspended")
            self.inactive.discard(node)
            future.add_done_callback(functools.partial(self._undo_resume, node=node,
                                                       previous=previous))
        else:
            self.inactive.add(node)
            self.statuses[node] = status
            self._close(node, f"{status} by an operator")
        log.warning("node_status_changed", node=node, status=status, operator=operator)
        return future

    def _undo_resume(self, done: asyncio.Future[int], *, node: str, previous: str) -> None:
        if not done.cancelled() and done.exception() is None:
            return
        self.inactive.add(node)
        self.statuses[node] = previous
        self._close(node, "the resume was not recorded")
        log.error("node_resume_undone", node=node, reason="its admin entry is not durable")

    def _close(self, node: str, reason: str) -> None:
        peer = self._peers.get(node)
        if peer is not None:
            peer.close("node_inactive", reason)
