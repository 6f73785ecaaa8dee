"""The loop-lag probe (``broker/looplag.py``): a loop held busy shows as lag; a nonsense
interval is refused."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.looplag import watch_loop_lag


async def _observed_while(hold_s: float, *, interval_s: float, samples: int) -> list[float]:
    """Run the probe, block the loop for ``hold_s`` once, and return the first ``samples``
    observations."""
    seen: list[float] = []
    enough = asyncio.Event()

    def observe(lag: float) -> None:
        seen.append(lag)
        if len(seen) >= samples:
            enough.set()

    probe = asyncio.create_task(watch_loop_lag(observe, interval_s=interval_s))
    try:
        await asyncio.sleep(0)  # the probe's first timer is armed
        time.sleep(hold_s)  # what a long turn of the loop does to every timer due meanwhile
        async with asyncio.timeout(10):
            await enough.wait()
    finally:
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
    return seen


async def test_a_loop_held_busy_shows_its_stall() -> None:
    seen = await _observed_while(0.12, interval_s=0.01, samples=3)
    # Due 10 ms after it was armed, run after the 120 ms hold: at least 110 ms late.
    assert seen[0] >= 0.11
    assert all(lag >= 0 for lag in seen)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
async def test_a_nonsense_interval_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="interval_s must be positive"):
        await watch_loop_lag(lambda lag: None, interval_s=interval)
