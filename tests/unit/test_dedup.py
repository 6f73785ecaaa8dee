"""A gateway's seen message ids survive restarts and crashes (clients.dedup), and the reconnection
backoff stays within its bounds (clients.link.Backoff)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from clients.dedup import ID_BYTES, SEEN_FILE, SeenIds, StateReadFailed, StateWriteFailed
from clients.link import Backoff


def ids(n: int, start: int = 0) -> list[bytes]:
    return [i.to_bytes(ID_BYTES, "big") for i in range(start, start + n)]


def test_ids_persist_across_instances_in_order(tmp_path: Path) -> None:
    first = SeenIds(tmp_path, capacity=10)
    first.add_durably(ids(3))
    first.add_durably(ids(2, start=3))
    again = SeenIds(tmp_path, capacity=10)
    assert list(again) == ids(5)
    assert ids(1, start=4)[0] in again and ids(1, start=5)[0] not in again


def test_only_the_last_capacity_ids_are_kept_on_load(tmp_path: Path) -> None:
    SeenIds(tmp_path, capacity=100).add_durably(ids(8))
    assert list(SeenIds(tmp_path, capacity=3)) == ids(3, start=5)


def test_an_id_added_again_becomes_the_most_recent(tmp_path: Path) -> None:
    a, b, c, d = ids(4)
    seen = SeenIds(tmp_path, capacity=3)
    seen.add_durably([a, b, c])
    seen.add_durably([a])  # again: b is now the oldest
    seen.add_durably([d])
    assert list(seen) == [c, a, d]
    assert list(SeenIds(tmp_path, capacity=3)) == list(seen)


def test_torn_last_record_is_ignored_and_cut_off(tmp_path: Path) -> None:
    SeenIds(tmp_path, capacity=10).add_durably(ids(3))
    path = tmp_path / SEEN_FILE
    with open(path, "ab") as out:
        out.write(b"\xff" * (ID_BYTES - 5))  # a crash in the middle of an append
    seen = SeenIds(tmp_path, capacity=10)
    assert list(seen) == ids(3)
    assert path.stat().st_size == 3 * ID_BYTES
    seen.add_durably(ids(1, start=3))  # appends stay aligned after the cut
    assert list(SeenIds(tmp_path, capacity=10)) == ids(4)


def test_file_is_compacted_to_the_last_capacity_ids_when_it_doubles(tmp_path: Path) -> None:
    seen = SeenIds(tmp_path, capacity=4)
    path = tmp_path / SEEN_FILE
    for i in range(8):
        seen.add_durably(ids(1, start=i))
    assert path.stat().st_size == 8 * ID_BYTES  # 2 × capacity: not yet
    seen.add_durably(ids(1, start=8))
    assert path.stat().st_size == 4 * ID_BYTES
    assert list(seen) == ids(4, start=5)
    assert list(SeenIds(tmp_path, capacity=4)) == ids(4, start=5)
    assert not (tmp_path / (SEEN_FILE + ".tmp")).exists()


def test_memory_only_mode_writes_nothing(tmp_path: Path) -> None:
    seen = SeenIds(None, capacity=2)
    seen.add_durably(ids(3))
    assert list(seen) == ids(2, start=1) and ids(1)[0] not in seen
    assert list(tmp_path.iterdir()) == []


def test_failed_append_raises_and_remembers_nothing(tmp_path: Path) -> None:
    seen = SeenIds(tmp_path, capacity=10)
    seen.add_durably(ids(1))
    path = tmp_path / SEEN_FILE
    path.unlink()
    path.mkdir()  # something that cannot be written where the file should be
    with pytest.raises(StateWriteFailed) as caught:
        seen.add_durably(ids(1, start=1))
    assert caught.value.code == "state_write_failed"
    assert ids(1, start=1)[0] not in seen  # not durable: must not count as seen


def test_failed_compaction_raises(tmp_path: Path) -> None:
    seen = SeenIds(tmp_path, capacity=1)
    seen.add_durably(ids(2))
    (tmp_path / (SEEN_FILE + ".tmp")).mkdir()  # the atomic rewrite cannot create its temp file
    with pytest.raises(StateWriteFailed):
        seen.add_durably(ids(1, start=2))


def test_unreadable_state_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / SEEN_FILE).mkdir()
    with pytest.raises(StateReadFailed) as caught:
        SeenIds(tmp_path)
    assert caught.value.code == "state_read_failed"


def test_state_directory_that_cannot_be_created_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StateWriteFailed):
        SeenIds(tmp_path / "file" / "state")


def test_ids_of_the_wrong_length_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SeenIds(tmp_path).add_durably([b"short"])


# --- Backoff --------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt, ceiling", [(0, 0.1), (1, 0.2), (3, 0.8), (7, 10.0),
                                              (10_000, 10.0)])
def test_backoff_ceiling_grows_exponentially_up_to_the_maximum(attempt: int,
                                                               ceiling: float) -> None:
    assert Backoff().ceiling(attempt) == pytest.approx(ceiling)


def test_backoff_delays_are_jittered_within_zero_and_the_ceiling() -> None:
    backoff = Backoff(initial=0.5, factor=3, maximum=4)
    rng = random.Random(7)
    delays = list(itertools.islice(backoff.delays(rng), 200))
    bounds = [backoff.ceiling(i) for i in range(200)]
    assert all(0 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule
    assert max(delays[10:]) > backoff.maximum / 2  # the late ones use the whole range


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 2, "maximum": 1},
                                    {"factor": 0.5}])
def test_backoff_refuses_settings_that_do_not_back_off(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
