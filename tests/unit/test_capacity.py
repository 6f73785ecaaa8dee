"""Store-wide limits (broker/capacity.py): size on disk, free space, measured sparingly."""

from __future__ import annotations

from typing import Any

from broker.capacity import StoreCapacity, StoreLimits
from broker.errors import StorageError


class _Store:
    def __init__(self, used: int, free: int) -> None:
        self.used, self.free, self.measured = used, free, 0

    def disk_bytes(self) -> int:
        self.measured += 1
        return self.used

    def free_bytes(self) -> int:
        if self.free < 0:
            raise StorageError("statvfs failed")
        return self.free


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _capacity(store: _Store, limits: StoreLimits, clock: _Clock) -> StoreCapacity:
    fake: Any = store
    return StoreCapacity(fake, limits, every_s=1.0, monotonic=clock)


def test_room_when_under_both_limits() -> None:
    assert _capacity(_Store(10, 1000), StoreLimits(100, 10), _Clock()).check() is None


def test_full_store_names_the_limit() -> None:
    reason = _capacity(_Store(100, 1000), StoreLimits(100, 10), _Clock()).check()
    assert reason is not None and "max_store_bytes" in reason and "100" in reason


def test_full_disk_names_the_limit() -> None:
    reason = _capacity(_Store(10, 9), StoreLimits(100, 10), _Clock()).check()
    assert reason is not None and "min_free_disk_bytes" in reason


def test_zero_means_no_limit() -> None:
    assert _capacity(_Store(1 << 40, 0), StoreLimits(0, 0), _Clock()).check() is None


def test_unmeasurable_store_fails_closed() -> None:
    reason = _capacity(_Store(10, -1), StoreLimits(100, 10), _Clock()).check()
    assert reason is not None and "cannot measure" in reason


def test_measures_at_most_once_per_interval() -> None:
    store, clock = _Store(10, 1000), _Clock()
    capacity = _capacity(store, StoreLimits(100, 10), clock)
    assert capacity.check() is None
    store.used = 500  # grows, but the answer is reused until the interval passed
    clock.now = 0.5
    assert capacity.check() is None and store.measured == 1
    clock.now = 1.0
    assert capacity.check() is not None and store.measured == 2
