"""Write trust documents as readable TOML, and sign them (what a policy authority does).

Used by the CLI (``coalition keys``), the demo and the tests. Pure: returns bytes; writing files
is the caller's business.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence

import nacl.signing

from broker import crypto
from policies.documents import sign_document
from policies.model import Agreement, Revocation, Scheme, Tier


def _q(text: str) -> str:
    """A TOML basic string (control characters escaped: TOML forbids them raw)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c
                      for c in escaped)
    return f'"{escaped}"'


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def _time(ms: int) -> str:
    """A TOML offset date-time, to the millisecond (seconds only when that is exact)."""
    moment = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{ms % 1000:03d}Z" if ms % 1000 else "Z")


def _key(name: str) -> str:
    """A TOML key, quoted when it is not bare (bare keys are ASCII letters, digits, _ and -)."""
    bare = name.replace("_", "").replace("-", "")
    return name if bare.isascii() and bare.isalnum() else _q(name)


def _inline_cats(cats: Mapping[str, Sequence[str]]) -> str:
    items = ", ".join(f"{_key(tag)} = {_list(sorted(values))}"
                      for tag, values in sorted(cats.items()))
    return f"{{ {items} }}" if items else "{}"


def trust_root_toml(
    *,
    version: int,
    common_scheme: str,
    threshold: int,
    witness_quorum: int,
    nations: Mapping[str, Sequence[bytes]],
    communities: Mapping[str, Sequence[str]] = {},
    brokers: Mapping[str, bytes] = {},
) -> bytes:
    """A trust root document listing nations, communities and brokers."""
    out = [
        "# Coalition trust root: signed by `threshold` of the nations below.",
        f"version = {version}",
        f"common_scheme = {_q(common_scheme)}",
        f"threshold = {threshold}",
        f"witness_quorum = {witness_quorum}",
        "",
    ]
    for code, keys in sorted(nations.items()):
        out += [f"[nations.{code}]",
                f"authority_keys = {_list(crypto.format_key('ed25519', k) for k in keys)}", ""]
    if communities:
        out.append("[communities]")
        out += [f"{name} = {_list(sorted(members))}"
                for name, members in sorted(communities.items())]
        out.append("")
    for name, key in sorted(brokers.items()):
        out += ["[[brokers]]", f"name = {_q(name)}",
                f"key = {_q(crypto.format_key('ed25519', key))}", ""]
    return "\n".join(out).encode()


def node_cert_toml(
    *,
    node: str,
    nation: str,
    sign_key: bytes,
    enc_key: bytes,
    not_before_ms: int,
    not_after_ms: int,
    max_level: str,
    cats: Mapping[str, Sequence[str]] = {},
    serial: int | None = None,
) -> bytes:
    """A node certificate document (``serial``: for a replacement certificate, higher than the
    one it replaces; omitted means 1)."""
    return "\n".join([
        f"# Node certificate for {node}, signed by the {nation} policy authority.",
        f"node = {_q(node)}",
        f"nation = {_q(nation)}",
        *([f"serial = {serial}"] if serial is not None else []),
        f"sign_key = {_q(crypto.format_key('ed25519', sign_key))}",
        f"enc_key = {_q(crypto.format_key('x25519', enc_key))}",
        f"not_before = {_time(not_before_ms)}",
        f"not_after = {_time(not_after_ms)}",
        "",
        "[accreditation]",
        f"max = {_q(max_level)}",
        f"cats = {_inline_cats(cats)}",
        "",
    ]).encode()


def scheme_toml(scheme: Scheme) -> bytes:
    """A scheme document; the common scheme (``identity``) has no ``[equivalence]``."""
    out = [f"# Classification scheme {scheme.name}; levels from low to high.",
           f"scheme = {_q(scheme.name)}",
           *([f"version = {scheme.version}"] if scheme.version != 1 else []),
           f"levels = {_list(scheme.levels)}", ""]
    for tag in sorted(scheme.tags.values(), key=lambda t: t.name):
        out += [f"[tags.{_key(tag.name)}]", f"type = {_q(tag.type)}",
                f"values = {_list(tag.values)}", ""]
    if scheme.identity:
        return "\n".join(out).encode()
    out += ["# Equivalence to the common scheme: anything not listed is unmappable (denied).",
            "[equivalence.levels]"]
    out += [f"{_q(level)} = {_q(scheme.level_map[level])}"
            for level in scheme.levels if level in scheme.level_map]
    out.append("")
    if scheme.tag_map:
        out.append("[equivalence.tags]")
        out += [f"{_key(name)} = {_q(target)}" for name, target in sorted(scheme.tag_map.items())]
        out.append("")
    for name, values in sorted(scheme.value_map.items()):
        out.append(f"[equivalence.values.{_key(name)}]")
        out += [f"{_key(value)} = {_list(sorted(targets))}"
                for value, targets in sorted(values.items())]
        out.append("")
    return "\n".join(out).encode()


def agreement_toml(agreement: Agreement) -> bytes:
    """A data-sharing agreement document (every party must sign it)."""
    out = [f"# Data-sharing agreement {agreement.ref}; signed by every party.",
           f"id = {_q(agreement.id)}", f"version = {agreement.version}",
           f"purpose = {_q(agreement.purpose)}", f"parties = {_list(sorted(agreement.parties))}",
           f"not_before = {_time(agreement.not_before)}",
           f"not_after = {_time(agreement.not_after)}", ""]
    for tier in agreement.tiers:
        out += _tier_lines(tier)
    return "\n".join(out).encode()


def _tier_lines(tier: Tier) -> list[str]:
    lines = ["[[tiers]]", f"name = {_q(tier.name)}", f"members = {_list(sorted(tier.members))}",
             f"ceiling = {_q(tier.ceiling)}"]
    if tier.categories is not None:
        lines.append(f"categories = {_inline_cats(tier.categories)}")
    if tier.topics is not None:
        lines.append(f"topics = {_list(tier.topics)}")
    return [*lines, ""]


def revocations_toml(nation: str, revocations: Iterable[Revocation]) -> bytes:
    """A nation's revocation list (``revocations/NATION.toml``); entries in the order given."""
    out = [f"# Certificates revoked by the {nation} policy authority. Revocations are permanent:",
           "# a broker refuses a later list that drops one.",
           f"nation = {_q(nation)}", ""]
    for r in revocations:
        out += ["[[revoked]]", f"node = {_q(r.node)}",
                f"sign_key = {_q(crypto.format_key('ed25519', r.sign_key))}",
                f"reason = {_q(r.reason)}", f"revoked_at = {_time(r.revoked_at)}", ""]
    return "\n".join(out).encode()


def signature_file(data: bytes, signers: Iterable[tuple[str, nacl.signing.SigningKey]]) -> bytes:
    """The ``.sig`` content for ``data`` signed by each ``(nation, key)``."""
    lines = [sign_document(data, nation, key).to_line() for nation, key in signers]
    return ("\n".join(lines) + "\n").encode()


def add_signature(existing: bytes, data: bytes, nation: str, key: nacl.signing.SigningKey) -> bytes:
    """Append (or replace) ``nation``'s line in a ``.sig`` file's content."""
    line = sign_document(data, nation, key).to_line()
    kept = [old for old in existing.decode().splitlines()
            if old.strip() and old.split(" ", 1)[0] != nation]
    return ("\n".join([*kept, line]) + "\n").encode()
