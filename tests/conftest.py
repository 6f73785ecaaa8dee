"""Shared fixtures: a throwaway coalition on disk, and a real broker on 127.0.0.1:0."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import settings

from broker.coalition import DAY_MS, Coalition, NodeSpec, build_coalition

NATIONS = ("FRA", "GBR", "USA")

# No per-example deadline anywhere: Hypothesis's default (200 ms) is a timing assertion, and
# on a loaded two-core machine an example of a fast test once took 223 ms (session 18). Speed
# is measured by `coalition bench`, never by a test.
settings.register_profile("coalition", deadline=None)
settings.load_profile("coalition")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def coalition(tmp_path: Path) -> Coalition:
    """USA, GBR, FRA; one node each, a second USA node, and a FRA node whose certificate expired."""
    now = now_ms()
    nodes = [
        NodeSpec("USA-GW1", "USA"), NodeSpec("USA-GW2", "USA"), NodeSpec("GBR-GW1", "GBR"),
        NodeSpec("FRA-GW1", "FRA"),
        NodeSpec("FRA-OLD", "FRA", not_before_ms=now - 30 * DAY_MS, not_after_ms=now - DAY_MS),
    ]
    return build_coalition(tmp_path, nations=NATIONS, nodes=nodes, now_ms=now,
                           communities={"NATO": NATIONS, "FVEY": ("GBR", "USA")})


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """A CLI run in-process (``broker.cli.main``) configures structlog for the process (level,
    renderer); put back what the test started with, so later tests see the default."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
