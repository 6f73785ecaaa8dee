"""docs/protocol.md stays true: every frame type and every error code is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from broker.errors import ERROR_CODES
from broker.wire import FRAME_TYPES

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("tag", sorted(FRAME_TYPES))
def test_every_frame_type_is_documented(tag: str) -> None:
    assert f't:"{tag}"' in DOC


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_is_in_the_table(code: str) -> None:
    assert re.search(rf"^\| `{code}` \|", DOC, re.MULTILINE), code


def test_the_table_lists_no_code_the_broker_does_not_have() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \| ", DOC.split("## Error codes")[1],
                                re.MULTILINE))
    assert documented - {"max_frame_bytes", "clock_skew_seconds", "delivery_window",
                         "handshake_timeout_seconds"} == set(ERROR_CODES)
