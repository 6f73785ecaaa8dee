"""When the audit log's writer commits and signs: the group-commit policy.

Pure settings and one rule (:meth:`CommitPolicy.wait_to_fill`); the writer that applies them is
:class:`broker.audit.log.AuditLog`. The reasons behind the defaults are measured in
docs/performance.md ("Latency work") and docs/decisions.md ("Commits on the event loop").
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CommitPolicy:
    """How the writer groups entries and how often it signs a checkpoint."""

    max_batch: int = 1024
    max_delay_s: float = 0.002
    checkpoint_interval_s: float = 1.0
    #: The writer waits ``max_delay_s`` for a batch to fill only after a commit that merged at
    #: least this many requests that were not lazy (the log is busy). Requests, not entries:
    #: the acks of one frame are one request of up to 16 entries (and lazy) and say nothing
    #: about how busy the log is. Under light load each request is committed at once: waiting
    #: would add the delay to every receipt and delivery and save little.
    busy_requests: int = 16
    #: A lazy request (one nobody waits for: the ``deliver`` entries of an ack) joins the next
    #: commit, or is committed on its own after at most this long. At light load this halves
    #: the commits, and a receipt no longer waits behind a commit of acks.
    lazy_delay_s: float = 0.005
    #: A batch of at least this many entries is committed in a worker thread, so that the
    #: loop goes on reading and delivering during the SQLite work and the fsync (which release
    #: the GIL); a smaller one on the loop's thread, where the hand-off to a thread (a wake-up
    #: and GIL re-takes) would cost more than the commit. Small batches are light load, where
    #: latency counts; large ones are a drain or a burst, where throughput does.
    thread_min_entries: int = 64
    #: A commit running longer than this is a stalled disk: the broker reports itself not
    #: ready (``/readyz``) until it returns. With a writer process the event loop goes on
    #: meanwhile, so the admin API can say so.
    stall_s: float = 5.0

    def wait_to_fill(self, queued: int, last_requests: int) -> bool:
        """Whether the writer, holding ``queued`` requests, waits for more before committing,
        given that the previous commit merged ``last_requests`` requests that were not lazy."""
        return 0 < queued < self.max_batch and last_requests >= self.busy_requests


DEFAULT_COMMIT = CommitPolicy()
