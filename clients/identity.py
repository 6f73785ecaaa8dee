"""Private key files: nation authorities, gateway nodes and brokers.

A key file is a small TOML file, written with mode 0600, that holds a 32-byte Ed25519 seed
and, for nodes, a 32-byte X25519 private key. Public keys are derived, never stored, so a file
cannot disagree with itself.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import nacl.public
import nacl.signing

from broker import crypto
from broker.errors import ConfigError

KINDS = ("authority", "node", "broker")


@dataclasses.dataclass(frozen=True)
class KeyFile:
    """The content of a private key file."""

    kind: str
    name: str
    signing_key: nacl.signing.SigningKey
    enc_key: nacl.public.PrivateKey | None = None

    @classmethod
    def generate(cls, kind: str, name: str) -> KeyFile:
        """Fresh random keys (an X25519 key too for nodes)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        enc = nacl.public.PrivateKey.generate() if kind == "node" else None
        return cls(kind=kind, name=name, signing_key=nacl.signing.SigningKey.generate(),
                   enc_key=enc)

    @property
    def sign_public(self) -> bytes:
        return crypto.public_bytes(self.signing_key)

    @property
    def enc_public(self) -> bytes:
        if self.enc_key is None:
            raise ValueError(f"a {self.kind} key has no encryption key")
        return crypto.public_bytes(self.enc_key)

    def to_toml(self) -> str:
        lines = [
            "# Coalition Broker private key. Keep secret; never commit or log it.",
            f'kind = "{self.kind}"',
            f'name = "{self.name}"',
            f'ed25519_seed = "{crypto.b64encode(bytes(self.signing_key))}"',
        ]
        if self.enc_key is not None:
            lines.append(f'x25519_private = "{crypto.b64encode(bytes(self.enc_key))}"')
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Write with mode 0600, refusing to overwrite an existing key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.to_toml())

    @classmethod
    def read(cls, path: Path) -> KeyFile:
        """Read and validate a key file; errors name the file and never echo key material."""
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"key file {path} is not valid TOML") from exc
        kind, name = table.get("kind"), table.get("name")
        if kind not in KINDS or not isinstance(name, str) or not name:
            raise ConfigError(f"key file {path}: needs kind (one of {KINDS}) and name")
        seed = _secret(table, "ed25519_seed", path)
        enc = _secret(table, "x25519_private", path) if kind == "node" else None
        return cls(kind=kind, name=name, signing_key=nacl.signing.SigningKey(seed),
                   enc_key=nacl.public.PrivateKey(enc) if enc is not None else None)


def _secret(table: dict[str, object], key: str, path: Path) -> bytes:
    value = table.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"key file {path}: field '{key}' is missing")
    try:
        raw = crypto.b64decode(value, what=key)
    except ValueError as exc:
        raise ConfigError(f"key file {path}: field '{key}' is not base64") from exc
    if len(raw) != crypto.KEY_BYTES:
        raise ConfigError(f"key file {path}: field '{key}' must be 32 bytes")
    return raw
