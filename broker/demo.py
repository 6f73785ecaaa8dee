"""``coalition demo``: the five-nation demo coalition, a broker on loopback, real gateways.

It generates authority keys and signed documents for DEU, FRA, GBR, POL and USA (their own
classification schemes, two tiered agreements and an expired one: see :mod:`broker.examples`),
writes them to a directory, starts the broker on ``127.0.0.1:0``, runs gateways that exchange
labelled, encrypted messages, and prints for each candidate recipient the broker's receipt, the
``agreement@version/tier`` that permitted it or the reason codes of the denial, then what each
gateway decrypted. Every message goes through the real protocol; nothing is simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from broker import examples
from broker.audit.commit_policy import CommitPolicy
from broker.cli_audit import print_report
from broker.coalition import Coalition
from broker.envelope import Envelope, build_envelope
from broker.server import BrokerServer, Limits
from broker.store.sqlite import SqliteStore
from clients.auditor import verify_export
from clients.export import export_store
from clients.gateway import (
    AuthenticationError,
    GatewayClient,
    Message,
    Receipt,
    RequestRejected,
    label,
)
from policies.bundle import Bundle
from policies.decide import decide, label_is_valid, map_label, tier_failures
from policies.model import Label, Tier

#: Shown instead of an agreement for a recipient of the sender's own nation (rule 4 skipped).
SAME_NATION = "(same nation: no agreement needed)"
CONNECTED = ("DEU-GW1", "FRA-GW1", "GBR-GW1", "POL-GW1", "USA-GW1")
SUBSCRIPTIONS = {
    "maritime.>": ("FRA-GW1", "GBR-GW1", "POL-GW1", "USA-GW1", examples.OFFLINE_NODE),
    "land.>": ("DEU-GW1", "GBR-GW1", "POL-GW1"),
}


@dataclasses.dataclass(frozen=True)
class Step:
    """One publish of the scenario: what it shows, who sends what to whom."""

    title: str
    sender: str
    topic: str
    label: Label
    prec: str
    to: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One line of the report: a candidate recipient's status and, for a permit, what allowed it."""

    step: str
    node: str
    status: str
    via: str = ""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def publish_steps() -> tuple[Step, ...]:
    """The scripted publishes (their outcomes come from the broker, not from this list)."""
    nato = ["NATO"]
    return (
        Step(f"inner tier: SECRET to the core of {examples.ATLANTIC_SHIELD}; POL is only a partner",
             "USA-GW1", "maritime.tracks", label("USA", "SECRET", "USA", nato), "FLASH"),
        Step("audience: the label releases to GBR only", "USA-GW1", "maritime.tracks",
             label("USA", "SECRET", "USA", ["GBR"]), "IMMEDIATE"),
        Step("partner tier: OFFICIAL-SENSITIVE is RESTRICTED, within the partners' ceiling",
             "GBR-GW1", "maritime.reports", label("GBR", "OFFICIAL-SENSITIVE", "GBR", nato),
             "ROUTINE"),
        Step("need-to-know: FRA-GW1 holds BESOIN BRAVO, not ALPHA", "USA-GW1",
             "maritime.tracks", label("USA", "SECRET", "USA", ["FRA", "GBR"], {"NTK": ["ALPHA"]}),
             "PRIORITY"),
        Step("need-to-know: the partners tier admits no NTK value", "GBR-GW1",
             "maritime.reports",
             label("GBR", "OFFICIAL-SENSITIVE", "GBR", ["POL", "USA"], {"NTK": ["ALPHA"]}),
             "ROUTINE"),
        Step(f"second agreement: land topics go to the inner tier of {examples.EASTERN_SENTRY}",
             "DEU-GW1", "land.reports", label("DEU", "GEHEIM", "DEU", nato), "ROUTINE"),
        Step("a partner's own scheme: POL ZASTRZEŻONE to the core", "POL-GW1",
             "maritime.reports", label("POL", "ZASTRZEŻONE", "POL", nato), "PRIORITY"),
        Step(f"expired agreement: {examples.RHINE_LIAISON} is the only FRA-DEU agreement",
             "FRA-GW1", "liaison.rhine", label("FRA", "CONFIDENTIEL", "FRA", ["DEU"]), "ROUTINE",
             to=("DEU-GW1",)),
    )


