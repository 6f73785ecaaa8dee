"""The C2SP signed-note worked example, and the golang.org/x/mod/sumdb/note documented example."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from broker.audit.note import (
    SIG_ED25519,
    Signer,
    Verifier,
    key_id,
    parse_note,
    sign_note,
    verify_note,
)
from broker.errors import ProtocolError, VerificationError

VECTOR: dict[str, Any] = json.loads((Path(__file__).parent / "signed_note.json").read_text())
NOTE = VECTOR["text"] + "\n" + VECTOR["signature_line"] + "\n"

# golang.org/x/mod/sumdb/note package documentation: a signer key, its verifier key, and the
# signed note it produces (Ed25519 is deterministic, so signing must reproduce it byte for byte).
GO_SKEY_SEED = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n— PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_verifier_key_parses_and_round_trips() -> None:
    verifier = Verifier.from_string(VECTOR["verifier_key"])
    assert verifier.name == "example.com/foo"
    assert verifier.sig_type == SIG_ED25519
    assert verifier.to_string() == VECTOR["verifier_key"]


def test_key_id_follows_the_documented_rule() -> None:
    verifier = Verifier.from_string(VECTOR["verifier_key"])
    expected = hashlib.sha256(b"example.com/foo\n\x01" + verifier.public_key).digest()[:4]
    assert key_id(verifier.name, SIG_ED25519, verifier.public_key) == int.from_bytes(expected)
    assert f"{verifier.key_id:08x}" == VECTOR["verifier_key"].split("+")[1]


def test_worked_example_verifies() -> None:
    checked = verify_note(NOTE, [Verifier.from_string(VECTOR["verifier_key"])])
    assert checked.text == VECTOR["text"]
    assert [sig.name for sig in checked.verified] == ["example.com/foo"]
    assert checked.unverified == ()


@pytest.mark.parametrize("index", [0, 3, 4, 30, 67])  # key id bytes, then signature bytes
def test_worked_example_with_a_flipped_signature_byte_fails(index: int) -> None:
    note = parse_note(NOTE)
    sig = note.signatures[0]
    raw = _flip(sig.key_id.to_bytes(4, "big") + sig.signature, index)
    line = "— example.com/foo " + base64.b64encode(raw).decode()
    with pytest.raises(VerificationError):
        verify_note(
            VECTOR["text"] + "\n" + line + "\n", [Verifier.from_string(VECTOR["verifier_key"])]
        )


def test_worked_example_with_a_changed_text_fails() -> None:
    note = NOTE.replace("example message", "example massage")
    with pytest.raises(VerificationError):
        verify_note(note, [Verifier.from_string(VECTOR["verifier_key"])])


def test_worked_example_verifier_key_with_a_flipped_key_byte_is_refused() -> None:
    name, hex_id, key64 = VECTOR["verifier_key"].split("+", 2)
    bad = base64.b64encode(_flip(base64.b64decode(key64), 5)).decode()
    with pytest.raises(ProtocolError):
        Verifier.from_string(f"{name}+{hex_id}+{bad}")


def test_go_note_example_signer_reproduces_the_documented_note() -> None:
    signer = Signer.from_seed("PeterNeumann", GO_SKEY_SEED)
    assert signer.verifier().to_string() == GO_VKEY
    assert sign_note(GO_TEXT, [signer]) == GO_NOTE
    assert verify_note(GO_NOTE, [Verifier.from_string(GO_VKEY)]).text == GO_TEXT
