"""Gateway consume: how fast one gateway's application gets verified, decrypted messages out of
:meth:`clients.gateway.GatewayClient.messages`.

``GBR-S1`` subscribes and goes offline; ``USA-P1`` publishes ``gateway_messages`` envelopes
(``NATO SECRET REL GBR``, the throughput payload) through the gateway client, so they queue at
the broker; then ``GBR-S1`` connects and takes them all, as fast as the loop turns, three ways:

- ``memory``: no ``state_dir`` (finished ids kept in memory only);
- ``durable``: a ``state_dir``, each finished id fsynced before the next message is handed over
  (the default: exactly once to the application, also across the gateway's crashes);
- ``batched``: a ``state_dir`` and ``finish_batch=16`` (up to 16 finished ids share one fsync
  while deliveries wait; a gateway crash shows them again).

Measured in the benchmark's own process (the gateway client, on uvloop) against a broker
process: messages per second from connect to the last message, and this process's CPU time per
message (the signature check, the decryption and the bookkeeping of each delivery).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from broker.bench.context import Run
from broker.bench.harness import PUBLISHERS, SUBSCRIBERS
from broker.bench.workers import use_uvloop
from broker.coalition import Coalition
from clients.gateway import GatewayClient, label

TOPIC = "bench.gateway"
PUBLISH_CONCURRENCY = 64
#: (mode, uses a state_dir, finish_batch)
MODES = (("memory", False, 1), ("durable", True, 1), ("batched", True, 16))


def run(bench: Run) -> dict[str, Any]:
    """Measure each mode on one broker."""
    count = bench.options.gateway_messages
    with bench.broker("gateway") as broker:
        use_uvloop()
        modes = asyncio.run(_measure_all(bench.coalition, broker.url, count,
                                         bench.workdir / "gateway-state"))
    return {"status": "ok", "count": sum(m["messages"] for m in modes), "messages": count,
            "modes": modes}


async def _measure_all(coalition: Coalition, url: str, count: int,
                       state: Path) -> list[dict[str, Any]]:
    publisher, subscriber = PUBLISHERS[0], SUBSCRIBERS[0]  # USA-P1 → GBR-S1

    def client(node: str, **kwargs: Any) -> GatewayClient:
        return GatewayClient(url, coalition.nodes[node], coalition.trust_root,
                             broker_name=coalition.broker_name, timeout=60, **kwargs)

    async with client(subscriber) as gbr:
        await gbr.subscribe(TOPIC)
    results = []
    for mode, durable, batch in MODES:
        async with client(publisher) as usa:
            await _publish(usa, count)
        state_dir = state / mode if durable else None
        async with client(subscriber, state_dir=state_dir, finish_batch=batch) as gbr:
            results.append({"mode": mode, "state_dir": durable, "finish_batch": batch,
                            **await _consume(gbr, count)})
    return results


async def _publish(usa: GatewayClient, count: int) -> None:
    lab = label("NATO", "SECRET", "USA", ["GBR"])
    payload = bytes(512)
    for start in range(0, count, PUBLISH_CONCURRENCY):
        await asyncio.gather(*(usa.publish(TOPIC, payload, lab)
                               for _ in range(min(PUBLISH_CONCURRENCY, count - start))))


async def _consume(gbr: GatewayClient, count: int) -> dict[str, Any]:
    started, cpu = time.perf_counter(), time.process_time()
    got = 0
    stream = gbr.messages()
    try:
        async for _ in stream:
            got += 1
            if got >= count:
                break
    finally:
        await stream.aclose()  # the last ones finished: written and acknowledged
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"messages": got, "elapsed_s": round(elapsed, 3),
            "messages_per_s": round(got / elapsed, 1) if elapsed > 0 else 0.0,
            "cpu_us_per_message": round(cpu / got * 1e6, 1) if got else 0.0}
