"""``broker.listener.ReadDeadline``: one timer for the reads of a connection's task.

Pinned down: a read still waiting at the deadline fails with ``TimeoutError``; ``move`` later
keeps a read alive, ``move`` earlier brings the timeout forward; a deadline that passes between
reads never cancels the task but fails the next read at once; a cancellation from elsewhere is
never swallowed; ``close`` leaves no timer behind; a converted timeout leaves no cancellation
pending. Every scenario runs in its own task (``ReadDeadline`` binds the task that creates it)
under a generous guard, so a hang is a failure, not a stuck suite; timing bounds are loose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from broker.listener import ReadDeadline

SHORT = 0.05  # a deadline "soon"
LONG = 5.0  # a deadline that must never be the one that fires
GUARD = 2.0  # a scenario still running after this long has hung


async def _never() -> None:
    """A read that never completes."""
    await asyncio.Event().wait()


async def _soon(delay: float = 0.0) -> None:
    """A read that completes after ``delay``."""
    await asyncio.sleep(delay)


async def _scenario(body: Callable[[], Coroutine[Any, Any, Any]], guard: float = GUARD) -> Any:
    """Run ``body`` in its own task; fail if it has not finished after ``guard`` seconds."""
    task: asyncio.Task[Any] = asyncio.create_task(body())
    done, _ = await asyncio.wait({task}, timeout=guard)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        pytest.fail(f"the scenario hung for {guard} s (no timeout fired)")
    if task.cancelled():  # e.g. a cancellation left pending after a timeout
        pytest.fail("the scenario's task was cancelled")
    return task.result()


def _now() -> float:
    return asyncio.get_running_loop().time()


# --- (a) a read waiting at the deadline --------------------------------------------------------


async def test_a_read_waiting_at_the_deadline_times_out() -> None:
    async def body() -> float:
        start = _now()
        reads = ReadDeadline(start + SHORT)
        try:
            with pytest.raises(TimeoutError), reads.reading():
                await _never()
            return _now() - start
        finally:
            reads.close()

    elapsed = await _scenario(body)
    assert SHORT * 0.8 <= elapsed < 1.0


async def test_reads_that_complete_in_time_are_untouched() -> None:
    async def body() -> int:
        reads = ReadDeadline(_now() + 0.5)
        try:
            for _ in range(20):
                with reads.reading():
                    await _soon()
            return 20
        finally:
            reads.close()

    assert await _scenario(body) == 20


# --- (b) move later -----------------------------------------------------------------------------


async def test_move_later_keeps_a_read_alive_then_times_out_at_the_new_deadline() -> None:
    async def body() -> tuple[float, float]:
        start = _now()
        reads = ReadDeadline(start + SHORT)
        try:
            # Arm the timer for the first deadline with one completed read.
            with reads.reading():
                await _soon()
            reads.move(start + 0.3)
            with pytest.raises(TimeoutError), reads.reading():
                await _never()
            return start, _now()
        finally:
            reads.close()

    start, end = await _scenario(body)
    # Alive past the first deadline (0.05 s), failed at the moved one (0.3 s), not much later.
    assert 0.25 <= end - start < 1.5


async def test_move_later_lets_a_slow_read_complete() -> None:
    async def body() -> str:
        start = _now()
        reads = ReadDeadline(start + SHORT)
        try:
            with reads.reading():
                await _soon()
            reads.move(start + 1.0)
            with reads.reading():
                await _soon(0.15)  # ends three times past the original deadline
            return "read"
        finally:
            reads.close()

    assert await _scenario(body) == "read"


# --- (c) move earlier ---------------------------------------------------------------------------


async def test_move_earlier_between_reads_fires_at_the_earlier_time() -> None:
    # The server's pattern: the task moves its own deadline before each read.
    async def body() -> float:
        start = _now()
        reads = ReadDeadline(start + LONG)
        try:
            with reads.reading():  # the timer is now armed for LONG
                await _soon()
            reads.move(_now() + SHORT)
            with pytest.raises(TimeoutError), reads.reading():
                await _never()
            return _now() - start
        finally:
            reads.close()

    elapsed = await _scenario(body)
    assert SHORT * 0.8 <= elapsed < 1.0


@pytest.mark.parametrize("moved_to", [SHORT, -1.0], ids=["soon", "already_past"])
async def test_move_earlier_during_a_read_fires_at_the_earlier_time(moved_to: float) -> None:
    # Regression test. This failed when first written: ReadDeadline.move() only *disarmed* the
    # timer when the deadline moved earlier (no re-arm; the timer was armed again only by the
    # next ``reading()``), so a deadline moved earlier while a read was waiting (here from a
    # callback 10 ms into the read: LONG=5 s moved to now+0.05 s) left no timer armed and the
    # read never timed out at all (checked with a 1 s original deadline: still waiting after
    # 3 s). The docstring promises "earlier: then the timer is re-armed". The server only moves
    # the deadline from the reading task between reads (the test above), which always worked.
    async def body() -> float:
        start = _now()
        reads = ReadDeadline(start + LONG)
        loop = asyncio.get_running_loop()
        try:
            loop.call_later(0.01, lambda: reads.move(loop.time() + moved_to))
            with pytest.raises(TimeoutError), reads.reading():
                await _never()
            return _now() - start
        finally:
            reads.close()

    elapsed = await _scenario(body, guard=1.0)  # LONG is 5 s: a pass means the new deadline
    assert elapsed < 1.0


# --- (d) a deadline passing outside a read ------------------------------------------------------


async def test_a_deadline_passing_between_reads_does_not_cancel_the_task() -> None:
    async def body() -> tuple[float, float]:
        reads = ReadDeadline(_now() + SHORT)
        try:
            with reads.reading():  # arm the timer
                await _soon()
            await asyncio.sleep(SHORT * 4)  # the deadline passes here: no cancellation
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
            before = _now()
            with pytest.raises(TimeoutError), reads.reading():
                raise AssertionError("the read must not start")  # pragma: no cover
            return before, _now()
        finally:
            reads.close()

    before, after = await _scenario(body)
    assert after - before < 0.01  # at once, not at some later timer


async def test_a_deadline_passing_before_the_first_read_fails_it_at_once() -> None:
    async def body() -> bool:
        reads = ReadDeadline(_now() + SHORT)
        try:
            await asyncio.sleep(SHORT * 3)
            with pytest.raises(TimeoutError), reads.reading():
                raise AssertionError("the read must not start")  # pragma: no cover
            return True
        finally:
            reads.close()

    assert await _scenario(body)


# --- (e) cancellation from elsewhere -------------------------------------------------------------


async def test_an_external_cancel_during_a_read_propagates() -> None:
    started = asyncio.Event()

    async def body() -> None:
        reads = ReadDeadline(_now() + LONG)
        try:
            with reads.reading():
                started.set()
                await _never()
        finally:
            reads.close()

    task = asyncio.create_task(body())
    await started.wait()
    task.cancel()
    await asyncio.wait({task}, timeout=GUARD)
    assert task.cancelled()


@pytest.mark.parametrize("order", ["external_first", "deadline_first"])
async def test_an_external_cancel_is_not_swallowed_when_the_deadline_also_passed(
        order: str) -> None:
    # The deadline has passed and the task is cancelled from elsewhere. "external_first": the
    # cancel is delivered before the timer's callback runs. "deadline_first": the timer's
    # callback cancels the task, then the external cancel lands in the same loop iteration,
    # before the task resumes. Either way the read ends in CancelledError, never TimeoutError.
    started = asyncio.Event()
    outcome: list[str] = []

    async def body() -> None:
        reads = ReadDeadline(_now() + SHORT)
        try:
            with reads.reading():
                started.set()
                await _never()
        except TimeoutError:  # pragma: no cover - the failure being guarded against
            outcome.append("timeout")
            raise
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        finally:
            reads.close()

    loop = asyncio.get_running_loop()
    task = asyncio.create_task(body())
    await started.wait()
    if order == "external_first":
        time.sleep(SHORT * 2)  # block the loop past the deadline: the timer is due
        task.cancel()  # before the timer's callback runs in the next iteration
    else:
        loop.call_at(loop.time() + SHORT * 1.5, task.cancel)  # due after the deadline
        time.sleep(SHORT * 3)  # both due in the same iteration, the deadline's first
    await asyncio.wait({task}, timeout=GUARD)
    assert task.done()
    assert outcome == ["cancelled"]
    assert task.cancelled()


# --- (f) close -----------------------------------------------------------------------------------


async def test_after_close_no_timer_fires() -> None:
    async def body() -> str:
        start = _now()
        reads = ReadDeadline(start + SHORT)
        try:
            with reads.reading():  # the timer is armed for SHORT
                await _soon()
            reads.close()
            await asyncio.sleep(SHORT * 4)  # past the deadline: nothing cancels the task
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
            reads.move(_now() + 0.5)
            with reads.reading():  # a read with the moved deadline works
                await _soon(0.02)
            return "read"
        finally:
            reads.close()

    assert await _scenario(body) == "read"


async def test_close_while_not_armed_is_harmless() -> None:
    async def body() -> bool:
        reads = ReadDeadline(_now() + SHORT)
        reads.close()
        reads.close()
        await asyncio.sleep(SHORT * 2)
        return True

    assert await _scenario(body)


# --- (g) nothing left pending after a timeout ----------------------------------------------------


async def test_a_converted_timeout_leaves_no_cancellation_pending() -> None:
    async def body() -> str:
        reads = ReadDeadline(_now() + SHORT)
        try:
            with pytest.raises(TimeoutError), reads.reading():
                await _never()
            task = asyncio.current_task()
            assert task is not None
            assert task.cancelling() == 0
            await asyncio.sleep(0)  # would raise CancelledError if a cancellation were pending
            await asyncio.sleep(SHORT)
            # And the deadline keeps working for the next reads.
            reads.move(_now() + SHORT)
            with pytest.raises(TimeoutError), reads.reading():
                await _never()
            assert task.cancelling() == 0
            await asyncio.sleep(0)
            return "ok"
        finally:
            reads.close()

    assert await _scenario(body) == "ok"


async def test_a_timeout_inside_an_outer_cancel_scope_is_not_mistaken_for_it() -> None:
    # ``reading`` compares against the cancellation count at its start: an enclosing
    # ``asyncio.timeout`` that has not expired is left alone, and the read's own timeout is
    # still a TimeoutError the caller can handle inside the scope.
    async def body() -> str:
        reads = ReadDeadline(_now() + SHORT)
        try:
            async with asyncio.timeout(LONG):
                with pytest.raises(TimeoutError), reads.reading():
                    await _never()
                await asyncio.sleep(0)
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
            return "ok"
        finally:
            reads.close()

    assert await _scenario(body) == "ok"
