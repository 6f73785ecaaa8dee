"""``coalition policy check`` and ``coalition policy decide``: authority tooling.

(``coalition policy sign`` lives in :mod:`broker.cli` with ``keys sign``.)
"""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the policy subcommands to ``coalition policy``."""
