"""The pure core imports no I/O: walk the imports of every pure module (DESIGN §2)."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PURE = [
    "broker.canonical", "broker.wire", "broker.envelope", "broker.session", "broker.router",
    "broker.crypto", "broker.replay", "broker.delivery", "broker.errors",
    "broker.audit.merkle", "broker.audit.note", "broker.audit.leaves", "broker.audit.witness",
    "broker.release", "broker.sigbatch", "broker.wsframe",
    "policies.model", "policies.documents", "policies.bundle", "policies.decide",
    "policies.authoring", "policies.catalogue",
]
FORBIDDEN = {"asyncio", "aiohttp", "sqlite3", "structlog", "pathlib", "socket", "shutil",
             "subprocess", "tempfile", "uvloop", "time"}
PROJECT = ("broker", "clients", "policies")


def imports_of(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_module(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ModuleNotFoundError, AttributeError):
        return False  # an attribute import such as broker.errors.ProtocolError
    return spec is not None and bool(spec.origin) and str(spec.origin).endswith(".py")


def closure(module: str) -> set[str]:
    """Every module imported by ``module``, following project-internal imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imports_of(current):
            if name.split(".")[0] not in PROJECT:
                seen.add(name)
            elif is_module(name):
                todo.append(name)
    return seen


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    bad = {name for name in closure(module) if name.split(".")[0] in FORBIDDEN}
    assert not bad, f"{module} reaches {sorted(bad)}"
