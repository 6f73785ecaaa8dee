"""Topics, subscription patterns and the candidate recipients of a message (pure).

A topic is dot-separated segments of ``[a-z0-9_-]``, at most 255 bytes. A pattern is a topic
whose segments may also be ``*`` (exactly one segment) or, as the last segment only, ``>`` (one
or more remaining segments, as in NATS).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Set

from broker.errors import ProtocolError

MAX_TOPIC_BYTES = 255
# fullmatch, not "$": "$" would also accept a segment followed by a trailing newline.
_SEGMENT = re.compile(r"[a-z0-9_-]+")


def validate_topic(topic: str) -> str:
    """Return ``topic`` or raise :class:`ProtocolError` ``invalid_topic``."""
    _check_length(topic)
    for segment in topic.split("."):
        if not _SEGMENT.fullmatch(segment):
            raise ProtocolError(f"topic segment {segment!r} is not [a-z0-9_-]+",
                                code="invalid_topic")
    return topic


def validate_pattern(pattern: str) -> str:
    """Return ``pattern`` or raise :class:`ProtocolError` ``invalid_topic``."""
    _check_length(pattern)
    segments = pattern.split(".")
    for position, segment in enumerate(segments):
        if segment == ">" and position == len(segments) - 1:
            continue
        if segment == "*" or _SEGMENT.fullmatch(segment):
            continue
        raise ProtocolError(f"pattern segment {segment!r} is not valid", code="invalid_topic")
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """True when ``topic`` matches ``pattern`` (both assumed valid)."""
    want = pattern.split(".")
    have = topic.split(".")
    for position, segment in enumerate(want):
        if segment == ">":
            return len(have) > position
        if position >= len(have) or (segment != "*" and segment != have[position]):
            return False
    return len(have) == len(want)


def candidate_recipients(
    sender: str,
    topic: str,
    to: Iterable[str],
    subscriptions: Mapping[str, Set[str]],
) -> list[str]:
    """Nodes a message is considered for: subscribers of a matching pattern plus explicit ``to``.

    The sender itself is never a candidate. The result is sorted (deterministic receipts).
    """
    return recipients_of(sender, subscribers(topic, subscriptions), to)


def subscribers(topic: str, subscriptions: Mapping[str, Set[str]]) -> frozenset[str]:
    """The nodes with a subscription pattern matching ``topic`` (to memoise per topic)."""
    return frozenset(node for node, patterns in subscriptions.items()
                     if any(topic_matches(p, topic) for p in patterns))


def recipients_of(sender: str, subscribed: Set[str], to: Iterable[str]) -> list[str]:
    """:func:`candidate_recipients` from the topic's :func:`subscribers`."""
    out = set(subscribed)
    out.update(to)
    out.discard(sender)
    return sorted(out)


def _check_length(text: str) -> None:
    if not text or len(text.encode()) > MAX_TOPIC_BYTES:
        raise ProtocolError(f"topic must be 1..{MAX_TOPIC_BYTES} bytes", code="invalid_topic")