def describe_label(lab: Label, bundle: Bundle) -> str:
    """``USA SECRET (NATO SECRET) NTK:ALPHA REL FRA/GBR``: the label and its common level."""
    text = f"{lab.policy} {lab.cls}"
    scheme, common = bundle.schemes.get(lab.policy), bundle.trust_root.common_scheme
    mapped = scheme.common_level(lab.cls) if scheme is not None else None
    if lab.policy != common and mapped is not None:
        text += f" ({common} {mapped})"
    for tag, values in sorted(lab.cats.items()):
        text += f" {tag}:{'/'.join(values)}"
    return f"{text} REL {'/'.join(lab.rel) or '-'}"


RULE_4_CODES = frozenset({"no_agreement", "agreement_inactive", "above_ceiling",
                          "category_not_covered", "topic_not_covered"})


def explain_denial(reasons: Sequence[str], lab: Label, sender: str, recipient: str, topic: str,
                   now: int, bundle: Bundle) -> str:
    """A short "why" for the reason codes of a denial, from the documents in the bundle."""
    cert = bundle.nodes[recipient]
    parts = []
    if "not_in_audience" in reasons:
        parts.append(f"{cert.nation} is not in REL {'/'.join(lab.rel) or '-'}")
    if RULE_4_CODES.intersection(reasons):
        parts.append(explain_agreements(lab, sender, recipient, topic, now, bundle))
    if "recipient_not_accredited" in reasons:
        held = " ".join(f"{t}:{'/'.join(v)}" for t, v in sorted(cert.accreditation.cats.items()))
        parts.append(f"{recipient} is accredited {cert.accreditation.max} {held}".rstrip())
    if "no_key_for_recipient" in reasons:
        parts.append(f"the envelope holds no key sealed for {recipient}")
    return "; ".join(p for p in parts if p)


def explain_agreements(lab: Label, sender: str, recipient: str, topic: str, now: int,
                       bundle: Bundle) -> str:
    """Why rule 4 fails, per candidate tier: ``ID@V/TIER: reasons`` (empty when the label
    itself is invalid or unmappable, or the nations are the same)."""
    origin, destination = bundle.nation_of(sender), bundle.nation_of(recipient)
    scheme, common = bundle.schemes.get(lab.policy), bundle.common_scheme
    if origin is None or destination is None or origin == destination or scheme is None \
            or common is None or not label_is_valid(lab, scheme):
        return ""
    mapped = map_label(lab, scheme, common)
    if mapped is None:
        return ""
    parts = []
    for agreement, tier in bundle.candidates(origin, destination):
        failures = sorted(tier_failures(tier, mapped, common, topic))
        if now >= agreement.not_after:
            failures.insert(0, "expired")
        elif now < agreement.not_before:
            failures.insert(0, "not yet in force")
        parts.append(f"{agreement.ref}/{tier.name} ({', '.join(failures) or 'covers it'})")
    return ", ".join(parts) or f"no agreement of {origin} puts {destination} in a tier"


