"""A bounded cache of release decisions, for the broker's hot path (pure: no clock, no I/O).

Key: (SHA-256 of the canonical label bytes, sender node, recipient node, topic, bundle hash, and
for each node whether it is suspended and whether the certificate passed is the bundle's). The
bundle hash pins every certificate, scheme and agreement, so the only remaining input is time.
A decision cannot change between two consecutive *validity boundaries* (the ``not_before`` and
``not_after`` of the two certificates and of every agreement that could apply), so each entry
records the interval ``[valid_from, valid_until)`` around the ``now`` it was computed at and is
used only inside it. That is exact, unlike a coarse time bucket, which would let a decision
outlive an agreement's expiry by up to a bucket.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Set

from policies.bundle import Bundle
from policies.decide import Decision, decide
from policies.model import Label, NodeCert

#: label digest, sender, recipient, topic, bundle hash, then per node: suspended, bundle's own cert.
CacheKey = tuple[bytes, str, str, str, bytes, bool, bool, bool, bool]


def label_digest(label: Label) -> bytes:
    """SHA-256 of the label's canonical msgpack encoding."""
    return label.digest


def validity_interval(sender: NodeCert, recipient: NodeCert, now_ms: int,
                      bundle: Bundle) -> tuple[int | None, int | None]:
    """The boundaries around ``now_ms`` between which a decision for this pair cannot change:
    the latest boundary at or before ``now_ms`` and the earliest after it (``None``: none)."""
    bounds = {sender.not_before, sender.not_after, recipient.not_before, recipient.not_after}
    for agreement, _tier in bundle.candidates(sender.nation, recipient.nation):
        bounds.update((agreement.not_before, agreement.not_after))
    before = [b for b in bounds if b <= now_ms]
    after = [b for b in bounds if b > now_ms]
    return (max(before) if before else None, min(after) if after else None)


def _is_bundle_cert(cert: NodeCert, bundle: Bundle) -> bool:
    """Whether ``cert`` is the bundle's certificate for its node (rule 6 depends on it)."""
    own = bundle.nodes.get(cert.node)
    return own is cert or own == cert


@dataclasses.dataclass(frozen=True)
class _Entry:
    decision: Decision
    valid_from: int | None
    valid_until: int | None

    def covers(self, now_ms: int) -> bool:
        # Both ends are checked so that a clock stepping backwards cannot reuse an entry.
        return ((self.valid_from is None or self.valid_from <= now_ms)
                and (self.valid_until is None or now_ms < self.valid_until))


class DecisionCache:
    """LRU cache in front of :func:`policies.decide.decide`, bounded to ``max_entries``."""

    def __init__(self, max_entries: int = 65536) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be ≥ 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (e.g. on a bundle reload, to free memory at once)."""
        self._entries.clear()

    def decide(self, label: Label, sender: NodeCert, recipient: NodeCert, topic: str,
               now_ms: int, bundle: Bundle, *,
               inactive_nodes: Set[str] = frozenset()) -> Decision:
        """Same contract and result as :func:`policies.decide.decide`, cached."""
        key: CacheKey = (label_digest(label), sender.node, recipient.node, topic, bundle.hash,
                         sender.node in inactive_nodes, recipient.node in inactive_nodes,
                         _is_bundle_cert(sender, bundle), _is_bundle_cert(recipient, bundle))
        entry = self._entries.get(key)
        if entry is not None and entry.covers(now_ms):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.decision
        self.misses += 1
        decision = decide(label, sender, recipient, topic, now_ms, bundle,
                          inactive_nodes=inactive_nodes)
        valid_from, valid_until = validity_interval(sender, recipient, now_ms, bundle)
        self._entries[key] = _Entry(decision, valid_from, valid_until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return decision
