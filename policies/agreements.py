"""Data-sharing agreement documents: parse, check against the trust root and the common scheme,
verify that **every** party signed.

Shape (``agreements/ID.toml``)::

    id = "ATLANTIC-SHIELD"
    version = 3
    purpose = "Maritime situational awareness, North Atlantic"
    parties = ["FRA", "GBR", "POL", "USA"]
    not_before = 2026-01-01T00:00:00Z          # inclusive
    not_after = 2027-01-01T00:00:00Z           # exclusive
    [[tiers]]
    name = "core"
    members = ["FRA", "GBR", "USA"]
    ceiling = "SECRET"                         # a level of the common scheme
    topics = ["maritime.>"]                    # optional; absent = any topic
    [[tiers]]
    name = "partners"
    members = ["POL"]
    ceiling = "RESTRICTED"
    categories = { NTK = [] }                  # optional allow-list per restrictive common tag

Refusals name the document, the field and (for signatures) the missing signer. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker import router
from broker.errors import PolicyDocumentError, ProtocolError
from policies.documents import (
    NATION_RE,
    SignedDocument,
    field,
    name_list,
    parse_toml,
    timestamp_ms,
    verify_signed_by,
)
from policies.model import RESTRICTIVE, Agreement, Scheme, Tier, TrustRoot

AGREEMENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_TIER_KEYS = frozenset({"name", "members", "ceiling", "categories", "topics"})


def parse_agreement(doc: SignedDocument, common: Scheme) -> Agreement:
    """Parse an agreement and check its tiers against the common scheme (no signatures, no
    trust-root checks: see :func:`verify_agreement`)."""
    table = parse_toml(doc)
    name = doc.name
    ident = field(table, "id", str, name)
    if not AGREEMENT_ID_RE.match(ident):
        raise PolicyDocumentError(f"field 'id': {ident!r} is not a valid agreement id",
                                  document=name)
    version = field(table, "version", int, name)
    if version < 1:
        raise PolicyDocumentError("field 'version' must be ≥ 1", document=name)
    parties = name_list(field(table, "parties", list, name), name, "parties", NATION_RE)
    if not parties:
        raise PolicyDocumentError("field 'parties' is empty", document=name)
    not_before = timestamp_ms(table, "not_before", name)
    not_after = timestamp_ms(table, "not_after", name)
    if not_after <= not_before:
        raise PolicyDocumentError("field 'not_after' must be later than not_before",
                                  document=name)
    entries = field(table, "tiers", list, name)
    if not entries:
        raise PolicyDocumentError("field 'tiers' is empty", document=name)
    tiers = tuple(_tier(entry, index, common, name) for index, entry in enumerate(entries))
    names = [t.name for t in tiers]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        raise PolicyDocumentError(f"field 'tiers': two tiers named {duplicate!r}", document=name)
    purpose = table.get("purpose", "")
    if not isinstance(purpose, str):
        raise PolicyDocumentError("field 'purpose' must be str", document=name)
    return Agreement(id=ident, version=version, purpose=purpose, parties=parties,
                     not_before=not_before, not_after=not_after, tiers=tiers)


def verify_agreement(doc: SignedDocument, root: TrustRoot, common: Scheme) -> Agreement:
    """Parse an agreement, check every party and member is known, and that every party signed."""
    agreement = parse_agreement(doc, common)
    unknown = [p for p in agreement.parties if p not in root.nations]
    if unknown:
        raise PolicyDocumentError(
            f"field 'parties': {', '.join(unknown)} not a nation of the trust root",
            document=doc.name)
    for index, tier in enumerate(agreement.tiers):
        where = f"tiers[{index}].members"
        strangers = [m for m in tier.members if m not in root.nations]
        if strangers:
            raise PolicyDocumentError(
                f"field '{where}': {', '.join(strangers)} not a nation of the trust root",
                document=doc.name)
        outsiders = [m for m in tier.members if m not in agreement.parties]
        if outsiders:
            raise PolicyDocumentError(
                f"field '{where}': {', '.join(outsiders)} not a party to the agreement",
                document=doc.name)
    verify_signed_by(doc, agreement.parties, root.nations)
    return agreement


def _tier(entry: Any, index: int, common: Scheme, doc: str) -> Tier:
    where = f"tiers[{index}]."
    if not isinstance(entry, dict):
        raise PolicyDocumentError(f"field 'tiers[{index}]' must be a table", document=doc)
    unknown = sorted(set(entry) - _TIER_KEYS)
    if unknown:
        # A misspelt "categories" or "topics" would silently widen the tier: refuse it.
        raise PolicyDocumentError(f"field '{where}{unknown[0]}' is not a tier field",
                                  document=doc)
    name = field(entry, "name", str, doc, where)
    members = name_list(field(entry, "members", list, doc, where), doc, f"{where}members",
                        NATION_RE)
    if not members:
        raise PolicyDocumentError(f"field '{where}members' is empty", document=doc)
    ceiling = field(entry, "ceiling", str, doc, where)
    if ceiling not in common.levels:
        raise PolicyDocumentError(
            f"field '{where}ceiling': {ceiling!r} is not a level of the common scheme "
            f"{common.name}", document=doc)
    categories = (_categories(entry["categories"], common, doc, f"{where}categories")
                  if "categories" in entry else None)
    topics = (_topics(entry["topics"], doc, f"{where}topics") if "topics" in entry else None)
    return Tier(name=name, members=members, ceiling=ceiling, categories=categories,
                topics=topics)


def _categories(value: Any, common: Scheme, doc: str,
                where: str) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise PolicyDocumentError(f"field '{where}' must be a table of tag = [values]",
                                  document=doc)
    out: dict[str, tuple[str, ...]] = {}
    for tag, values in value.items():
        spec = common.tags.get(tag)
        if spec is None or spec.type != RESTRICTIVE:
            raise PolicyDocumentError(
                f"field '{where}.{tag}': not a restrictive tag of the common scheme",
                document=doc)
        names = name_list(values, doc, f"{where}.{tag}")
        unknown = [v for v in names if v not in spec.values]
        if unknown:
            raise PolicyDocumentError(f"field '{where}.{tag}': unknown value(s) {unknown}",
                                      document=doc)
        out[tag] = names
    return out


def _topics(value: Any, doc: str, where: str) -> tuple[str, ...]:
    patterns = name_list(value, doc, where)
    for pattern in patterns:
        try:
            router.validate_pattern(pattern)
        except ProtocolError as exc:
            raise PolicyDocumentError(f"field '{where}': {exc.reason}", document=doc) from exc
    return patterns
