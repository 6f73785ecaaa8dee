"""The release decision (DESIGN §5): may this labelled message go to this node, now?

``decide`` is pure: no I/O and no clock read (``now_ms`` is a parameter). A deny is a returned
:class:`Decision` carrying *every* failed reason code, never an exception. Fail closed: anything
unknown or missing denies.

Rules, for a message from nation O (the sender's) to node N of nation R:

1. the label is valid in its scheme, O's or the common one — ``invalid_label``;
2. it maps to the common scheme through O's equivalence — ``unmappable``;
3. R = O, or R is in the audience (``rel``, communities expanded) — ``not_in_audience``;
4. for R ≠ O, some agreement with O as party, active now, has R in a tier that covers the label
   (ceiling, category allow-list, topics) — ``no_agreement``, ``agreement_inactive``,
   ``above_ceiling``, ``category_not_covered``, ``topic_not_covered``;
5. N's accreditation, mapped to the common scheme, dominates the label —
   ``recipient_not_accredited``;
6. both certificates are the bundle's, valid now, and neither node is suspended —
   ``node_inactive``.

Rules 4 and 5 compare common-scheme values, so they are only evaluated when rules 1 and 2 hold;
a label that is invalid or unmappable is reported as such, not as a guess at the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Set

from broker.router import topic_matches
from policies.bundle import Bundle
from policies.model import (
    INFORMATIVE,
    PERMISSIVE,
    RESTRICTIVE,
    Accreditation,
    Label,
    NodeCert,
    Scheme,
    Tier,
)

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


@dataclasses.dataclass(frozen=True)
class CommonLabel:
    """A label translated into the common scheme: its level and its restrictive and permissive
    values per common tag (informative tags never decide, so they are not carried)."""

    level: str
    cats: Mapping[str, frozenset[str]]


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
    """Decide whether ``label`` from ``sender`` may be released to ``recipient`` at ``now_ms``.

    Returns a PERMIT naming the agreement and tier that allowed it (``via``; ``None`` within one
    nation), or a DENY with every failed reason code.
    """
    reasons: set[str] = set()
    origin, destination = sender.nation, recipient.nation
    common = bundle.common_scheme
    mapped = _rules_1_and_2(label, origin, bundle, reasons)
    if destination != origin and destination not in bundle.trust_root.expand_audience(label.rel):
        reasons.add(NOT_IN_AUDIENCE)
    via: str | None = None
    if mapped is not None and common is not None:
        if destination != origin:
            via = _rule_4(mapped, common, origin, destination, topic, now_ms, bundle, reasons)
        if not _rule_5(mapped, common, recipient, bundle):
            reasons.add(RECIPIENT_NOT_ACCREDITED)
    for cert in (sender, recipient):
        if not node_is_active(cert, now_ms, bundle, inactive_nodes):
            reasons.add(NODE_INACTIVE)
    if reasons:
        return Decision.deny(*reasons)
    return Decision(permit=True, via=via)


def node_is_active(cert: NodeCert, now_ms: int, bundle: Bundle, inactive: Set[str]) -> bool:
    """Rule 6 for one node: the certificate is the bundle's own, valid now, not revoked by its
    nation, not suspended or revoked by an operator."""
    # A certificate the bundle does not hold (a stale copy, another bundle's) proves nothing.
    return (bundle.nodes.get(cert.node) == cert and cert.is_valid_at(now_ms)
            and cert.node not in inactive and bundle.revocation_of(cert) is None)


# --- rules 1 and 2: the label and its translation ----------------------------------------------


def _rules_1_and_2(label: Label, origin: str, bundle: Bundle,
                   reasons: set[str]) -> CommonLabel | None:
    """Check the label is valid in its scheme and translate it; record the failure, if any."""
    root = bundle.trust_root
    scheme = bundle.schemes.get(label.policy)
    common = bundle.common_scheme
    if (label.orig != origin or origin not in root.nations
            or label.policy not in (origin, root.common_scheme)
            or scheme is None or common is None or not label_is_valid(label, scheme)):
        reasons.add(INVALID_LABEL)
        return None
    mapped = map_label(label, scheme, common)
    if mapped is None:
        reasons.add(UNMAPPABLE)
    return mapped


def label_is_valid(label: Label, scheme: Scheme) -> bool:
    """Rule 1: a known level, known tags and known values of ``scheme``."""
    if scheme.rank(label.cls) is None:
        return False
    for tag, values in label.cats.items():
        spec = scheme.tags.get(tag)
        if spec is None or any(v not in spec.values for v in values):
            return False
    return True


def map_label(label: Label, scheme: Scheme, common: Scheme) -> CommonLabel | None:
    """Rule 2: the label in common terms, or ``None`` when any level, tag or value is unmapped.

    Assumes :func:`label_is_valid`. Informative tags are dropped: they never decide release.
    """
    level = scheme.common_level(label.cls)
    if level is None:
        return None
    cats: dict[str, set[str]] = {}
    for tag, values in label.cats.items():
        if scheme.tags[tag].type == INFORMATIVE:
            continue
        target = scheme.common_tag(tag)
        if target is None:
            return None
        bucket = cats.setdefault(target, set())
        for value in values:
            translated = scheme.common_values(tag, value)
            if translated is None:
                return None
            bucket.update(translated)
    return CommonLabel(level=level, cats={t: frozenset(v) for t, v in cats.items()})


# --- rule 4: agreements ------------------------------------------------------------------------


def _rule_4(mapped: CommonLabel, common: Scheme, origin: str, destination: str, topic: str,
            now_ms: int, bundle: Bundle, reasons: set[str]) -> str | None:
    """The first (agreement, tier) that permits, as ``ID@VERSION/TIER``; else record why not.

    When nothing permits, the reasons are those of the closest candidates: the union of the
    tier failures among *active* agreements that put R in a tier; if there are none, the
    inactive ones (``agreement_inactive`` plus their tier failures); if there are none either,
    ``no_agreement``.
    """
    active: set[str] = set()
    inactive: set[str] = set()
    seen_active = seen_inactive = False
    for agreement, tier in bundle.candidates(origin, destination):
        failures = tier_failures(tier, mapped, common, topic)
        if agreement.is_active_at(now_ms):
            if not failures:
                return f"{agreement.ref}/{tier.name}"
            seen_active = True
            active |= failures
        else:
            seen_inactive = True
            inactive |= failures
    if seen_active:
        reasons |= active
    elif seen_inactive:
        reasons |= {AGREEMENT_INACTIVE, *inactive}
    else:
        reasons.add(NO_AGREEMENT)
    return None


def tier_failures(tier: Tier, mapped: CommonLabel, common: Scheme, topic: str) -> set[str]:
    """What keeps ``tier`` from covering the (common) label on ``topic``; empty = covered."""
    failures: set[str] = set()
    level, ceiling = common.rank(mapped.level), common.rank(tier.ceiling)
    if level is None or ceiling is None or level > ceiling:
        failures.add(ABOVE_CEILING)
    if tier.categories is not None:
        for tag, allowed in tier.categories.items():
            if not mapped.cats.get(tag, frozenset()) <= set(allowed):
                failures.add(CATEGORY_NOT_COVERED)
    if tier.topics is not None and not any(topic_matches(p, topic) for p in tier.topics):
        failures.add(TOPIC_NOT_COVERED)
    return failures


# --- rule 5: accreditation ---------------------------------------------------------------------


def _rule_5(mapped: CommonLabel, common: Scheme, recipient: NodeCert, bundle: Bundle) -> bool:
    scheme = bundle.schemes.get(recipient.nation)
    if scheme is None:
        return False
    held = map_accreditation(recipient.accreditation, scheme, common)
    if held is None:
        return False
    cats = {tag: tuple(sorted(values)) for tag, values in mapped.cats.items()}
    return accreditation_dominates(common, mapped.level, cats, held)


def map_accreditation(accreditation: Accreditation, scheme: Scheme,
                      common: Scheme) -> Accreditation | None:
    """An accreditation of ``scheme`` in common terms; ``None`` when its level is unmappable.

    A held value that does not map grants nothing (fail closed), it does not void the rest.
    """
    level = scheme.common_level(accreditation.max)
    if level is None:
        return None
    cats: dict[str, set[str]] = {}
    for tag, values in accreditation.cats.items():
        target = scheme.common_tag(tag)
        if target is None:
            continue
        bucket = cats.setdefault(target, set())
        for value in values:
            bucket.update(scheme.common_values(tag, value) or ())
    return Accreditation(max=level, cats={t: tuple(sorted(v)) for t, v in cats.items()})


def accreditation_dominates(scheme: Scheme, level: str, cats: Mapping[str, tuple[str, ...]],
                            accreditation: Accreditation) -> bool:
    """Rule 5 within one scheme: may a holder of ``accreditation`` see a label ``level``/``cats``?

    Level at least the label's; every restrictive value held; for each permissive tag on the
    label at least one of its values held (an empty permissive tag is never satisfied);
    informative tags ignored. Anything the scheme does not know denies.
    """
    wanted, held_rank = scheme.rank(level), scheme.rank(accreditation.max)
    if wanted is None or held_rank is None or held_rank < wanted:
        return False
    for tag, values in cats.items():
        spec = scheme.tags.get(tag)
        if spec is None or any(v not in spec.values for v in values):
            return False
        held = set(accreditation.cats.get(tag, ()))
        if spec.type == RESTRICTIVE and not set(values) <= held:
            return False
        if spec.type == PERMISSIVE and not set(values) & held:
            return False
    return True
