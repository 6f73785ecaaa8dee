"""What a new set of policy documents changes against the active one, in an operator's terms.

Pure: two document sets (and the bundles they load to, when they do) in, a JSON-ready report
out; ``coalition policy check --against`` prints it (:mod:`broker.cli_policy`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from broker import crypto
from policies.bundle import Bundle, bundle_hash, document_hash
from policies.documents import SignedDocument

#: Unix time zero, for the CLI's times in milliseconds.
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_T = TypeVar("_T")


def format_ms(ms: int) -> str:
    """Unix milliseconds as an ISO 8601 UTC time (milliseconds shown only when not zero)."""
    moment = EPOCH + dt.timedelta(milliseconds=ms)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


def policy_changes(old_docs: Mapping[str, SignedDocument], old: Bundle | None,
                   new_docs: Mapping[str, SignedDocument], new: Bundle | None) -> dict[str, Any]:
    """What replacing the active documents (``old_docs``) with ``new_docs`` changes: documents
    by hash, and when both bundles load, nations, schemes, nodes, agreements and tiers."""
    out: dict[str, Any] = {
        "policy": {"old": (old.hash if old else bundle_hash(old_docs)).hex(),
                   "new": (new.hash if new else bundle_hash(new_docs)).hex()},
        "documents": _diff(old_docs, new_docs, document_hash),
    }
    if old is None or new is None:
        out["note"] = ("the active policy does not load" if old is None
                       else "the new policy does not load") + "; only documents compared"
        return out
    out["trust_root_version"] = {"old": old.trust_root.version, "new": new.trust_root.version}
    out["nations"] = _diff(old.trust_root.nations, new.trust_root.nations)
    out["schemes"] = _diff(old.schemes, new.schemes)
    out["nodes"] = _diff(old.nodes, new.nodes, detail=True)
    out["agreements"] = _diff({a.id: a for a in old.agreements},
                              {a.id: a for a in new.agreements},
                              key=lambda a: dataclasses.replace(a, tiers=()), detail=True)
    out["tiers"] = _diff(_tiers(old), _tiers(new), detail=True)
    return out


def _tiers(bundle: Bundle) -> dict[str, Any]:
    return {f"{a.id}/{t.name}": t for a in bundle.agreements for t in a.tiers}


def _diff(old: Mapping[str, _T], new: Mapping[str, _T],
          key: Callable[[_T], object] = lambda value: value,
          detail: bool = False) -> dict[str, Any]:
    """Names added, removed, and present in both with a different value (with ``detail``, each
    changed field of those, as ``field old -> new``)."""
    changed = sorted(n for n in set(old) & set(new) if key(old[n]) != key(new[n]))
    out: dict[str, Any] = {"added": sorted(set(new) - set(old)),
                           "removed": sorted(set(old) - set(new)), "changed": changed}
    if detail:
        out["details"] = {name: _field_changes(old[name], new[name]) for name in changed}
    return out


def _field_changes(old: Any, new: Any) -> list[str]:
    """The compared fields of two dataclass values that differ (an agreement's tiers are
    reported as tiers)."""
    return [f"{f.name} {_show(f.name, getattr(old, f.name))} -> "
            f"{_show(f.name, getattr(new, f.name))}"
            for f in dataclasses.fields(old)
            if f.compare and f.name != "tiers" and getattr(old, f.name) != getattr(new, f.name)]


def _show(name: str, value: Any) -> str:
    if value is None:
        return "(none: any)"
    if isinstance(value, bytes):
        return f"key {crypto.key_id(value)}"
    if isinstance(value, int) and name.startswith("not_"):
        return format_ms(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(name, v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(name, v)}" for k, v in sorted(value.items())) + "}"
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join(f"{f.name}: {_show(f.name, getattr(value, f.name))}"
                               for f in dataclasses.fields(value)) + "}"
    return str(value)
