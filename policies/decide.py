"""The release decision (DESIGN §5): may this labelled message go to this node, now?

``decide`` is pure: no I/O and no clock read (``now_ms`` is a parameter). A deny is a returned
:class:`Decision` carrying *every* failed reason code, never an exception. Fail closed: anything
unknown or missing denies.

Interim body (foundation issue): rule 3 (audience, with communities expanded) and rule 6 (both
certificates valid at ``now``, neither node suspended). The policy-engine issue adds schemes,
equivalences, agreements, tiers and accreditation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Set

from policies.bundle import Bundle
from policies.model import Label, NodeCert

INVALID_LABEL = "invalid_label"
UNMAPPABLE = "unmappable"
NOT_IN_AUDIENCE = "not_in_audience"
NO_AGREEMENT = "no_agreement"
AGREEMENT_INACTIVE = "agreement_inactive"
ABOVE_CEILING = "above_ceiling"
CATEGORY_NOT_COVERED = "category_not_covered"
TOPIC_NOT_COVERED = "topic_not_covered"
RECIPIENT_NOT_ACCREDITED = "recipient_not_accredited"
NODE_INACTIVE = "node_inactive"
#: Added by the broker after a PERMIT when the envelope holds no sealed key for the recipient.
NO_KEY_FOR_RECIPIENT = "no_key_for_recipient"

REASON_CODES = (
    INVALID_LABEL, UNMAPPABLE, NOT_IN_AUDIENCE, NO_AGREEMENT, AGREEMENT_INACTIVE, ABOVE_CEILING,
    CATEGORY_NOT_COVERED, TOPIC_NOT_COVERED, RECIPIENT_NOT_ACCREDITED, NODE_INACTIVE,
    NO_KEY_FOR_RECIPIENT,
)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome for one recipient: ``permit``, the failed ``reasons`` (sorted, unique) when
    denied, and ``via`` (``dsa_id@version/tier``) naming what permitted it."""

    permit: bool
    reasons: tuple[str, ...] = ()
    via: str | None = None

    @classmethod
    def deny(cls, *reasons: str) -> Decision:
        """A DENY with the given reasons (deduplicated, sorted)."""
        return cls(permit=False, reasons=tuple(sorted(set(reasons))))

    def with_reason(self, reason: str) -> Decision:
        """This decision with one more failed reason (so a PERMIT becomes a DENY)."""
        return Decision.deny(*self.reasons, reason)

    def status(self) -> str:
        """``permit`` or ``deny:<reason>[,<reason>…]`` as in ``routes`` frames."""
        return "permit" if self.permit else "deny:" + ",".join(self.reasons)


def decide(
    label: Label,
    sender: NodeCert,
    recipient: NodeCert,
    topic: str,
    now_ms: int,
    bundle: Bundle,
    *,
    inactive_nodes: Set[str] = frozenset(),
) -> Decision:
    """Decide whether ``label`` from ``sender`` may be released to ``recipient`` at ``now_ms``."""
    reasons: list[str] = []
    origin, destination = sender.nation, recipient.nation
    if label.orig != origin or origin not in bundle.trust_root.nations:
        reasons.append(INVALID_LABEL)
    if destination != origin and destination not in bundle.trust_root.expand_audience(label.rel):
        reasons.append(NOT_IN_AUDIENCE)
    for cert in (sender, recipient):
        if not cert.is_valid_at(now_ms) or cert.node in inactive_nodes:
            reasons.append(NODE_INACTIVE)
    if reasons:
        return Decision.deny(*reasons)
    return Decision(permit=True)
