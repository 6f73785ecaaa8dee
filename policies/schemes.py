"""Classification scheme documents: parse, check the equivalence, verify the signatures.

The common scheme (named by ``trust_root.common_scheme``) is signed by the trust root's
threshold and is its own identity. A national scheme (``scheme`` = the nation's code) is signed by
that nation and maps to the common scheme through ``[equivalence]``::

    [equivalence.levels]            # national level -> common level; unlisted = unmappable
    "OFFICIAL-SENSITIVE" = "RESTRICTED"
    [equivalence.tags]              # optional: national tag -> common tag (default: same name)
    BESOIN = "NTK"
    [equivalence.values.BESOIN]     # national value -> common values; unlisted = unmappable
    ALPHA = ["ALPHA"]

Refusals name the document and the field. Pure: bytes in, model out.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from typing import Any

from broker.errors import PolicyDocumentError
from policies.documents import (
    SignedDocument,
    field,
    name_list,
    ordered_list,
    parse_sig_file,
    parse_toml,
    table_field,
    valid_signers,
    verify_signed_by,
)
from policies.model import TAG_TYPES, Accreditation, NodeCert, Scheme, Tag, TrustRoot

TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}\Z")


def parse_scheme_body(doc: SignedDocument) -> tuple[Scheme, dict[str, Any]]:
    """Parse name, levels and tags (no equivalence, no signatures); also return the TOML table."""
    table = parse_toml(doc)
    name = doc.name
    scheme_name = field(table, "scheme", str, name)
    version = field(table, "version", int, name) if "version" in table else 1
    if not 1 <= version < 1 << 53:
        raise PolicyDocumentError("field 'version' must be a positive integer", document=name)
    levels = ordered_list(field(table, "levels", list, name), name, "levels")
    tags: dict[str, Tag] = {}
    for tag, entry in table_field(table, "tags", name).items():
        where = f"tags.{tag}"
        if not TAG_RE.match(tag):
            raise PolicyDocumentError(f"field '{where}': bad tag name", document=name)
        if not isinstance(entry, dict):
            raise PolicyDocumentError(f"field '{where}' must be a table", document=name)
        kind = field(entry, "type", str, name, f"{where}.")
        if kind not in TAG_TYPES:
            raise PolicyDocumentError(
                f"field '{where}.type' must be one of {', '.join(TAG_TYPES)}", document=name)
        values = ordered_list(field(entry, "values", list, name, f"{where}."), name,
                              f"{where}.values")
        tags[tag] = Tag(name=tag, type=kind, values=tuple(sorted(values)))
    return Scheme(name=scheme_name, levels=levels, tags=tags, version=version), table


def verify_common_scheme(doc: SignedDocument, root: TrustRoot) -> Scheme:
    """The common scheme: named by the root, no equivalence, signed by the root's threshold."""
    scheme, table = parse_scheme_body(doc)
    if scheme.name != root.common_scheme:
        raise PolicyDocumentError(
            f"field 'scheme': {scheme.name} is not the common scheme {root.common_scheme}",
            document=doc.name)
    if "equivalence" in table:
        raise PolicyDocumentError("field 'equivalence': the common scheme maps to itself",
                                  document=doc.name)
    _check_threshold(doc, root)
    return dataclasses.replace(scheme, identity=True)


def verify_national_scheme(doc: SignedDocument, root: TrustRoot, common: Scheme) -> Scheme:
    """A nation's scheme: a known nation, a valid equivalence, signed by that nation."""
    scheme, table = parse_scheme_body(doc)
    if scheme.name not in root.nations:
        raise PolicyDocumentError(
            f"field 'scheme': {scheme.name} is not a nation of the trust root", document=doc.name)
    equivalence = table_field(table, "equivalence", doc.name)
    if "levels" not in equivalence:
        raise PolicyDocumentError("field 'equivalence.levels' is missing", document=doc.name)
    level_map = _level_map(equivalence, scheme, common, doc.name)
    tag_map = _tag_map(equivalence, scheme, common, doc.name)
    value_map = _value_map(equivalence, scheme, common, tag_map, doc.name)
    verify_signed_by(doc, [scheme.name], root.nations)
    return dataclasses.replace(scheme, level_map=level_map, tag_map=tag_map,
                               value_map=value_map)


def _check_threshold(doc: SignedDocument, root: TrustRoot) -> None:
    present = valid_signers(doc.data, parse_sig_file(doc.sig, document=doc.name), root.nations)
    if len(present) < root.threshold:
        missing = sorted(set(root.nations) - present)
        raise PolicyDocumentError(
            f"{len(present)} valid signature(s), threshold is {root.threshold}; "
            f"not signed by {', '.join(missing)}", document=doc.name, code="unsigned")