class Demo:
    """The scripted scenario; ``out`` receives the human report."""

    def __init__(self, coalition: Coalition, bundle: Bundle, server: BrokerServer,
                 out: TextIO) -> None:
        self.c = coalition
        self.bundle = bundle
        self.server = server
        self.out = out
        self.steps: list[tuple[str, str]] = []  # (key, header text)
        self.outcomes: list[Outcome] = []
        self.received: dict[str, list[Message]] = {}

    def client(self, node: str) -> GatewayClient:
        # Each gateway is also a witness of the audit log: it cosigns the checkpoints.
        return GatewayClient(self.server.url, self.c.nodes[node], self.bundle.trust_root,
                             broker_name=self.c.broker_name, timeout=10,
                             state_dir=self.c.base / "witness" / node)

    # --- the scenario ---------------------------------------------------------------------

    async def run(self) -> None:
        """Run every step: subscriptions, publishes, attacks, then collect the deliveries."""
        async with contextlib.AsyncExitStack() as stack:
            gateways = {node: await stack.enter_async_context(self.client(node))
                        for node in CONNECTED}
            async with self.client(examples.OFFLINE_NODE) as offline:
                await offline.subscribe("maritime.>")  # durable: kept while it is offline
            for pattern, nodes in SUBSCRIPTIONS.items():
                for node in nodes:
                    if node in gateways:
                        await gateways[node].subscribe(pattern)
            for step in publish_steps():
                await self.publish(gateways[step.sender], step)
            await self.attack_steps(gateways["USA-GW1"], gateways["FRA-GW1"])
            await self.ttl_step(gateways["GBR-GW1"])
            await asyncio.gather(*(self.collect(gw, self.owed(node))
                                   for node, gw in gateways.items()))
            async with self.client(examples.OFFLINE_NODE) as offline:  # back: gets its queue
                await self.collect(offline, self.owed(examples.OFFLINE_NODE))
            await self.until_witnessed(len(gateways))
        await self.expired_certificate_step()

    async def until_witnessed(self, witnesses: int) -> None:
        """Give the connected gateways time to cosign a checkpoint covering the traffic."""
        audit, target = self.server.audit, self.server.audit.size
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while (audit.latest is None or audit.latest.size < target
                       or len(audit.latest.cosignatures) < witnesses):
                    await asyncio.sleep(0.02)

    async def publish(self, gw: GatewayClient, step: Step) -> None:
        """Publish through the client library and record the receipt, explained."""
        key, now = self.next_key(), _now_ms()
        receipt = await gw.publish(step.topic, f"payload of step {key}".encode(),
                                   step.label, precedence=step.prec, to=step.to)
        self.header(key, f"{step.title}\n"
                    f"        {step.sender} -> {step.topic} {step.prec}: "
                    f"{describe_label(step.label, self.bundle)}")
        self.record(key, gw.node, step.topic, step.label, receipt, now)

    def next_key(self) -> str:
        """The number of the next step (steps are numbered in the order they run)."""
        return str(len(self.steps) + 1)

    def header(self, key: str, text: str) -> None:
        self.steps.append((key, text))

    def record(self, key: str, sender: str, topic: str, lab: Label, receipt: Receipt,
               now: int) -> None:
        """Keep the receipt's status per recipient, and for a permit the agreement and tier
        that allowed it (the engine's explanation, checked against the receipt)."""
        for node, status in sorted(receipt.recipients.items()):
            if node not in self.bundle.nodes:  # denied unknown_node: nothing to explain
                self.outcomes.append(Outcome(key, node, status))
                continue
            decision = decide(lab, self.bundle.nodes[sender], self.bundle.nodes[node], topic,
                              now, self.bundle)
            released = status in ("delivered", "queued")
            if released and not decision.permit:  # pragma: no cover - the demo's own check
                raise AssertionError(f"step {key}: {node} {status} but decide() denies: "
                                     f"{decision.status()}")
            if released:
                via = decision.via or SAME_NATION
            else:
                reasons = status.removeprefix("denied:").split(",")
                via = explain_denial(reasons, lab, sender, node, topic, now, self.bundle)
            self.outcomes.append(Outcome(key, node, status, via))

    def owed(self, node: str) -> int:
        """How many messages the receipts said were delivered or queued for ``node`` (and did
        not expire while it was offline)."""
        return sum(o.node == node and o.status in ("delivered", "queued") and not o.via
                   .startswith("then EXPIRED") for o in self.outcomes)

    async def ttl_step(self, gbr: GatewayClient) -> None:
        """A ROUTINE report with a 1 s TTL: the offline node's copy expires before it returns,
        and the sender is told (an ``expire`` audit entry, an ``expired`` frame)."""
        step = Step(f"TTL: 1 s; {examples.OFFLINE_NODE} is offline longer than that", "GBR-GW1",
                    "maritime.reports", label("GBR", "OFFICIAL-SENSITIVE", "GBR", ["NATO"]),
                    "ROUTINE")
        key, now = self.next_key(), _now_ms()
        receipt = await gbr.publish(step.topic, b"short-lived", step.label, ttl=1)
        self.header(key, f"{step.title}\n        {step.sender} -> {step.topic} {step.prec}: "
                    f"{describe_label(step.label, self.bundle)}")
        self.record(key, gbr.node, step.topic, step.label, receipt, now)
        async with asyncio.timeout(10):
            while not any(e.id == receipt.id for e in gbr.expired):
                await asyncio.sleep(0.05)
        told = [e.recipient for e in gbr.expired if e.id == receipt.id]
        self.outcomes = [dataclasses.replace(o, via=f"then EXPIRED after {_now_ms() - now} ms; "
                                             f"{gbr.node} was told")
                         if o.step == key and o.node in told else o for o in self.outcomes]

    async def collect(self, gw: GatewayClient, expected: int) -> None:
        got = self.received.setdefault(gw.node, [])
        stream = gw.messages()
        try:
            while len(got) < expected:
                got.append(await asyncio.wait_for(anext(stream), timeout=10))
        finally:
            await stream.aclose()

    # --- attacks ------------------------------------------------------------------------

    async def attack_steps(self, usa: GatewayClient, fra: GatewayClient) -> None:
        """A missing sealed key, a replay, a forged sender and a tampered envelope."""
        lab = label("USA", "SECRET", "USA", ["FRA", "GBR"])
        described = describe_label(lab, self.bundle)
        certs = await usa.directory()
        now = _now_ms()
        env = build_envelope(
            signing_key=usa.identity.signing_key, sender=usa.node, topic="maritime.tracks",
            payload=b"sealed for GBR only", label=lab, prec=0, ttl=600,
            recipient_keys={"GBR-GW1": certs["GBR-GW1"].enc_key}, now_ms=now,
        )
        receipt = await usa.publish_envelope(env)
        key = self.next_key()
        self.header(key, "no key: sealed for GBR-GW1 only, though FRA-GW1 is permitted\n"
                    f"        USA-GW1 -> maritime.tracks ROUTINE: {described}")
        self.record(key, usa.node, "maritime.tracks", lab, receipt, now)
        await self.expect_rejection("replay: the same envelope bytes again", usa, env)
        await self.expect_rejection("forged sender: FRA-GW1 publishes USA-GW1's envelope", fra,
                                    env)
        tampered = bytearray(env)
        tampered[env.find(Envelope.from_bytes(env).ct) + 3] ^= 0x01
        await self.expect_rejection("tampered: one bit flipped inside the signed body", usa,
                                    bytes(tampered))

    async def expect_rejection(self, title: str, gw: GatewayClient, env: bytes) -> None:
        key = self.next_key()
        try:
            await gw.publish_envelope(env)
        except RequestRejected as exc:
            self.header(key, f"{title}\n        {gw.node} publishes")
            self.outcomes.append(Outcome(key, "(broker)", f"rejected:{exc.code}"))
        else:  # pragma: no cover - the demo's own check
            raise AssertionError(f"step {key}: the broker accepted a bad envelope")

    async def expired_certificate_step(self) -> None:
        try:
            async with self.client(examples.EXPIRED_NODE):
                raise AssertionError("expired certificate was accepted")  # pragma: no cover
        except AuthenticationError as exc:
            key = self.next_key()
            self.header(key, f"expired certificate: {examples.EXPIRED_NODE} connects")
            self.outcomes.append(Outcome(key, "(broker)", f"refused:{exc.code}"))

    # --- the report ---------------------------------------------------------------------

    def report(self) -> None:
        """Print the outcomes step by step, then what each gateway decrypted."""
        w = self.out.write
        w("\nTraffic: the broker's receipt for each candidate recipient; a release names the "
          "agreement@version/tier\nthat permitted it, a denial every failed reason code.\n")
        for key, text in self.steps:
            w(f"\n{key:>3}. {text}\n")
            for o in (o for o in self.outcomes if o.step == key):
                if o.status.startswith("denied:"):
                    w(f"{key:>3}     {o.node:<9} {o.status}\n")
                    if o.via:
                        w(textwrap.fill(f"why: {o.via}", width=100, initial_indent=" " * 16,
                                        subsequent_indent=" " * 21, break_on_hyphens=False)
                          + "\n")
                else:
                    w(f"{key:>3}     {o.node:<9} {o.status:<24} {o.via}".rstrip() + "\n")
        w("\nReceived and decrypted by each gateway (in delivery order)\n")
        for node, messages in sorted(self.received.items()):
            for m in messages:
                w(f"  {node:<8} <- {m.sender:<8} prec={m.precedence} {m.topic:<17} "
                  f"{m.payload.decode()!r}\n")


