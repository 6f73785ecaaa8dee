"""The broker process exempts its start-up heap from full garbage-collection passes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from broker.server import settle_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # the rest of the test session keeps an ordinary heap


def test_settle_heap_collects_garbage_then_freezes_the_survivors(unfrozen: None) -> None:
    kept = [_Node() for _ in range(100)]
    garbage = _Node()
    garbage.other = _Node()
    garbage.other.other = garbage  # a cycle only the collector can free
    dead = weakref.ref(garbage)
    del garbage
    gc.disable()  # no automatic pass may do settle_heap's work for it
    try:
        assert dead() is not None
        settle_heap()
        assert dead() is None  # garbage is collected, not frozen
        frozen = gc.get_freeze_count()
        assert frozen >= len(kept)  # the survivors are out of the collector's full passes
        assert all(gc.is_tracked(node) for node in kept)
    finally:
        gc.enable()
