"""C2SP signed notes, transparency-log checkpoints and ``cosignature/v1`` witness cosignatures.

Pure: no I/O, no clock (callers pass timestamps). Formats, per c2sp.org:

* signed-note: ``text`` (ends in a newline), a blank line, then one line per signature,
  ``"— <key name> base64(uint32 key ID || signature)"``. Key ID = ``SHA-256(name || "\\n" ||
  type || public key)[:4]``; type 0x01 is Ed25519 over the text. Verifier keys are written
  ``<name>+<hex8 key ID>+base64(type || public key)``.
* tlog-checkpoint: the text is ``origin``, the decimal tree size, the base64 root hash, then
  optional non-empty extension lines, each ending in a newline.
* tlog-cosignature (Ed25519, type 0x04): the signature is ``uint64 timestamp || Ed25519 sig``
  over ``"cosignature/v1\\ntime <timestamp>\\n" || checkpoint text``.

Errors: malformed untrusted text raises :class:`ProtocolError` (``too_large`` for size limits);
signatures that do not verify raise :class:`VerificationError`; bad arguments from our own code
(a key name with a space, text without a final newline) raise :class:`ValueError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.errors import ProtocolError, VerificationError

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
#: Parsing limits (the spec requires accepting at least 16 signatures).
MAX_NOTE_SIZE = 1 << 20
MAX_SIGNATURES = 100
MAX_TIMESTAMP = (1 << 63) - 1
#: Capped so a tree size always fits a signed 64-bit integer (SQLite INTEGER, msgpack int64).
MAX_TREE_SIZE = (1 << 63) - 1
COSIGNATURE_V1_HEADER = "cosignature/v1\n"

_SIG_PREFIX = "— "  # em dash U+2014, space
_ED25519_SIG_SIZE = 64
_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # ASCII only: int() would also take "+1", "1_0", "١"
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError(reason)


def _check_chars(text: str, what: str) -> None:
    """Valid UTF-8 (no lone surrogates) and no ASCII control character except newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None
    if any(ord(ch) < 0x20 and ch != "\n" for ch in text):
        raise ValueError(f"{what} contains an ASCII control character")


def _check_key_name(name: str) -> None:
    if not name or "+" in name or any(ch.isspace() for ch in name):
        raise ValueError(f"invalid key name {name!r}: empty, or contains a space or '+'")
    _check_chars(name, "key name")


def _b64decode(data: str, what: str) -> bytes:
    """Strict standard base64: padded, no whitespace, canonical (so one value has one line)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != data:
        raise _malformed(f"{what} is not canonical base64")
    return raw


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def key_id(name: str, sig_type: int, public_key: bytes) -> int:
    """Return the key ID ``SHA-256(name || 0x0A || sig_type || public_key)[:4]`` as a uint32."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


