"""`coalition demo` runs end to end and shows deliveries, denials and rejections."""

from __future__ import annotations

import io
import re

from broker.demo import run_demo


async def test_demo_shows_delivered_denied_and_rejected_traffic() -> None:
    out = io.StringIO()
    assert await run_demo(out) == 0
    report = out.getvalue()
    assert re.search(r"^1 +USA-GW1 .* GBR-GW1 +delivered$", report, re.MULTILINE)
    assert re.search(r"^1 +USA-GW1 .* USA-GW2 +queued$", report, re.MULTILINE)
    assert re.search(r"FRA-GW1 +denied:not_in_audience$", report, re.MULTILINE)
    assert "denied:no_key_for_recipient" in report
    for code in ("rejected:replay", "rejected:sender_mismatch", "rejected:bad_signature",
                 "refused:node_inactive"):
        assert code in report
    # The node that was offline gets its queue back, FLASH first.
    usa2 = re.findall(r"^  USA-GW2 +<- \S+ +prec=(\d)", report, re.MULTILINE)
    assert usa2 and usa2 == sorted(usa2, reverse=True) and usa2[0] == "3"
