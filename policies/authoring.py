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


def _q(text: str) -> str:
    """A TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _list(values: Iterable[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def _time(ms: int) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(name: str) -> str:
    """A TOML key, quoted when it is not bare."""
    return name if name.replace("_", "").replace("-", "").isalnum() else _q(name)


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
) -> bytes:
    """A node certificate document."""
    cat_items = ", ".join(f"{_key(tag)} = {_list(sorted(values))}"
                          for tag, values in sorted(cats.items()))
    return "\n".join([
        f"# Node certificate for {node}, signed by the {nation} policy authority.",
        f"node = {_q(node)}",
        f"nation = {_q(nation)}",
        f"sign_key = {_q(crypto.format_key('ed25519', sign_key))}",
        f"enc_key = {_q(crypto.format_key('x25519', enc_key))}",
        f"not_before = {_time(not_before_ms)}",
        f"not_after = {_time(not_after_ms)}",
        "",
        "[accreditation]",
        f"max = {_q(max_level)}",
        f"cats = {{ {cat_items} }}" if cat_items else "cats = {}",
        "",
    ]).encode()


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