def _level_map(equivalence: Mapping[str, Any], scheme: Scheme, common: Scheme,
               doc: str) -> dict[str, str]:
    """Level equivalence: known levels on both sides, and monotone (order never inverts)."""
    table = table_field(equivalence, "levels", doc, "equivalence.")
    out: dict[str, str] = {}
    for level, target in table.items():
        where = f"equivalence.levels.{level}"
        if level not in scheme.levels:
            raise PolicyDocumentError(f"field '{where}': {level!r} is not a level of this scheme",
                                      document=doc)
        if not isinstance(target, str) or target not in common.levels:
            raise PolicyDocumentError(
                f"field '{where}': {target!r} is not a level of the common scheme {common.name}",
                document=doc)
        out[level] = target
    # A higher national level must never map below a lower one, or a label could be released
    # to a tier whose ceiling the sender's own scheme considers too low.
    mapped = [level for level in scheme.levels if level in out]
    for lower, higher in itertools.pairwise(mapped):
        if common.levels.index(out[higher]) < common.levels.index(out[lower]):
            raise PolicyDocumentError(
                f"field 'equivalence.levels.{higher}': maps to {out[higher]}, below "
                f"{out[lower]} of the lower level {lower} (the equivalence must keep the order)",
                document=doc)
    return out


def _tag_map(equivalence: Mapping[str, Any], scheme: Scheme, common: Scheme,
             doc: str) -> dict[str, str]:
    """Tag equivalence: explicit ``[equivalence.tags]``, else the same-named common tag."""
    explicit = table_field(equivalence, "tags", doc, "equivalence.")
    out: dict[str, str] = {}
    for tag, target in explicit.items():
        where = f"equivalence.tags.{tag}"
        if tag not in scheme.tags:
            raise PolicyDocumentError(f"field '{where}': unknown tag {tag!r}", document=doc)
        if not isinstance(target, str) or target not in common.tags:
            raise PolicyDocumentError(
                f"field '{where}': {target!r} is not a tag of the common scheme", document=doc)
        out[tag] = target
    for tag in scheme.tags:
        if tag not in out and tag in common.tags:
            out[tag] = tag
    for tag, target in out.items():
        if scheme.tags[tag].type != common.tags[target].type:
            raise PolicyDocumentError(
                f"field 'equivalence.tags.{tag}': a {scheme.tags[tag].type} tag cannot map to "
                f"the {common.tags[target].type} common tag {target}", document=doc)
    # Two national tags on one common tag would merge their values; for a permissive tag that
    # widens "one of each" into "one of either", so it is refused.
    targets = list(out.values())
    for target in sorted({t for t in targets if targets.count(t) > 1}):
        sources = sorted(t for t, v in out.items() if v == target)
        raise PolicyDocumentError(
            f"field 'equivalence.tags': {', '.join(sources)} all map to {target}", document=doc)
    return out


def _value_map(equivalence: Mapping[str, Any], scheme: Scheme, common: Scheme,
               tag_map: Mapping[str, str], doc: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """Value equivalence: known national values to non-empty sets of known common values."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for tag, entries in table_field(equivalence, "values", doc, "equivalence.").items():
        where = f"equivalence.values.{tag}"
        if tag not in scheme.tags:
            raise PolicyDocumentError(f"field '{where}': unknown tag {tag!r}", document=doc)
        if tag not in tag_map:
            raise PolicyDocumentError(
                f"field '{where}': tag {tag} does not map to a common tag", document=doc)
        if not isinstance(entries, dict):
            raise PolicyDocumentError(f"field '{where}' must be a table", document=doc)
        common_tag = common.tags[tag_map[tag]]
        mapped: dict[str, tuple[str, ...]] = {}
        for value, targets in entries.items():
            if value not in scheme.tags[tag].values:
                raise PolicyDocumentError(f"field '{where}': unknown value {value!r}",
                                          document=doc)
            # An empty target would silently drop a restriction: leave the value unlisted
            # (unmappable) instead.
            if not targets:
                raise PolicyDocumentError(
                    f"field '{where}.{value}' maps to nothing; omit it to leave it unmappable",
                    document=doc)
            names = name_list(targets, doc, f"{where}.{value}")
            unknown = [v for v in names if v not in common_tag.values]
            if unknown:
                raise PolicyDocumentError(
                    f"field '{where}.{value}': {unknown} not values of common tag "
                    f"{common_tag.name}", document=doc)
            mapped[value] = names
        out[tag] = mapped
    return out


def check_accreditation(cert: NodeCert, scheme: Scheme, doc: str) -> None:
    """Refuse a certificate whose accreditation is not expressed in its nation's scheme."""
    acc: Accreditation = cert.accreditation
    if acc.max not in scheme.levels:
        raise PolicyDocumentError(
            f"field 'accreditation.max': {acc.max!r} is not a level of scheme {scheme.name}",
            document=doc)
    for tag, values in acc.cats.items():
        if tag not in scheme.tags:
            raise PolicyDocumentError(
                f"field 'accreditation.cats.{tag}': unknown tag in scheme {scheme.name}",
                document=doc)
        unknown = [v for v in values if v not in scheme.tags[tag].values]
        if unknown:
            raise PolicyDocumentError(
                f"field 'accreditation.cats.{tag}': unknown value(s) {unknown}", document=doc)
