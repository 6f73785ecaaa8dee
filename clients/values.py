"""What the gateway client hands the application: receipts, verified messages, route plans,
expiry notices, and :func:`label` to build a label from plain lists. Plain frozen values, no
I/O (re-exported by :mod:`clients.gateway`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from broker import canonical
from policies.model import Label


@dataclasses.dataclass(frozen=True)
class Receipt:
    """The broker's answer to a publish: status per candidate recipient, and the audit index."""

    id: bytes
    audit: int
    recipients: Mapping[str, str]

    @property
    def delivered(self) -> list[str]:
        return sorted(n for n, s in self.recipients.items() if s == "delivered")

    @property
    def queued(self) -> list[str]:
        return sorted(n for n, s in self.recipients.items() if s == "queued")

    @property
    def denied(self) -> dict[str, list[str]]:
        """Denied recipients and their reason codes."""
        return {n: s.removeprefix("denied:").split(",")
                for n, s in self.recipients.items() if s.startswith("denied:")}


@dataclasses.dataclass(frozen=True)
class Message:
    """A verified, decrypted delivery."""

    id: bytes
    sender: str
    nation: str
    topic: str
    label: Label
    precedence: int
    ts: int
    payload: bytes
    seq: int


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """The dry-run answer: status per candidate (``permit``/``deny:…``) and keys to seal to."""

    recipients: Mapping[str, str]
    keys: Mapping[str, bytes]
    #: Destination nation → label catalogue (highest level, releasable categories), if asked.
    catalogue: Mapping[str, Any] | None = None

    @property
    def permitted(self) -> list[str]:
        return sorted(n for n, s in self.recipients.items() if s == "permit")


@dataclasses.dataclass(frozen=True)
class Expired:
    """The broker's notice that a message this gateway sent expired before ``recipient`` got
    it."""

    id: bytes
    recipient: str


def label(policy: str, cls: str, orig: str, rel: list[str] | tuple[str, ...] = (),
          cats: Mapping[str, list[str]] | None = None) -> Label:
    """Convenience: build a :class:`Label` with canonical sets from plain lists."""
    cat_map: dict[str, Any] = {t: canonical.canonical_set(list(v)) for t, v in (cats or {}).items()}
    return Label.from_map({"policy": policy, "class": cls, "orig": orig,
                           "rel": canonical.canonical_set(list(rel)), "cats": cat_map})