def describe_coalition(coalition: Coalition, bundle: Bundle, now: int) -> list[str]:
    """The coalition in a few lines: schemes and equivalences, agreements and tiers, gateways."""
    root = bundle.trust_root
    lines = [f"Coalition {', '.join(sorted(root.nations))}, common scheme {root.common_scheme}; "
             f"signed documents and keys written to {coalition.base}",
             "  National levels, by the common level they are equivalent to:"]
    lines += ["    " + line for line in _equivalence_table(bundle)]
    lines += _renamed_tags(bundle)
    lines.append("  Agreements (each signed by every party):")
    for agreement in bundle.agreements:
        state = "active" if agreement.is_active_at(now) else "EXPIRED"
        lines.append(f"    {agreement.ref:<18} {state:<7} parties {' '.join(agreement.parties)}"
                     f": {agreement.purpose}")
        lines += [f"      {_describe_tier(tier)}" for tier in agreement.tiers]
    lines.append("  Gateways (accreditation in their nation's scheme):")
    for cert in sorted(bundle.nodes.values(), key=lambda c: c.node):
        cats = " ".join(f"{t}:{'/'.join(v)}" for t, v in sorted(cert.accreditation.cats.items()))
        expired = "" if cert.is_valid_at(now) else "  (certificate EXPIRED)"
        offline = "  (offline until the end)" if cert.node == examples.OFFLINE_NODE else ""
        lines.append(f"    {cert.node:<8} {cert.accreditation.max} {cats}".rstrip()
                     + expired + offline)
    return lines


