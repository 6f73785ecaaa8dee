"""Behaviour and every rejection path of broker.audit.note."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.note import (
    COSIGNATURE_V1_HEADER,
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Checkpoint,
    Cosigner,
    Note,
    NoteSignature,
    Signer,
    Verifier,
    add_signatures,
    cosign,
    cosignature_message,
    key_id,
    parse_note,
    parse_signature_line,
    sign_note,
    verify_checkpoint,
    verify_cosignature,
    verify_note,
)
from broker.errors import ProtocolError, VerificationError

LOG = Signer.from_seed("log.example/coalition", bytes(range(32)))
OTHER = Signer.from_seed("other.example/key", bytes(range(1, 33)))
W1 = Cosigner.from_seed("w1.example/witness", bytes(range(2, 34)))
W2 = Cosigner.from_seed("w2.example/witness", bytes(range(3, 35)))
ROOT = hashlib.sha256(b"root").digest()
CHECKPOINT = Checkpoint("log.example/coalition", 42, ROOT)
TEXT = CHECKPOINT.to_text()


def _line(name: str, raw: bytes) -> str:
    return f"— {name} {base64.b64encode(raw).decode()}"


def _malformed(note: str | bytes, code: str = "bad_frame") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_note(note)
    assert info.value.code == code
    return info.value


# --- keys ----------------------------------------------------------------------------------


def test_key_id_is_the_first_four_bytes_of_the_documented_hash() -> None:
    pub = LOG.public_key
    digest = hashlib.sha256(b"log.example/coalition\n\x01" + pub).digest()
    assert key_id(LOG.name, SIG_ED25519, pub) == int.from_bytes(digest[:4], "big") == LOG.key_id


def test_cosigner_key_id_uses_signature_type_4() -> None:
    same_key_as_note_signer = Signer.from_seed(W1.name, bytes(range(2, 34)))
    assert W1.public_key == same_key_as_note_signer.public_key
    assert W1.key_id == key_id(W1.name, SIG_COSIGNATURE_V1, W1.public_key)
    assert W1.key_id != same_key_as_note_signer.key_id


@pytest.mark.parametrize("signer", [LOG, W1])
def test_verifier_string_round_trips(signer: Signer | Cosigner) -> None:
    vkey = signer.verifier().to_string()
    name, hex_id, data = vkey.split("+", 2)
    assert name == signer.name
    assert hex_id == f"{signer.key_id:08x}"
    assert base64.b64decode(data) == bytes([signer.sig_type]) + signer.public_key
    assert Verifier.from_string(vkey) == signer.verifier()


def test_verifier_string_accepts_upper_case_hex() -> None:
    name, hex_id, data = LOG.verifier().to_string().split("+", 2)
    assert Verifier.from_string(f"{name}+{hex_id.upper()}+{data}") == LOG.verifier()


def _vkey(name: str, hex_id: str, raw: bytes) -> str:
    return f"{name}+{hex_id}+{base64.b64encode(raw).decode()}"


@pytest.mark.parametrize(
    "vkey",
    [
        "",
        "just-a-name",
        "name+1234abcd",
        _vkey("log", "1234abc", b"\x01" + bytes(32)),  # 7 hex digits
        _vkey("log", "1234abcg", b"\x01" + bytes(32)),  # not hex
        _vkey("log", "00000000", b"\x01" + bytes(32)),  # wrong key id
        _vkey("", "00000000", b"\x01" + bytes(32)),  # empty name
        _vkey("a b", "00000000", b"\x01" + bytes(32)),  # space in name
        _vkey("log", "00000000", b"\x02" + bytes(32)),  # ECDSA: not supported
        _vkey("log", "00000000", b"\x01" + bytes(31)),  # short key
        _vkey("log", "00000000", b""),
        "log+00000000+not base64!",
        "log+00000000+AQ",  # unpadded
    ],
)
def test_malformed_verifier_strings_are_rejected(vkey: str) -> None:
    with pytest.raises(ProtocolError):
        Verifier.from_string(vkey)


@pytest.mark.parametrize(
    "name", ["", "with space", "with+plus", "tab\there", "nbsp\u00a0", "c\x01"]
)
def test_invalid_key_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        Signer(name, Ed25519PrivateKey.generate())
    with pytest.raises(ValueError):
        Verifier(name, LOG.public_key)


def test_verifier_refuses_bad_key_size_and_type() -> None:
    with pytest.raises(ValueError):
        Verifier("log", bytes(31))
    with pytest.raises(ValueError):
        Verifier("log", LOG.public_key, 0x02)


def test_signer_repr_shows_no_private_key() -> None:
    assert repr(LOG) == f"Signer({LOG.verifier().to_string()!r})"


def test_generated_signers_differ() -> None:
    assert Signer.generate("a").public_key != Signer.generate("a").public_key


# --- signing and verifying ---------------------------------------------------------------


def test_sign_and_verify_round_trip_with_two_signers() -> None:
    note = sign_note(TEXT, [LOG, OTHER])
    assert note.startswith(TEXT + "\n— log.example/coalition ")
    checked = verify_note(note, [LOG.verifier(), OTHER.verifier()])
    assert checked.text == TEXT
    assert [s.name for s in checked.verified] == [LOG.name, OTHER.name]
    assert checked.signed_by(OTHER.verifier()) is not None


def test_note_as_bytes_and_parsed_note_are_accepted() -> None:
    note = sign_note(TEXT, [LOG])
    assert verify_note(note.encode(), [LOG.verifier()]).text == TEXT
    assert verify_note(parse_note(note), [LOG.verifier()]).text == TEXT


def test_parse_and_serialize_round_trip() -> None:
    note = sign_note(TEXT, [LOG, OTHER])
    assert parse_note(note).to_string() == note


@pytest.mark.parametrize("text", ["", "no final newline", "bad\rcontrol\n", "tab\tchar\n"])
def test_sign_note_refuses_invalid_text(text: str) -> None:
    with pytest.raises(ValueError):
        sign_note(text, [LOG])


def test_sign_note_needs_a_signer() -> None:
    with pytest.raises(ValueError):
        sign_note(TEXT, [])


def test_text_may_contain_blank_lines_and_the_last_one_separates() -> None:
    text = "first stanza\n\nsecond stanza\n"
    note = sign_note(text, [LOG])
    assert parse_note(note).text == text
    assert verify_note(note, [LOG.verifier()]).text == text


def test_unknown_signatures_are_ignored_when_a_known_one_verifies() -> None:
    note = sign_note(TEXT, [OTHER, LOG])
    checked = verify_note(note, [LOG.verifier()])
    assert [s.name for s in checked.verified] == [LOG.name]
    assert [s.name for s in checked.unverified] == [OTHER.name]


def test_note_without_a_known_signature_is_rejected() -> None:
    with pytest.raises(VerificationError, match="no signature by a known key"):
        verify_note(sign_note(TEXT, [OTHER]), [LOG.verifier()])


def test_note_with_no_verifiers_is_rejected() -> None:
    with pytest.raises(VerificationError):
        verify_note(sign_note(TEXT, [LOG]), [])


def test_bad_signature_by_a_known_key_rejects_the_whole_note() -> None:
    good = LOG.sign(TEXT)
    bad = NoteSignature(good.name, good.key_id, bytes(64))
    note = Note(TEXT, (OTHER.sign(TEXT), bad)).to_string()
    with pytest.raises(VerificationError, match="does not verify"):
        verify_note(note, [LOG.verifier(), OTHER.verifier()])


def test_duplicate_bad_signature_after_a_good_one_is_still_checked() -> None:
    good = LOG.sign(TEXT)
    bad = NoteSignature(good.name, good.key_id, bytes(64))
    with pytest.raises(VerificationError):
        verify_note(Note(TEXT, (good, bad)).to_string(), [LOG.verifier()])


def test_duplicate_good_signatures_are_reported_once() -> None:
    good = LOG.sign(TEXT)
    checked = verify_note(Note(TEXT, (good, good)).to_string(), [LOG.verifier()])
    assert checked.verified == (good,)


def test_signature_with_wrong_length_by_a_known_key_fails() -> None:
    note = Note(TEXT, (NoteSignature(LOG.name, LOG.key_id, bytes(65)),)).to_string()
    with pytest.raises(VerificationError):
        verify_note(note, [LOG.verifier()])


def test_same_name_other_key_id_is_unknown_and_ignored() -> None:
    lookalike = NoteSignature(LOG.name, LOG.key_id ^ 1, bytes(64))
    note = Note(TEXT, (lookalike, LOG.sign(TEXT))).to_string()
    assert verify_note(note, [LOG.verifier()]).unverified == (lookalike,)


def test_same_key_id_other_name_is_unknown_and_ignored() -> None:
    lookalike = NoteSignature("impostor.example", LOG.key_id, bytes(64))
    note = Note(TEXT, (lookalike, LOG.sign(TEXT))).to_string()
    assert verify_note(note, [LOG.verifier()]).unverified == (lookalike,)


def test_two_verifiers_claiming_the_same_name_and_id_are_refused() -> None:
    # Two keys with one (name, id) cannot be built honestly (the id is derived); fake a clash.
    class Clash(Verifier):
        @property
        def key_id(self) -> int:
            return LOG.key_id

    with pytest.raises(VerificationError, match="two different keys"):
        verify_note(sign_note(TEXT, [LOG]), [LOG.verifier(), Clash(LOG.name, OTHER.public_key)])


def test_the_same_verifier_listed_twice_is_fine() -> None:
    assert verify_note(sign_note(TEXT, [LOG]), [LOG.verifier(), LOG.verifier()]).text == TEXT


# --- malformed notes -----------------------------------------------------------------------

SIG_LINE = LOG.sign(TEXT).to_line()


@pytest.mark.parametrize(
    ("note", "why"),
    [
        (TEXT + SIG_LINE + "\n", "no blank line"),
        (TEXT + "\n", "blank line but no signatures"),
        (TEXT + "\n" + SIG_LINE, "no final newline"),
        (TEXT + "\n" + SIG_LINE + "\n\n", "ends with a blank line"),
        (TEXT + "\n" + SIG_LINE.replace("—", "-") + "\n", "hyphen instead of em dash"),
        (TEXT + "\n" + SIG_LINE.replace("— ", "—") + "\n", "no space after the dash"),
        (TEXT + "\n" + SIG_LINE + "\nnot a signature\n", "trailing garbage line"),
        (TEXT + "\n" + SIG_LINE.replace("/coalition ", "/coalition  ") + "\n", "two spaces"),
        (TEXT + "\n" + _line("", bytes(68)) + "\n", "empty key name"),
        (TEXT + "\n" + _line("a+b", bytes(68)) + "\n", "plus in key name"),
        (TEXT + "\n" + _line("log", bytes(4)) + "\n", "signature shorter than 5 bytes"),
        (TEXT + "\n— log not*base64\n", "bad base64"),
        (TEXT + "\n— log AAAAAAA\n", "unpadded base64"),
        (TEXT + "\n— log AAAAAAB=\n", "non-canonical base64"),
        (TEXT + "\n— log AAAA AAAA\n", "space inside base64"),
        ("bad\rcontrol\n\n" + SIG_LINE + "\n", "carriage return"),
        ("tab\tin text\n\n" + SIG_LINE + "\n", "tab"),
        ("lone \ud800 surrogate\n\n" + SIG_LINE + "\n", "not UTF-8"),
    ],
)
def test_malformed_notes_are_rejected(note: str, why: str) -> None:
    _malformed(note)


def test_invalid_utf8_bytes_are_rejected() -> None:
    _malformed(TEXT.encode() + b"\xff\n\n" + SIG_LINE.encode() + b"\n")


def test_oversized_note_is_rejected() -> None:
    text = "x" * MAX_NOTE_SIZE + "\n"
    _malformed(text + "\n" + SIG_LINE + "\n", code="too_large")


def test_too_many_signatures_are_rejected() -> None:
    lines = "".join(_line(f"k{i}", bytes(68)) + "\n" for i in range(MAX_SIGNATURES + 1))
    _malformed(TEXT + "\n" + lines, code="too_large")


def test_the_maximum_number_of_signatures_is_accepted() -> None:
    lines = "".join(_line(f"k{i}", bytes(68)) + "\n" for i in range(MAX_SIGNATURES - 1))
    note = TEXT + "\n" + lines + SIG_LINE + "\n"
    assert len(parse_note(note).signatures) == MAX_SIGNATURES
    assert verify_note(note, [LOG.verifier()]).text == TEXT


def test_signature_line_accepts_one_trailing_newline() -> None:
    assert parse_signature_line(SIG_LINE + "\n") == parse_signature_line(SIG_LINE)


# --- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_text_layout() -> None:
    root64 = base64.b64encode(ROOT).decode()
    assert f"log.example/coalition\n42\n{root64}\n" == TEXT
    cp = Checkpoint("o", 0, ROOT, ("ext one", "ext two"))
    assert cp.to_text() == f"o\n0\n{root64}\next one\next two\n"
    assert Checkpoint.from_text(cp.to_text()) == cp
    assert Checkpoint.from_text(TEXT) == CHECKPOINT


def test_checkpoint_matches_the_c2sp_example() -> None:
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    cp = Checkpoint.from_text(text)
    assert (cp.origin, cp.size, len(cp.root)) == ("example.com/behind-the-sofa", 20852163, 32)
    assert cp.to_text() == text


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("01", "leading zero"),
        ("00", "leading zeros"),
        ("+1", "sign"),
        ("-1", "negative"),
        ("1_000", "underscore"),
        (" 1", "space"),
        ("\u0661", "arabic-indic digit"),
        ("", "empty"),
        ("1e3", "exponent"),
        (str(2**63), "over 2^63-1"),
    ],
)
def test_checkpoint_size_must_be_plain_decimal(size: str, why: str) -> None:
    root64 = base64.b64encode(ROOT).decode()
    with pytest.raises(ProtocolError):
        Checkpoint.from_text(f"origin\n{size}\n{root64}\n")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("origin\n1\n" + base64.b64encode(ROOT).decode(), "no final newline"),
        ("origin\n1\n", "no root line"),
        ("\n1\n" + base64.b64encode(ROOT).decode() + "\n", "empty origin"),
        ("origin\n1\n" + base64.b64encode(ROOT[:31]).decode() + "\n", "31-byte root"),
        ("origin\n1\n" + base64.b64encode(ROOT + b"x").decode() + "\n", "33-byte root"),
        ("origin\n1\nnot-base64\n", "bad base64"),
        ("origin\n1\n" + base64.b64encode(ROOT).decode() + "\n\n", "empty extension line"),
        ("origin\n1\n" + base64.b64encode(ROOT).decode() + "\next\n\nmore\n", "blank inside"),
        ("ori\tgin\n1\n" + base64.b64encode(ROOT).decode() + "\n", "control character"),
    ],
)
def test_malformed_checkpoints_are_rejected(text: str, why: str) -> None:
    with pytest.raises(ProtocolError):
        Checkpoint.from_text(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": ""},
        {"origin": "two\nlines"},
        {"size": -1},
        {"size": 2**63},
        {"root": b"short"},
        {"extensions": ("",)},
        {"extensions": ("a\nb",)},
    ],
)
def test_checkpoint_constructor_validates(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"origin": "o", "size": 1, "root": ROOT, "extensions": ()}
    args.update(kwargs)
    with pytest.raises(ValueError):
        Checkpoint(**args)  # type: ignore[arg-type]


# --- cosignatures --------------------------------------------------------------------------


def test_cosignature_line_layout_matches_the_c2sp_example() -> None:
    # From c2sp.org/tlog-cosignature: key ID, then the uint64 timestamp, then 64 signature bytes.
    line = (
        "— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dl"
        "rDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA=="
    )
    sig = parse_signature_line(line)
    assert sig.name == "witness.example.com/w1"
    assert len(sig.signature) == 8 + 64
    assert sig.timestamp == 1679315147
    assert sig.to_line() == line


def test_cosignature_message_format() -> None:
    assert cosignature_message(TEXT, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\n" + TEXT.encode()
    )
    assert COSIGNATURE_V1_HEADER == "cosignature/v1\n"


@pytest.mark.parametrize("timestamp", [-1, 2**63])
def test_cosignature_timestamp_must_fit_in_63_bits(timestamp: int) -> None:
    with pytest.raises(ValueError):
        W1.cosign(TEXT, timestamp)


def test_cosign_and_verify_round_trip() -> None:
    line = cosign(TEXT, W1.name, Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34))), 1700)
    assert line == W1.cosign(TEXT, 1700).to_line()  # Ed25519 is deterministic
    assert verify_cosignature(TEXT, line, W1.verifier()) == 1700
    sig = parse_signature_line(line)
    assert sig.key_id == W1.key_id
    assert sig.signature[:8] == (1700).to_bytes(8, "big")


def test_cosignature_over_another_checkpoint_is_rejected() -> None:
    line = W1.cosign(TEXT, 1700).to_line()
    other = Checkpoint(CHECKPOINT.origin, 43, ROOT).to_text()
    with pytest.raises(VerificationError):
        verify_cosignature(other, line, W1.verifier())


def test_cosignature_with_a_changed_timestamp_is_rejected() -> None:
    sig = W1.cosign(TEXT, 1700)
    moved = NoteSignature(sig.name, sig.key_id, (1701).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(VerificationError):
        verify_cosignature(TEXT, moved, W1.verifier())


def test_cosignature_with_a_timestamp_over_2_63_is_rejected() -> None:
    sig = W1.cosign(TEXT, 1700)
    huge = NoteSignature(sig.name, sig.key_id, (2**63).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(VerificationError):
        verify_cosignature(TEXT, huge, W1.verifier())


def test_cosignature_by_another_witness_is_rejected() -> None:
    line = W2.cosign(TEXT, 1700).to_line()
    with pytest.raises(VerificationError, match="not the witness"):
        verify_cosignature(TEXT, line, W1.verifier())


def test_plain_note_signature_is_not_a_cosignature() -> None:
    # Same key, type 0x01: different key ID, and the signed message lacks the header.
    plain = Signer.from_seed(W1.name, bytes(range(2, 34)))
    with pytest.raises(VerificationError):
        verify_cosignature(TEXT, plain.sign(TEXT), W1.verifier())
    with pytest.raises(ValueError):
        verify_cosignature(TEXT, W1.cosign(TEXT, 1), plain.verifier())


def test_verifier_rejects_text_that_cannot_be_utf8() -> None:
    sig = LOG.sign(TEXT)
    assert LOG.verifier().verify(TEXT, sig.signature)
    assert not LOG.verifier().verify("lone \ud800\n", sig.signature)


def test_cosigning_something_that_is_not_a_checkpoint_is_refused() -> None:
    with pytest.raises(ProtocolError):
        W1.cosign("just some text\n", 1700)


def test_add_signatures_appends_and_replaces_by_key() -> None:
    note = sign_note(TEXT, [LOG])
    first = add_signatures(note, [W1.cosign(TEXT, 1).to_line()])
    second = add_signatures(first, [W2.cosign(TEXT, 2), W1.cosign(TEXT, 3).to_line() + "\n"])
    sigs = parse_note(second).signatures
    assert [(s.name, s.timestamp if s.name != LOG.name else None) for s in sigs] == [
        (LOG.name, None),
        (W2.name, 2),
        (W1.name, 3),
    ]
    checked = verify_note(second, [LOG.verifier(), W1.verifier(), W2.verifier()])
    assert len(checked.verified) == 3


def test_add_signatures_refuses_malformed_input() -> None:
    with pytest.raises(ProtocolError):
        add_signatures(TEXT, [W1.cosign(TEXT, 1)])  # not a note
    with pytest.raises(ProtocolError):
        add_signatures(sign_note(TEXT, [LOG]), ["- w1 AAAAAAA="])


def test_add_signatures_enforces_the_signature_limit() -> None:
    many = [_line(f"k{i}", bytes(68)) for i in range(MAX_SIGNATURES)]
    with pytest.raises(ProtocolError) as info:
        add_signatures(sign_note(TEXT, [LOG]), many)
    assert info.value.code == "too_large"


# --- cosigned checkpoints ------------------------------------------------------------------


def _cosigned(*witnesses: Cosigner) -> str:
    return add_signatures(sign_note(TEXT, [LOG]), [w.cosign(TEXT, 1700) for w in witnesses])


def test_verify_checkpoint_with_quorum() -> None:
    checked = verify_checkpoint(
        _cosigned(W1, W2), LOG.verifier(), [W1.verifier(), W2.verifier()], quorum=2
    )
    assert checked.checkpoint == CHECKPOINT
    assert checked.text == TEXT
    assert {s.name for s in checked.cosignatures} == {W1.name, W2.name}


def test_verify_checkpoint_without_quorum_is_rejected() -> None:
    with pytest.raises(VerificationError, match="1 cosignatures, 2 required"):
        verify_checkpoint(_cosigned(W1), LOG.verifier(), [W1.verifier(), W2.verifier()], 2)


def test_a_witness_listed_twice_counts_once() -> None:
    with pytest.raises(VerificationError, match="1 cosignatures"):
        verify_checkpoint(_cosigned(W1), LOG.verifier(), [W1.verifier(), W1.verifier()], 2)


def test_checkpoint_cosigned_but_not_signed_by_the_log_is_rejected() -> None:
    note = Note(TEXT, (W1.cosign(TEXT, 1), OTHER.sign(TEXT))).to_string()
    with pytest.raises(VerificationError, match="not signed by the log"):
        verify_checkpoint(note, LOG.verifier(), [W1.verifier()])


def test_checkpoint_origin_must_be_the_log_key_name() -> None:
    text = Checkpoint("someone.else/log", 1, ROOT).to_text()
    with pytest.raises(VerificationError, match="origin"):
        verify_checkpoint(sign_note(text, [LOG]), LOG.verifier())


def test_checkpoint_with_a_bad_cosignature_is_rejected() -> None:
    sig = W1.cosign(TEXT, 1700)
    bad = NoteSignature(sig.name, sig.key_id, sig.signature[:8] + bytes(64))
    note = add_signatures(sign_note(TEXT, [LOG]), [bad])
    with pytest.raises(VerificationError, match="does not verify"):
        verify_checkpoint(note, LOG.verifier(), [W1.verifier()])


def test_signed_note_that_is_not_a_checkpoint_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        verify_checkpoint(sign_note("hello\n", [LOG]), LOG.verifier())
