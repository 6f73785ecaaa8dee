"""``coalition audit export | verify | prove``: the auditor's command line."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the audit subcommands to ``coalition audit``."""
