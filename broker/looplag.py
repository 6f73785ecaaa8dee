"""How late the broker's event loop runs what is due: its own overload signal.

Every frame, decision, commit hand-off and delivery of a broker runs on one event loop, so the
time a ready callback waits for the loop is added to every publish and every delivery. A
timer that should fire every ``interval_s`` and fires late by *x* says that the loop was busy
for about *x* without a break (one long turn: a burst of frames, a commit on the loop, a full
garbage collection). Measured under load (docs/performance.md, session 17): p99 4–6 ms at a
quarter of the maximum rate, 30–75 ms at saturation. Exported as the
``coalition_event_loop_lag_seconds`` histogram; an operator alerts on its high quantiles
before nodes notice (docs/operations.md "Observe").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: Ten samples a second: enough to see a stall of a few milliseconds in any busy second, and
#: a negligible cost (one timer and one histogram observation each).
DEFAULT_INTERVAL_S = 0.1


async def watch_loop_lag(observe: Callable[[float], None], *,
                         interval_s: float = DEFAULT_INTERVAL_S,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Forever (until cancelled): sleep ``interval_s`` on the running loop and ``observe`` how
    many seconds later than due it woke (never negative). ``clock`` is a monotonic clock of
    finer grain than the loop's own (uvloop's ``time()`` counts whole milliseconds)."""
    if not interval_s > 0:
        raise ValueError(f"interval_s must be positive, not {interval_s!r}")
    while True:
        due = clock() + interval_s
        await asyncio.sleep(interval_s)
        observe(max(0.0, clock() - due))
