"""``coalition demo``: a small coalition, an embedded broker on loopback, real gateways.

It generates authority keys and signed certificates for USA, GBR and FRA (plus a node whose
certificate has expired), starts the broker on ``127.0.0.1:0``, runs gateways that exchange
labelled, encrypted messages, and prints who received what and what was denied with which
reason code. Every step goes through the real protocol; nothing is simulated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from broker.coalition import DAY_MS, Coalition, NodeSpec, build_coalition
from broker.envelope import Envelope, build_envelope
from broker.server import BrokerServer
from clients.gateway import (
    AuthenticationError,
    GatewayClient,
    Message,
    Receipt,
    RequestRejected,
    label,
)
from policies.model import Label

NATIONS = ("FRA", "GBR", "USA")
NODES = (
    NodeSpec("USA-GW1", "USA"), NodeSpec("USA-GW2", "USA"), NodeSpec("GBR-GW1", "GBR"),
    NodeSpec("FRA-GW1", "FRA"),
)


@dataclasses.dataclass
class Row:
    step: str
    sender: str
    topic: str
    label: str
    outcome: dict[str, str]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _describe(lab: Label) -> str:
    return f"{lab.cls} REL {'/'.join(lab.rel) or '-'}"


class Demo:
    """The scripted scenario; ``out`` receives the human report."""

    def __init__(self, coalition: Coalition, server: BrokerServer, out: TextIO) -> None:
        self.c = coalition
        self.server = server
        self.out = out
        self.rows: list[Row] = []
        self.received: dict[str, list[Message]] = {}
        self.root = coalition.trust_root

    def client(self, node: str) -> GatewayClient:
        return GatewayClient(self.server.url, self.c.nodes[node], self.root,
                             broker_name=self.c.broker_name, timeout=10)

    def record(self, step: str, sender: str, topic: str, lab: Label, receipt: Receipt) -> None:
        outcome = {node: status for node, status in sorted(receipt.recipients.items())}
        self.rows.append(Row(step, sender, topic, _describe(lab), outcome))

    def record_error(self, step: str, sender: str, topic: str, lab: str, error: Exception) -> None:
        code = getattr(error, "code", type(error).__name__)
        self.rows.append(Row(step, sender, topic, lab, {"(broker)": f"rejected:{code}"}))

    def owed(self, node: str) -> int:
        """How many messages the receipts said were delivered or queued for ``node``."""
        return sum(row.outcome.get(node) in ("delivered", "queued") for row in self.rows)

    async def collect(self, gw: GatewayClient, expected: int) -> None:
        got = self.received.setdefault(gw.node, [])
        stream = gw.messages()
        try:
            while len(got) < expected:
                got.append(await asyncio.wait_for(anext(stream), timeout=10))
        finally:
            await stream.aclose()

    async def run(self) -> None:
        """Run every step of the scenario."""
        async with self.client("USA-GW1") as usa, self.client("GBR-GW1") as gbr, \
                self.client("FRA-GW1") as fra:
            for gw in (usa, gbr, fra):
                await gw.subscribe("maritime.>")
            async with self.client("USA-GW2") as usa2:
                await usa2.subscribe("maritime.>")  # durable: kept while it is offline
            await self.publish_steps(usa, gbr, fra)
            await self.attack_steps(usa, fra)
            await asyncio.gather(*(self.collect(gw, self.owed(gw.node)) for gw in (usa, gbr, fra)))
            async with self.client("USA-GW2") as usa2:  # comes back and gets its queue
                await self.collect(usa2, self.owed("USA-GW2"))
        await self.expired_certificate_step()

    async def publish_steps(self, usa: GatewayClient, gbr: GatewayClient,
                            fra: GatewayClient) -> None:
        steps: list[tuple[str, GatewayClient, str, Label, str]] = [
            ("1", usa, "maritime.tracks", label("NATO", "SECRET", "USA", ["FRA", "GBR"]), "FLASH"),
            ("2", usa, "maritime.tracks", label("NATO", "SECRET", "USA", ["GBR"]), "IMMEDIATE"),
            ("3", gbr, "maritime.reports", label("NATO", "RESTRICTED", "GBR", ["NATO"]),
             "ROUTINE"),
            ("4", fra, "maritime.reports", label("NATO", "CONFIDENTIAL", "FRA", []), "PRIORITY"),
        ]
        for step, gw, topic, lab, prec in steps:
            receipt = await gw.publish(topic, f"payload of step {step}".encode(), lab,
                                       precedence=prec)
            self.record(step, gw.node, topic, lab, receipt)

    async def attack_steps(self, usa: GatewayClient, fra: GatewayClient) -> None:
        # 5: sealed for GBR only, but explicitly addressed to FRA too: FRA has no key.
        lab = label("NATO", "SECRET", "USA", ["FRA", "GBR"])
        certs = await usa.directory()
        env = build_envelope(
            signing_key=usa.identity.signing_key, sender=usa.node, topic="maritime.tracks",
            payload=b"sealed for GBR only", label=lab, prec=0, ttl=600,
            recipient_keys={"GBR-GW1": certs["GBR-GW1"].enc_key}, now_ms=_now_ms(),
        )
        receipt = await usa.publish_envelope(env)
        self.record("5", usa.node, "maritime.tracks", lab, receipt)
        # 6: the same bytes again: a replay.
        await self.expect_rejection("6 replay", usa, env, "maritime.tracks", _describe(lab))
        # 7: FRA-GW1 forwards USA's envelope as if it were its own.
        await self.expect_rejection("7 forged sender", fra, env, "maritime.tracks",
                                    _describe(lab))
        # 8: a flipped bit in the signed body (inside the ciphertext, so it still parses).
        tampered = bytearray(env)
        tampered[env.find(Envelope.from_bytes(env).ct) + 3] ^= 0x01
        await self.expect_rejection("8 tampered", usa, bytes(tampered), "maritime.tracks",
                                    _describe(lab))

    async def expect_rejection(self, step: str, gw: GatewayClient, env: bytes, topic: str,
                               lab: str) -> None:
        try:
            await gw.publish_envelope(env)
        except RequestRejected as exc:
            self.record_error(step, gw.node, topic, lab, exc)
        else:  # pragma: no cover - the demo's own check
            raise AssertionError(f"step {step}: the broker accepted a bad envelope")

    async def expired_certificate_step(self) -> None:
        try:
            async with self.client("FRA-GW9"):
                raise AssertionError("expired certificate was accepted")  # pragma: no cover
        except AuthenticationError as exc:
            self.rows.append(Row("9 connect", "FRA-GW9", "-", "(certificate expired)",
                                 {"(broker)": f"refused:{exc.code}"}))

    def report(self) -> None:
        """Print the decision table and what each node decrypted."""
        w = self.out.write
        w("\nDecisions (one line per candidate recipient)\n")
        header = f"{'step':<16} {'from':<8} {'topic':<17} {'label':<28} {'to':<9} outcome\n"
        w(header + "-" * (len(header) + 12) + "\n")
        for row in self.rows:
            for node, status in row.outcome.items():
                w(f"{row.step:<16} {row.sender:<8} {row.topic:<17} {row.label:<28} "
                  f"{node:<9} {status}\n")
        w("\nReceived and decrypted by each gateway (in delivery order)\n")
        for node, messages in sorted(self.received.items()):
            for m in messages:
                w(f"  {node:<8} <- {m.sender:<8} prec={m.precedence} {m.topic:<17} "
                  f"{m.payload.decode()!r}\n")


async def run_demo(out: TextIO, *, workdir: Path | None = None,
                   configure: Callable[[], None] | None = None) -> int:
    """Build the coalition, run the scenario, print the report; returns the exit status."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="coalition-demo-") as tmp:
        base = workdir or Path(tmp)
        now = _now_ms()
        expired = NodeSpec("FRA-GW9", "FRA", not_before_ms=now - 30 * DAY_MS,
                           not_after_ms=now - DAY_MS)
        coalition = build_coalition(base, nations=NATIONS, nodes=(*NODES, expired), now_ms=now,
                                    communities={"NATO": NATIONS})
        out.write(f"Coalition: {', '.join(NATIONS)}; policy and keys in {base}\n")
        out.write("Trust root signed by a threshold of nations; node certificates signed by "
                  "their nation.\n")
        async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle()) as server:
            out.write(f"Broker {coalition.broker_name} listening on {server.url}\n")
            demo = Demo(coalition, server, out)
            await demo.run()
            demo.report()
    out.write(f"\nDemo finished in {time.monotonic() - started:.1f} s.\n")
    return 0