def _equivalence_table(bundle: Bundle) -> list[str]:
    """One row per nation, one column per common level: the national level(s) mapped to it."""
    common = bundle.common_scheme
    assert common is not None
    rows = [["", *common.levels]]
    for nation in sorted(bundle.trust_root.nations):
        scheme = bundle.schemes[nation]
        rows.append([nation, *("/".join(lv for lv in scheme.levels
                                        if scheme.common_level(lv) == target) or "-"
                               for target in common.levels)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _renamed_tags(bundle: Bundle) -> list[str]:
    """A line per national tag that maps to a common tag of another name."""
    return [f"  {nation} tag {tag} is the common {target}"
            for nation in sorted(bundle.trust_root.nations)
            for tag, target in sorted(bundle.schemes[nation].tag_map.items()) if tag != target]


def _describe_tier(tier: Tier) -> str:
    text = f"tier {tier.name:<10} {' '.join(tier.members):<16} up to {tier.ceiling:<11}"
    if tier.topics is not None:
        text += f" topics {' '.join(tier.topics)}"
    for tag, allowed in sorted((tier.categories or {}).items()):
        text += f"  {tag}: {'/'.join(allowed) or 'none'}"
    return text.rstrip()


async def run_demo(out: TextIO, *, workdir: Path | None = None,
                   configure: Callable[[], None] | None = None) -> int:
    """Build the coalition, run the scenario, print the report; returns the exit status.

    The signed documents and keys are written under ``workdir`` (``policy/`` and ``keys/``),
    or a temporary directory removed at the end.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="coalition-demo-") as tmp:
        base = workdir or Path(tmp)
        now = _now_ms()
        coalition = examples.build_example_coalition(base, now)
        bundle = coalition.bundle()
        _write_lines(out, describe_coalition(coalition, bundle, now))
        if workdir is None:
            out.write("  (a temporary directory, removed at the end; `coalition demo --dir DIR` "
                      "keeps it)\n")
        async with BrokerServer(name=coalition.broker_name, bundle=bundle,
                                key=coalition.broker_key, data_dir=base / "broker-data",
                                commit=DEMO_COMMIT, limits=DEMO_LIMITS) as server:
            out.write(f"Broker {coalition.broker_name} listening on {server.url}\n")
            demo = Demo(coalition, bundle, server, out)
            await demo.run()
            demo.report()
        ok = audit_step(coalition, base, out)
    out.write(f"\nDemo finished in {time.monotonic() - started:.1f} s.\n")
    return 0 if ok else 1


#: Checkpoints every 100 ms, so the short demo gets several, cosigned while gateways are online.
DEMO_COMMIT = CommitPolicy(checkpoint_interval_s=0.1)
#: Queues swept for expired messages every 100 ms, so the TTL step takes about its 1 s TTL.
DEMO_LIMITS = Limits(expiry_interval_s=0.1)


def audit_step(coalition: Coalition, base: Path, out: TextIO) -> bool:
    """Export the broker's audit log and verify it as an auditor would, trusting only the
    pinned trust root; print the report."""
    out.write("\nAudit: export the log and verify it offline (coalition audit export/verify)\n")
    store = SqliteStore.in_dir(base / "broker-data", read_only=True)
    try:
        summary = export_store(store, coalition.broker_name, base / "audit-export")
    finally:
        store.close()
    out.write(f"  exported {summary.entries} entries, {summary.checkpoints} checkpoints, "
              f"{summary.bundles} policy bundle(s) to {summary.out}\n")
    report = verify_export(summary.out, pins=[coalition.root_sha256])
    print_report(report, out)
    return report.ok


def _write_lines(out: TextIO, lines: Sequence[str]) -> None:
    out.write("".join(line + "\n" for line in lines))
