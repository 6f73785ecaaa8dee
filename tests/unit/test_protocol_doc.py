"""docs/protocol.md stays true: every frame type, every error code and every ``[limits]`` key is
documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from broker.config import LimitsSection
from broker.errors import ERROR_CODES
from broker.wire import FRAME_TYPES

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


@pytest.mark.parametrize("tag", sorted(FRAME_TYPES))
def test_every_frame_type_is_documented(tag: str) -> None:
    assert f't:"{tag}"' in DOC


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_is_in_the_table(code: str) -> None:
    assert re.search(rf"^\| `{code}` \|", DOC, re.MULTILINE), code


ERROR_TABLE = DOC.split("## Error codes")[1].split("\n## ")[0]
LIMITS_TABLE = DOC.split("## Limits")[1].split("\n## ")[0]


def test_the_table_lists_no_code_the_broker_does_not_have() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \| ", ERROR_TABLE, re.MULTILINE))
    assert documented == set(ERROR_CODES)


def test_the_limits_table_lists_every_limits_key_and_no_other() -> None:
    rows = re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*)", LIMITS_TABLE, re.MULTILINE)
    documented = {key for row in rows for key in re.findall(r"`([a-z_]+)`", row)}
    assert documented == {field.name for field in dataclasses.fields(LimitsSection)}
