"""What a signature worker computes and the shape of its messages (broker.sigbatch)."""

from __future__ import annotations

import nacl.signing
import pytest

from broker import crypto
from broker.sigbatch import check_reply, check_request, verify_items

KEY = nacl.signing.SigningKey(b"\x01" * 32)
OTHER = nacl.signing.SigningKey(b"\x02" * 32)


def triple(body: bytes, *, signer: nacl.signing.SigningKey = KEY,
           domain: bytes = crypto.DOMAIN_ENVELOPE) -> list[bytes]:
    return [bytes(KEY.verify_key), body, crypto.sign(signer, domain, body)]


def test_each_triple_gets_its_own_verdict_in_order() -> None:
    good, forged = triple(b"a"), triple(b"b", signer=OTHER)
    tampered = triple(b"c")
    tampered[1] = b"C"
    assert verify_items(good + forged + good + tampered) == b"\x01\x00\x01\x00"
    assert verify_items([]) == b""


def test_a_signature_made_for_another_domain_does_not_verify() -> None:
    assert verify_items(triple(b"x", domain=crypto.DOMAIN_DOCUMENT)) == b"\x00"


def test_malformed_keys_and_signatures_are_bad_not_errors() -> None:
    good = triple(b"x")
    assert verify_items([good[0][:31], good[1], good[2]]) == b"\x00"
    assert verify_items([good[0], good[1], good[2][:63]]) == b"\x00"
    assert verify_items([b"\x00" * 32, good[1], good[2]]) == b"\x00"


def test_verdicts_match_the_loops_own_check() -> None:
    items = triple(b"one") + triple(b"two", signer=OTHER) + triple(b"three")
    expected = bytes(crypto.check_signature(items[i], crypto.DOMAIN_ENVELOPE, items[i + 1],
                                            items[i + 2]) for i in range(0, len(items), 3))
    assert verify_items(items) == expected == b"\x01\x00\x01"


def test_a_well_formed_request_is_read() -> None:
    items = triple(b"x")
    assert check_request([7, items]) == (7, items)
    assert check_request([0, []]) == (0, [])


@pytest.mark.parametrize("message", [
    None, [], [1], [1, [], 2], ["1", []], [1, "items"], [1, [b"k", b"b"]], [1, [b"k", b"b", 3]],
    {"n": 1},
])
def test_a_malformed_request_is_refused(message: object) -> None:
    assert check_request(message) is None


def test_a_reply_must_answer_the_batch_expected_with_a_bit_per_envelope() -> None:
    assert check_reply([3, b"\x01\x00"], 3, 2) == b"\x01\x00"
    assert check_reply([3, b""], 3, 0) == b""
    assert check_reply([4, b"\x01\x00"], 3, 2) is None  # another batch's answer
    assert check_reply([3, b"\x01"], 3, 2) is None  # one verdict short
    assert check_reply([3, b"\x01\x02"], 3, 2) is None  # not a verdict
    assert check_reply([3, [1, 0]], 3, 2) is None
    assert check_reply([3, b"\x01\x00", b""], 3, 2) is None
    assert check_reply("ready", 3, 2) is None
