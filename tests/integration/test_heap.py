"""A served broker freezes its start-up heap before it accepts a connection."""

from __future__ import annotations

import gc

from broker.coalition import Coalition
from broker.server import BrokerServer
from tests.integration.conftest import FAST_COMMIT


async def test_the_heap_is_frozen_before_listening_only_when_asked(coalition: Coalition) -> None:
    gc.unfreeze()
    try:
        for settle in (False, True):
            server = BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                                  key=coalition.broker_key, commit=FAST_COMMIT,
                                  data_dir=coalition.base / "broker-data")
            server.settle_heap_before_listening = settle
            async with server:
                frozen = gc.get_freeze_count()
            # Embedded brokers (tests, the demo) leave the host process's heap alone.
            assert (frozen > 10_000) is settle, frozen
    finally:
        gc.unfreeze()  # the rest of the test session keeps an ordinary heap
