"""What the fuzz targets parse against: the committed demo coalition (``policies/examples``).

The targets need a trust root, a common scheme and authority keys that stay the same from one
input to the next, so that a mutated document can be re-signed and reach the checks behind the
signatures. The demo coalition provides all of it, with its throwaway trial keys, and is
read once per process.

Also here: :func:`dump_toml`, a small TOML writer (inline tables only) so a mutated document
table can be written back, and :func:`sign_all`, the ``.sig`` file of every demo authority.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nacl.signing

import policies
from broker.audit.note import SIG_COSIGNATURE_V1, Verifier
from clients.identity import KeyFile
from policies import authoring
from policies.bundle import Bundle, build_bundle
from policies.documents import SignedDocument
from policies.loader import read_policy_dir
from policies.model import Scheme, TrustRoot

EXAMPLES = Path(policies.__file__).resolve().parent / "examples"
CORE_DOCUMENTS = ("agreements/ATLANTIC-SHIELD.toml", "nodes/FRA-GW1.toml", "schemes/FRA.toml",
                  "schemes/NATO.toml", "trust-root.toml")


@dataclasses.dataclass(frozen=True)
class Context:
    """The demo coalition, verified, with its keys."""

    documents: Mapping[str, SignedDocument]
    bundle: Bundle
    authorities: Mapping[str, nacl.signing.SigningKey]
    nodes: Mapping[str, KeyFile]
    broker: KeyFile

    @property
    def root(self) -> TrustRoot:
        """The demo trust root."""
        return self.bundle.trust_root

    @property
    def common(self) -> Scheme:
        """The demo common scheme (NATO)."""
        common = self.bundle.common_scheme
        assert common is not None
        return common

    @property
    def names(self) -> tuple[str, ...]:
        """Document names, sorted (the index a ``bundle_document`` input selects from)."""
        return tuple(sorted(self.documents))

    @property
    def core_names(self) -> tuple[str, ...]:
        """One document of each kind that still make a bundle together (FRA's scheme maps a
        tag of its own): the base ``bundle_document`` replaces one of."""
        return CORE_DOCUMENTS

    def log_verifier(self) -> Verifier:
        """The broker's checkpoint key, as the trust root lists it."""
        return Verifier(self.broker.name, self.broker.sign_public)

    def witness_verifiers(self) -> list[Verifier]:
        """Every demo node's key as a ``cosignature/v1`` witness."""
        return [Verifier(node, key.sign_public, SIG_COSIGNATURE_V1)
                for node, key in sorted(self.nodes.items())]


@functools.cache
def context() -> Context:
    """Read and verify the demo coalition once."""
    documents = read_policy_dir(EXAMPLES)
    bundle = build_bundle(documents, pinned_root_sha256=None)
    keys = {path.stem: KeyFile.read(path) for path in sorted((EXAMPLES / "keys").glob("*.key"))}
    authorities = {name.removeprefix("authority-"): key.signing_key
                   for name, key in keys.items() if key.kind == "authority"}
    nodes = {name: key for name, key in keys.items() if key.kind == "node"}
    return Context(documents=documents, bundle=bundle, authorities=authorities, nodes=nodes,
                   broker=keys["broker"])


def sign_all(data: bytes) -> bytes:
    """The ``.sig`` file of ``data`` signed by every demo authority (enough for any rule)."""
    return authoring.signature_file(data, sorted(context().authorities.items()))


# --- a small TOML writer --------------------------------------------------------------------


def _string(text: str) -> str:
    """A TOML basic string; quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    return text if any(c in text for c in ".en") else text + ".0"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def dump_toml(table: Mapping[str, Any]) -> bytes:
    """``table`` as TOML, every top-level key one ``"key" = value`` line (tables inline).

    ``tomllib.loads(dump_toml(t)) == t`` for every table ``tomllib`` can produce (NaN aside:
    it is never equal to itself).
    """
    return "".join(f"{_string(k)} = {_value(v)}\n" for k, v in table.items()).encode()