def cosignature_message(checkpoint_text: str, timestamp: int) -> bytes:
    """Return the bytes a ``cosignature/v1`` witness signs for ``checkpoint_text`` at a time."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp {timestamp} is outside 0..2^63-1")
    return f"{COSIGNATURE_V1_HEADER}time {timestamp}\n{checkpoint_text}".encode()


@dataclass(frozen=True)
class Verifier:
    """A public key that verifies note signatures of one type (0x01 note, 0x04 cosignature)."""

    name: str
    public_key: bytes
    sig_type: int = SIG_ED25519

    def __post_init__(self) -> None:
        _check_key_name(self.name)
        if self.sig_type not in (SIG_ED25519, SIG_COSIGNATURE_V1):
            raise ValueError(f"unsupported signature type {self.sig_type:#04x}")
        if len(self.public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> int:
        """The uint32 key ID that signature lines by this key carry."""
        return key_id(self.name, self.sig_type, self.public_key)

    @classmethod
    def from_string(cls, vkey: str) -> Verifier:
        """Parse a verifier key ``<name>+<hex8 key ID>+base64(type || key)``; check its ID."""
        # The name cannot contain '+', but base64 can: split at the first two only.
        parts = vkey.split("+", 2)
        if len(parts) != 3 or not _HEX8.fullmatch(parts[1]):
            raise _malformed("verifier key is not <name>+<hex8>+<base64>")
        name, hex_id, key64 = parts
        raw = _b64decode(key64, "verifier key data")
        if len(raw) != 33 or raw[0] not in (SIG_ED25519, SIG_COSIGNATURE_V1):
            raise _malformed("verifier key data is not type 0x01 or 0x04 and a 32-byte key")
        try:
            verifier = cls(name, raw[1:], raw[0])
        except ValueError as exc:
            raise _malformed(f"verifier key: {exc}") from None
        if verifier.key_id != int(hex_id, 16):
            raise _malformed(f"verifier key ID {hex_id} does not match its name and key")
        return verifier

    def to_string(self) -> str:
        """Return the verifier key string ``<name>+<hex8 key ID>+base64(type || key)``."""
        data = _b64encode(bytes([self.sig_type]) + self.public_key)
        return f"{self.name}+{self.key_id:08x}+{data}"

    def verify(self, text: str, signature: bytes) -> bool:
        """Report whether ``signature`` (the bytes after the key ID) signs note ``text``."""
        try:
            message = text.encode()
        except UnicodeEncodeError:  # a lone surrogate: no valid note has this text
            return False
        if self.sig_type == SIG_COSIGNATURE_V1:
            if len(signature) != 8 + _ED25519_SIG_SIZE:
                return False
            timestamp = int.from_bytes(signature[:8], "big")
            if timestamp > MAX_TIMESTAMP:
                return False
            message, signature = cosignature_message(text, timestamp), signature[8:]
        if len(signature) != _ED25519_SIG_SIZE:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class _Ed25519Key:
    """A named Ed25519 private key; subclasses fix the signature type."""

    sig_type: ClassVar[int]

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        _check_key_name(name)
        self.name = name
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id(name, self.sig_type, self.public_key)

    @classmethod
    def generate(cls, name: str) -> Self:
        """Return a signer with a fresh random key."""
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Self:
        """Return a signer for the 32-byte Ed25519 seed (RFC 8032 private key)."""
        return cls(name, Ed25519PrivateKey.from_private_bytes(seed))

    def verifier(self) -> Verifier:
        """Return the matching public verifier."""
        return Verifier(self.name, self.public_key, self.sig_type)

    def __repr__(self) -> str:  # never show key material
        return f"{type(self).__name__}({self.verifier().to_string()!r})"


class Signer(_Ed25519Key):
    """A note signer: Ed25519 over the note text (type 0x01)."""

    sig_type = SIG_ED25519

    def sign(self, text: str) -> NoteSignature:
        """Return this key's signature over note ``text``."""
        _check_text(text)
        return NoteSignature(self.name, self.key_id, self._key.sign(text.encode()))


class Cosigner(_Ed25519Key):
    """A witness key producing ``cosignature/v1`` signatures (type 0x04)."""

    sig_type = SIG_COSIGNATURE_V1

    def cosign(self, checkpoint_text: str, timestamp: int) -> NoteSignature:
        """Cosign ``checkpoint_text`` (a checkpoint note's text) as of ``timestamp`` (seconds)."""
        Checkpoint.from_text(checkpoint_text)  # a witness only ever vouches for a checkpoint
        message = cosignature_message(checkpoint_text, timestamp)
        signature = timestamp.to_bytes(8, "big") + self._key.sign(message)
        return NoteSignature(self.name, self.key_id, signature)


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, key ID, and the signature bytes after the key ID."""

    name: str
    key_id: int
    signature: bytes

    def to_line(self) -> str:
        """Return the line without its final newline: ``— <name> base64(id || signature)``."""
        data = _b64encode(self.key_id.to_bytes(4, "big") + self.signature)
        return f"{_SIG_PREFIX}{self.name} {data}"

    @property
    def timestamp(self) -> int:
        """The timestamp of a ``cosignature/v1`` signature (meaningless for other types)."""
        if len(self.signature) < 8:
            raise _malformed("signature too short to carry a timestamp")
        return int.from_bytes(self.signature[:8], "big")


@dataclass(frozen=True)
class Note:
    """A parsed, not yet verified, signed note."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def to_string(self) -> str:
        """Serialize: text, blank line, one signature line each."""
        return self.text + "\n" + "".join(sig.to_line() + "\n" for sig in self.signatures)


