"""`coalition demo` runs end to end and shows, from the broker's own receipts: permits across the
inner and partner tiers naming agreement@version/tier, denials with their reason codes (above the
partner ceiling, expired agreement, need-to-know, audience, missing key), rejected envelopes, the
expired certificate, and the offline gateway's queue in precedence order."""

from __future__ import annotations

import asyncio
import io
import re
from collections import Counter
from pathlib import Path

import pytest

from broker import examples
from broker.demo import run_demo
from policies.loader import read_policy_dir

ROW = re.compile(r"^ *(?P<step>\d+) {5}(?P<node>\S+) +(?P<status>\S+)(?: +(?P<via>\S.*))?$",
                 re.MULTILINE)
RECEIVED = re.compile(r"^  (?P<node>\S+) +<- (?P<sender>\S+) +prec=(?P<prec>\d)", re.MULTILINE)


def ref(agreement_id: str, tier: str) -> str:
    """``ID@VERSION/TIER`` as the demo coalition defines it."""
    return next(f"{a.ref}/{tier}" for a in examples.agreements(0) if a.id == agreement_id)


@pytest.fixture(scope="module")
def report() -> str:
    out = io.StringIO()
    assert asyncio.run(run_demo(out)) == 0
    return out.getvalue()


def rows(report: str) -> list[dict[str, str]]:
    return [{k: v or "" for k, v in m.groupdict().items()} for m in ROW.finditer(report)]


def denied_with(report: str, code: str) -> list[dict[str, str]]:
    return [r for r in rows(report)
            if r["status"].startswith("denied:") and code in r["status"][7:].split(",")]


def test_inner_tier_permits_name_the_agreement_version_and_tier(report: str) -> None:
    core = ref(examples.ATLANTIC_SHIELD, examples.CORE_TIER)
    released = [r for r in rows(report) if r["via"] == core]
    assert {r["node"] for r in released} >= {"FRA-GW1", "GBR-GW1", "USA-GW1"}
    assert all(r["status"] in ("delivered", "queued") for r in released)
    inner = ref(examples.EASTERN_SENTRY, examples.INNER_TIER)
    assert any(r["via"] == inner and r["status"] == "delivered" for r in rows(report))


def test_partner_tier_permits_restricted_and_denies_above_its_ceiling(report: str) -> None:
    partners = ref(examples.ATLANTIC_SHIELD, examples.PARTNER_TIER)
    assert any(r["node"] == "POL-GW1" and r["status"] == "delivered" and r["via"] == partners
               for r in rows(report))
    assert any(r["node"] == "POL-GW1" for r in denied_with(report, "above_ceiling"))


def test_expired_agreement_denies_with_agreement_inactive(report: str) -> None:
    (row,) = denied_with(report, "agreement_inactive")
    assert row["status"] == "denied:agreement_inactive"
    rhine = next(a.ref for a in examples.agreements(0) if a.id == examples.RHINE_LIAISON)
    assert re.search(rf"why: {re.escape(rhine)}/\S+ \(expired\)", report)


def test_need_to_know_denials(report: str) -> None:
    assert denied_with(report, "recipient_not_accredited")  # a node without the NTK value
    # The partners tier admits no need-to-know value: a RESTRICTED NTK label is not released.
    assert any(r["node"] == "POL-GW1" and "above_ceiling" not in r["status"]
               for r in denied_with(report, "category_not_covered"))


def test_audience_missing_key_and_rejected_envelopes(report: str) -> None:
    assert any(r["node"] == "FRA-GW1" and r["status"] == "denied:not_in_audience"
               for r in rows(report))
    assert denied_with(report, "no_key_for_recipient")
    statuses = {r["status"] for r in rows(report) if r["node"] == "(broker)"}
    assert statuses == {"rejected:replay", "rejected:sender_mismatch", "rejected:bad_signature",
                        "refused:node_inactive"}


def test_every_release_in_a_receipt_is_received_and_decrypted(report: str) -> None:
    owed = Counter(r["node"] for r in rows(report) if r["status"] in ("delivered", "queued")
                   and "EXPIRED" not in r["via"])
    received = Counter(m["node"] for m in RECEIVED.finditer(report))
    assert owed == received and len(owed) == 5


def test_message_past_its_ttl_expires_for_the_offline_gateway_and_the_sender_is_told(
        report: str) -> None:
    expired = [r for r in rows(report) if "EXPIRED" in r["via"]]
    assert [(r["node"], r["status"]) for r in expired] == [(examples.OFFLINE_NODE, "queued")]
    assert "GBR-GW1 was told" in expired[0]["via"]
    step = expired[0]["step"]
    # The other recipients, online, got it; the offline one never does.
    assert {r["node"] for r in rows(report) if r["step"] == step and r["status"] == "delivered"}
    offline_got = [line for line in report.splitlines()
                   if line.startswith(f"  {examples.OFFLINE_NODE} ") and " <- " in line]
    assert offline_got and not any("short-lived" in line for line in offline_got)
    assert any("short-lived" in line for line in report.splitlines() if " <- " in line)
    audit = report.split("Audit: export the log")[1]
    assert re.search(r"expiries checked\s+1\b", audit)


def test_offline_gateway_gets_its_queue_in_precedence_order(report: str) -> None:
    assert any(r["node"] == examples.OFFLINE_NODE and r["status"] == "queued"
               for r in rows(report))
    precs = [m["prec"] for m in RECEIVED.finditer(report) if m["node"] == examples.OFFLINE_NODE]
    assert len(precs) >= 4 and precs == sorted(precs, reverse=True) and precs[0] == "3"
    assert len(set(precs)) == 4  # FLASH, IMMEDIATE, PRIORITY and ROUTINE all queued


async def test_demo_keeps_its_signed_documents_in_the_work_directory(tmp_path: Path) -> None:
    assert await run_demo(io.StringIO(), workdir=tmp_path) == 0
    documents = read_policy_dir(tmp_path / "policy")
    assert {f"agreements/{a}.toml" for a in (examples.ATLANTIC_SHIELD, examples.EASTERN_SENTRY,
                                              examples.RHINE_LIAISON)} <= set(documents)
    assert (tmp_path / "keys" / f"{examples.OFFLINE_NODE}.key").is_file()


def test_demo_ends_by_verifying_its_own_audit_log(report: str) -> None:
    audit = report.split("Audit: export the log and verify it offline")[1]
    entries = int(re.search(r"entries\s+(\d+)", audit).group(1))  # type: ignore[union-attr]
    replayed = int(re.search(r"decisions replayed (\d+)", audit).group(1))  # type: ignore[union-attr]
    assert entries > 20 and replayed > 10
    assert re.search(r"problems\s+0\n", audit) and "verdict            OK" in audit
    # The nations' gateways cosigned the checkpoint covering the traffic.
    assert "cosigned by DEU, FRA, GBR, POL, USA" in audit
