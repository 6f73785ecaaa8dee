"""Topics, subscription patterns and candidate recipients (broker/router.py)."""

from __future__ import annotations

import pytest

from broker.errors import ProtocolError
from broker.router import (
    MAX_TOPIC_BYTES,
    candidate_recipients,
    topic_matches,
    validate_pattern,
    validate_topic,
)

TOPIC_255 = ".".join(["abcd"] * 50) + ".abcde"  # 50*4 + 49 dots + 6 = 255 bytes
TOPIC_256 = TOPIC_255 + "f"

VALID_TOPICS = [
    "a",
    "maritime",
    "maritime.tracks",
    "maritime.north-atlantic.tracks_v2",
    "0.1.2",
    "-._",
    "a" * 255,
    TOPIC_255,
]

INVALID_TOPICS = [
    "",
    "a" * 256,
    TOPIC_256,
    "Maritime",
    "maritime.Tracks",
    "MARITIME",
    ".",
    ".maritime",
    "maritime.",
    "maritime..tracks",
    "maritime.*",
    "maritime.>",
    "*",
    ">",
    "maritime tracks",
    "maritime/tracks",
    "maritime.tracks!",
    "maritimé",
    "ｍaritime",  # fullwidth m
    "maritime.\u0131",  # dotless i: a lowercase letter, but not [a-z]
    "maritime\t",
    "maritime\x00",
]


def test_topic_limit_is_255_bytes() -> None:
    assert MAX_TOPIC_BYTES == 255
    assert len(TOPIC_255.encode()) == 255
    assert len(TOPIC_256.encode()) == 256


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topic_is_accepted(topic: str) -> None:
    assert validate_topic(topic) == topic
    # every valid topic is also a valid (literal) pattern
    assert validate_pattern(topic) == topic
    assert topic_matches(topic, topic)


@pytest.mark.parametrize("topic", INVALID_TOPICS, ids=repr)
def test_invalid_topic_is_rejected(topic: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_topic(topic)
    assert info.value.code == "invalid_topic"


def test_length_is_counted_in_utf8_bytes_not_characters() -> None:
    # 128 two-byte characters are 256 bytes: too long before the charset is even considered.
    with pytest.raises(ProtocolError) as info:
        validate_topic("é" * 128)
    assert info.value.code == "invalid_topic"
    assert "bytes" in info.value.reason


VALID_PATTERNS = [
    "maritime.tracks",
    "*",
    ">",
    "maritime.*",
    "maritime.>",
    "*.tracks",
    "*.*.>",
    "maritime.*.tracks.>",
    "a" * 255,
    "*." * 127 + ">",  # 255 bytes
]

INVALID_PATTERNS = [
    "",
    "a" * 256,
    "*." * 127 + "ab",  # 256 bytes
    ">.tracks",
    "maritime.>.tracks",
    ">.>",
    "maritime.**",
    "maritime.*x",
    "maritime.x*",
    "maritime.>>",
    "maritime.x>",
    "maritime..>",
    "maritime.",
    ".>",
    "Maritime.>",
    "maritime.#",
    "maritime.+",
    "maritime.*\n",
    "maritime.>\n",
]


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_pattern_is_accepted(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", INVALID_PATTERNS, ids=repr)
def test_invalid_pattern_is_rejected(pattern: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_pattern(pattern)
    assert info.value.code == "invalid_topic"


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        # exact
        ("maritime.tracks", "maritime.tracks", True),
        ("maritime.tracks", "maritime.track", False),
        ("maritime.tracks", "maritime", False),
        ("maritime", "maritime.tracks", False),
        ("maritime.tracks", "maritime.tracks.extra", False),
        # `*` is exactly one segment
        ("maritime.*", "maritime.tracks", True),
        ("maritime.*", "maritime", False),
        ("maritime.*", "maritime.tracks.north", False),
        ("*", "maritime", True),
        ("*", "maritime.tracks", False),
        ("*.tracks", "maritime.tracks", True),
        ("*.tracks", "air.tracks", True),
        ("*.tracks", "maritime.contacts", False),
        ("maritime.*.tracks", "maritime.north.tracks", True),
        ("maritime.*.tracks", "maritime.tracks", False),
        ("*.*", "a.b", True),
        ("*.*", "a", False),
        # `>` is one or more remaining segments
        ("maritime.>", "maritime.tracks", True),
        ("maritime.>", "maritime.tracks.north.atlantic", True),
        ("maritime.>", "maritime", False),
        ("maritime.>", "air.tracks", False),
        ("maritime.>", "maritimes.tracks", False),
        (">", "maritime", True),
        (">", "maritime.tracks.north", True),
        ("*.>", "maritime", False),
        ("*.>", "maritime.tracks", True),
        ("maritime.*.>", "maritime.tracks", False),
        ("maritime.*.>", "maritime.tracks.north", True),
        # segments are compared whole, never as prefixes
        ("mari.>", "maritime.tracks", False),
        ("maritime.track", "maritime.tracks", False),
    ],
)
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    assert topic_matches(pattern, topic) is expected


SUBS = {
    "GBR-GW1": {"maritime.>"},
    "USA-GW1": {"maritime.tracks"},
    "FRA-GW1": {"air.*"},
    "POL-GW1": set(),
    "CAN-GW1": {"air.tracks", "*.tracks"},
}


@pytest.mark.parametrize(
    ("sender", "topic", "to", "expected"),
    [
        ("GBR-GW1", "maritime.tracks", [], ["CAN-GW1", "USA-GW1"]),
        ("USA-GW1", "maritime.tracks", [], ["CAN-GW1", "GBR-GW1"]),
        ("USA-GW1", "maritime.contacts", [], ["GBR-GW1"]),
        ("GBR-GW1", "air.tracks", [], ["CAN-GW1", "FRA-GW1"]),
        ("GBR-GW1", "land.reports", [], []),
        ("GBR-GW1", "land.reports", ["POL-GW1"], ["POL-GW1"]),
        # explicit recipients are added even when not subscribed, and not duplicated
        ("GBR-GW1", "maritime.tracks", ["USA-GW1", "POL-GW1"], ["CAN-GW1", "POL-GW1", "USA-GW1"]),
        # a node not in the subscription table can be named
        ("GBR-GW1", "land.reports", ["NZL-GW1"], ["NZL-GW1"]),
        # the sender is never a candidate, even when it names itself
        ("GBR-GW1", "maritime.tracks", ["GBR-GW1"], ["CAN-GW1", "USA-GW1"]),
        ("POL-GW1", "land.reports", ["POL-GW1"], []),
    ],
)
def test_candidate_recipients(sender: str, topic: str, to: list[str], expected: list[str]) -> None:
    assert candidate_recipients(sender, topic, to, SUBS) == expected


def test_candidate_recipients_are_sorted_whatever_the_input_order() -> None:
    subs = {name: {">"} for name in ["d", "b", "a", "c"]}
    assert candidate_recipients("x", "t", ["f", "e"], subs) == ["a", "b", "c", "d", "e", "f"]


@pytest.mark.parametrize(
    "text", ["a\n", "maritime.tracks\n", "maritime\n.tracks", "maritime.\n"], ids=repr
)
def test_newline_after_a_segment_is_rejected_in_topics_and_patterns(text: str) -> None:
    # `$` in a Python regex also matches just before a final newline; a topic is [a-z0-9_-] only.
    for validate in (validate_topic, validate_pattern):
        with pytest.raises(ProtocolError) as info:
            validate(text)
        assert info.value.code == "invalid_topic"