@dataclass(frozen=True)
class VerifiedNote:
    """A note whose signatures by known keys all verified (at least one)."""

    text: str
    verified: tuple[NoteSignature, ...]
    unverified: tuple[NoteSignature, ...]  # by unknown keys: ignored, kept for re-serializing

    def signed_by(self, verifier: Verifier) -> NoteSignature | None:
        """Return the verified signature by ``verifier``, if any."""
        for sig in self.verified:
            if (sig.name, sig.key_id) == (verifier.name, verifier.key_id):
                return sig
        return None


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise ValueError("note text must end with a newline")
    _check_chars(text, "note text")


def parse_signature_line(line: str) -> NoteSignature:
    """Parse one signature line (a single trailing newline is allowed)."""
    line = line.removesuffix("\n")
    if not line.startswith(_SIG_PREFIX):
        raise _malformed("signature line does not start with an em dash and a space")
    name, _, sig64 = line[len(_SIG_PREFIX) :].partition(" ")
    try:
        _check_key_name(name)
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    raw = _b64decode(sig64, f"signature by {name!r}")
    if len(raw) < 5:
        raise _malformed(f"signature by {name!r} is too short")
    return NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:])


def parse_note(note: str | bytes) -> Note:
    """Parse a signed note without verifying it; raise ProtocolError if malformed."""
    size = len(note) if isinstance(note, bytes) else len(note.encode("utf-8", "surrogatepass"))
    if size > MAX_NOTE_SIZE:
        raise ProtocolError(f"note is {size} bytes, over {MAX_NOTE_SIZE}", code="too_large")
    try:
        if isinstance(note, bytes):
            note = note.decode("utf-8")
        _check_chars(note, "note")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _malformed(f"malformed note: {exc}") from None
    # The text may contain blank lines: the last blank line separates it from the signatures.
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n") or split + 2 == len(note):
        raise _malformed("note has no blank line followed by signature lines")
    lines = note[split + 2 : -1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise ProtocolError(f"note has more than {MAX_SIGNATURES} signatures", code="too_large")
    return Note(note[: split + 1], tuple(parse_signature_line(line) for line in lines))


def _index(verifiers: Iterable[Verifier]) -> dict[tuple[str, int], Verifier]:
    known: dict[tuple[str, int], Verifier] = {}
    for verifier in verifiers:
        ident = (verifier.name, verifier.key_id)
        if known.setdefault(ident, verifier) != verifier:
            raise VerificationError(f"two different keys named {ident[0]}+{ident[1]:08x}")
    return known


def verify_note(note: str | bytes | Note, verifiers: Iterable[Verifier]) -> VerifiedNote:
    """Verify a note against known keys, per c2sp.org/signed-note.

    Signatures by unknown (name, key ID) pairs are ignored. Every signature by a known key must
    verify, and at least one must exist; otherwise VerificationError.
    """
    parsed = note if isinstance(note, Note) else parse_note(note)
    known = _index(verifiers)
    verified: dict[tuple[str, int], NoteSignature] = {}
    unverified: list[NoteSignature] = []
    for sig in parsed.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            unverified.append(sig)
        elif not verifier.verify(parsed.text, sig.signature):
            raise VerificationError(f"signature by {sig.name}+{sig.key_id:08x} does not verify")
        else:
            verified.setdefault((sig.name, sig.key_id), sig)
    if not verified:
        raise VerificationError("note has no signature by a known key")
    return VerifiedNote(parsed.text, tuple(verified.values()), tuple(unverified))


def sign_note(text: str, signers: Iterable[Signer]) -> str:
    """Return ``text`` signed by every signer, as a serialized note."""
    _check_text(text)
    sigs = tuple(signer.sign(text) for signer in signers)
    if not sigs:
        raise ValueError("a note needs at least one signer")
    return Note(text, sigs).to_string()


def add_signatures(note: str, lines: Iterable[str | NoteSignature]) -> str:
    """Append signature lines (e.g. cosignatures) to a serialized note.

    A new line replaces an existing one by the same (name, key ID). Nothing is verified here:
    verify cosignatures with :func:`verify_cosignature` before storing them.
    """
    parsed = parse_note(note)
    new = [sig if isinstance(sig, NoteSignature) else parse_signature_line(sig) for sig in lines]
    replaced = {(sig.name, sig.key_id) for sig in new}
    kept = [sig for sig in parsed.signatures if (sig.name, sig.key_id) not in replaced]
    result = Note(parsed.text, (*kept, *new)).to_string()
    parse_note(result)  # enforce the size and count limits on what we hand out
    return result


@dataclass(frozen=True)
class Checkpoint:
    """A c2sp.org/tlog-checkpoint note text: origin, tree size, root hash, extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for what, line in (("origin", self.origin), *(("extension", e) for e in self.extensions)):
            if not line or "\n" in line:
                raise ValueError(f"checkpoint {what} line must be one non-empty line")
            _check_chars(line, f"checkpoint {what}")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise ValueError(f"tree size {self.size} is outside 0..2^63-1")
        if len(self.root) != 32:
            raise ValueError("checkpoint root hash must be 32 bytes")

    def to_text(self) -> str:
        """Return the note text (ends with a newline)."""
        lines = (self.origin, str(self.size), _b64encode(self.root), *self.extensions)
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint note text strictly; raise ProtocolError if malformed."""
        if not text.endswith("\n"):
            raise _malformed("checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise _malformed("checkpoint needs origin, size and root hash lines")
        origin, size, root64, *extensions = lines
        if not _DECIMAL.fullmatch(size):
            raise _malformed("checkpoint tree size is not a decimal without leading zeros")
        root = _b64decode(root64, "checkpoint root hash")
        try:
            return cls(origin, int(size), root, tuple(extensions))
        except ValueError as exc:
            raise _malformed(str(exc)) from None


def cosign(checkpoint_text: str, witness_name: str, key: Ed25519PrivateKey, timestamp: int) -> str:
    """Return the ``cosignature/v1`` signature line (no final newline) a witness adds."""
    return Cosigner(witness_name, key).cosign(checkpoint_text, timestamp).to_line()


def verify_cosignature(checkpoint_text: str, line: str | NoteSignature, verifier: Verifier) -> int:
    """Verify one cosignature line by ``verifier`` over ``checkpoint_text``; return its time."""
    sig = line if isinstance(line, NoteSignature) else parse_signature_line(line)
    if verifier.sig_type != SIG_COSIGNATURE_V1:
        raise ValueError("verify_cosignature needs a cosignature (type 0x04) verifier")
    if (sig.name, sig.key_id) != (verifier.name, verifier.key_id):
        raise VerificationError(f"cosignature is by {sig.name}+{sig.key_id:08x}, not the witness")
    if not verifier.verify(checkpoint_text, sig.signature):
        raise VerificationError(f"cosignature by {sig.name} does not verify")
    return sig.timestamp


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint signed by its log, with the witnesses whose cosignatures verified."""

    checkpoint: Checkpoint
    text: str
    cosignatures: tuple[NoteSignature, ...]


def verify_checkpoint(
    note: str | bytes,
    log: Verifier,
    witnesses: Iterable[Verifier] = (),
    quorum: int = 0,
) -> VerifiedCheckpoint:
    """Verify a checkpoint note: signed by ``log``, origin equal to the log key name, and
    cosigned by at least ``quorum`` distinct ``witnesses``. Raise VerificationError if not."""
    witnesses = tuple(witnesses)
    checked = verify_note(note, (log, *witnesses))
    if checked.signed_by(log) is None:
        raise VerificationError(f"checkpoint is not signed by the log key {log.name}")
    checkpoint = Checkpoint.from_text(checked.text)
    if checkpoint.origin != log.name:
        raise VerificationError(f"checkpoint origin {checkpoint.origin!r} is not {log.name!r}")
    # Count each witness key once, however often it is listed or has signed.
    distinct = {(w.name, w.key_id): w for w in witnesses if w != log}
    found = (checked.signed_by(w) for w in distinct.values())
    cosigs = tuple(sig for sig in found if sig is not None)
    if len(cosigs) < quorum:
        raise VerificationError(f"checkpoint has {len(cosigs)} cosignatures, {quorum} required")
    return VerifiedCheckpoint(checkpoint, checked.text, cosigs)
