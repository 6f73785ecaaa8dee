"""docs/security.md and docs/security-bad-input.md name a test for every claim and every row:
each named test must exist, so a renamed or deleted test cannot leave a claim unbacked."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
#: `integration/test_x.py::test_name` or, after a first one in the same cell, `…::test_name`.
_QUALIFIED = re.compile(r"`((?:unit|integration|property)/test_\w+\.py)::(test_\w+)")
_CONTINUED = re.compile(r"`…::(test_\w+)")
_BARE = re.compile(r"`(test_\w+)(?:\[[^\]`]*\])?`")


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _security_references() -> list[tuple[str, str]]:
    """(test file, function) for every test security.md names, `…::` resolved per line."""
    refs = []
    last_file = None
    for line in (ROOT / "docs/security.md").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("|"):
            last_file = None  # `…::` refers back within a paragraph or a table cell only
        for match in re.finditer(rf"{_QUALIFIED.pattern}|{_CONTINUED.pattern}", line):
            if match.group(1):
                last_file = match.group(1)
                refs.append((last_file, match.group(2)))
            else:
                assert last_file is not None, f"'…::' without a file before it: {line}"
                refs.append((last_file, match.group(3)))
    return refs


def test_security_doc_names_tests_that_exist() -> None:
    refs = _security_references()
    assert len(refs) > 40
    missing = [f"{file}::{name}" for file, name in refs
               if name not in _functions(TESTS / file)]
    assert missing == []


def test_abuse_table_rows_name_tests_that_exist() -> None:
    text = (ROOT / "docs/security.md").read_text(encoding="utf-8")
    table = text[text.index("## Abuse limits"):text.index("## Known gaps")]
    known = (_functions(TESTS / "integration/test_abuse_limits.py")
             | _functions(TESTS / "unit/test_session.py"))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > 15
    for row in rows[1:]:
        bare = [m.group(1) for m in _BARE.finditer(row)]
        qualified = _QUALIFIED.findall(row) + _CONTINUED.findall(row)
        assert bare or qualified, f"a row without a test: {row}"
        for name in bare:  # qualified names are checked by the test above
            assert name in known, f"{name} (row: {row[:60]}…) does not exist"


@pytest.mark.parametrize("doc", ["docs/security-bad-input.md"])
def test_bad_input_rows_name_tests_that_exist(doc: str) -> None:
    known = _functions(TESTS / "integration/test_bad_input.py")
    rows = [line for line in (ROOT / doc).read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and "---" not in line and not line.startswith("| input")]
    assert len(rows) > 40
    for row in rows:
        names = [m.group(1) for m in _BARE.finditer(row.rsplit("|", 2)[-2])]
        assert names, f"a row without a test: {row}"
        assert all(name in known for name in names), row
