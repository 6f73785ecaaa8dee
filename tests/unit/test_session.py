"""The broker side of a node connection (broker/session.py): handshake and frame discipline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nacl.public
import nacl.signing
import pytest

from broker import canonical, crypto, wire
from broker.session import (
    DEFAULT_SKEW_MS,
    Authenticated,
    BrokerSession,
    Close,
    Request,
    Send,
    State,
    hello_message,
    make_hello,
)
from policies.model import Accreditation, NodeCert

NOW = 1_800_000_000_000
DAY = 86_400_000
BROKER = "broker.coalition.example"
NONCE = bytes(range(32))
OTHER_NONCE = bytes(range(1, 33))


def _cert(node: str, seed: int, *, not_before: int = NOW - DAY, not_after: int = NOW + DAY
          ) -> tuple[NodeCert, nacl.signing.SigningKey]:
    key = nacl.signing.SigningKey(bytes([seed]) * 32)
    enc = nacl.public.PrivateKey(bytes([seed + 100]) * 32)
    cert = NodeCert(
        node=node, nation=node[:3], sign_key=bytes(key.verify_key), enc_key=bytes(enc.public_key),
        not_before=not_before, not_after=not_after,
        accreditation=Accreditation(max="SECRET", cats={}),
    )
    return cert, key


GBR, GBR_KEY = _cert("GBR-GW1", 1)
USA, USA_KEY = _cert("USA-GW1", 2)
OLD, OLD_KEY = _cert("OLD-GW1", 3, not_before=NOW - 2 * DAY, not_after=NOW - DAY)
NEW, NEW_KEY = _cert("NEW-GW1", 4, not_before=NOW + DAY, not_after=NOW + 2 * DAY)
EDGE, EDGE_KEY = _cert("EDG-GW1", 5, not_before=NOW - DAY, not_after=NOW)
SUS, SUS_KEY = _cert("SUS-GW1", 6)
CERTS = {c.node: c for c in (GBR, USA, OLD, NEW, EDGE, SUS)}


def _session(**kwargs: Any) -> BrokerSession:
    args: dict[str, Any] = {
        "broker": BROKER, "nonce": NONCE, "lookup": CERTS.get,
        "is_inactive": lambda node: node == "SUS-GW1",
    }
    args.update(kwargs)
    return BrokerSession(**args)


def _hello(node: str = "GBR-GW1", key: nacl.signing.SigningKey = GBR_KEY, *,
           ts: int = NOW, nonce: bytes = NONCE, broker: str = BROKER, v: int = 1) -> bytes:
    sig = crypto.sign(key, crypto.DOMAIN_HELLO, hello_message(broker, node, nonce, ts))
    return wire.encode_frame(wire.Hello(v=v, node=node, nonce=nonce, ts=ts, sig=sig))


def _open_session() -> BrokerSession:
    session = _session()
    session.start()
    assert session.receive(_hello(), NOW) == [Authenticated(GBR)]
    return session


def _error_code(events: list[Any]) -> str:
    assert isinstance(events[0], Send)
    frame = events[0].frame
    assert isinstance(frame, wire.Error)
    return frame.code


def _assert_fatal(session: BrokerSession, events: list[Any], code: str) -> None:
    assert len(events) == 2, events
    assert _error_code(events) == code
    assert isinstance(events[1], Close)
    assert events[1].code == code
    assert session.state is State.CLOSED
    assert session.node is None or code == "too_large"


def _assert_non_fatal(session: BrokerSession, events: list[Any], code: str) -> None:
    assert len(events) == 1, events
    assert _error_code(events) == code
    assert session.state is State.OPEN


# --- start and happy path ------------------------------------------------------------------------


def test_start_sends_the_challenge() -> None:
    assert _session().start() == [Send(wire.Challenge(v=1, broker=BROKER, nonce=NONCE))]


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_challenge_nonce_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ValueError):
        _session(nonce=b"\x00" * length)


def test_valid_hello_authenticates() -> None:
    session = _session()
    session.start()
    assert session.state is State.AWAIT_HELLO
    events = session.receive(_hello(), NOW)
    assert events == [Authenticated(GBR)]
    assert session.state is State.OPEN
    assert session.node == GBR


def test_make_hello_answers_the_challenge() -> None:
    session = _session()
    (start,) = session.start()
    assert isinstance(start, Send) and isinstance(start.frame, wire.Challenge)
    hello = make_hello(start.frame, "USA-GW1", USA_KEY, NOW + 1000)
    assert hello.ts == NOW + 1000
    assert session.receive(wire.encode_frame(hello), NOW) == [Authenticated(USA)]


def test_hello_message_is_the_documented_text() -> None:
    assert hello_message("b", "n", b"\x01\xab", 42) == b"b\nn\n01ab\n42"


@pytest.mark.parametrize(
    "frame",
    [
        wire.Sub(topic="maritime.>"),
        wire.Unsub(topic="maritime.>"),
        wire.Pub(env=b"envelope"),
        wire.Ack(seqs=(1, 2)),
        wire.Route(topic="maritime.tracks", label={"class": "SECRET"}),
        wire.Directory(),
        wire.Cosign(line="— witness"),
    ],
    ids=lambda f: f.T,
)
def test_node_frames_after_welcome_become_requests(frame: wire.Frame) -> None:
    session = _open_session()
    assert session.receive(wire.encode_frame(frame), NOW) == [Request(frame)]
    assert session.state is State.OPEN


def test_ping_is_answered_with_pong() -> None:
    session = _open_session()
    assert session.receive(wire.encode_frame(wire.Ping()), NOW) == [Send(wire.Pong())]


def test_pong_is_absorbed() -> None:
    session = _open_session()
    assert session.receive(wire.encode_frame(wire.Pong()), NOW) == []
    assert session.state is State.OPEN


# --- frames before the handshake -----------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        wire.Ping(),
        wire.Sub(topic="maritime.>"),
        wire.Pub(env=b"envelope"),
        wire.Directory(),
        wire.Welcome(node="GBR-GW1"),
        wire.Challenge(v=1, broker=BROKER, nonce=NONCE),
    ],
    ids=lambda f: f.T,
)
def test_frame_before_hello_is_not_authenticated_and_closes(frame: wire.Frame) -> None:
    session = _session()
    session.start()
    events = session.receive(wire.encode_frame(frame), NOW)
    _assert_fatal(session, events, "not_authenticated")
    # and a valid hello afterwards is ignored: the connection is gone
    assert session.receive(_hello(), NOW) == []
    assert session.node is None


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc1", "bad_frame"),
        (b"", "bad_frame"),
        (canonical.encode([1]), "bad_frame"),
        (canonical.encode({"t": "nope"}), "bad_frame"),
        (b"\x82\xa5topic\xa1a\xa1t\xa3sub", "non_canonical"),
    ],
)
def test_bad_bytes_before_hello_close_the_connection(data: bytes, code: str) -> None:
    session = _session()
    session.start()
    _assert_fatal(session, session.receive(data, NOW), code)


# --- hello that does not answer the challenge ----------------------------------------------------


HELLO_FAILURES: list[tuple[str, Callable[[], bytes], str]] = [
    ("wrong version", lambda: _hello(v=2), "unsupported_version"),
    ("version zero", lambda: _hello(v=0), "unsupported_version"),
    ("unknown node", lambda: _hello("XYZ-GW1"), "unknown_node"),
    ("wrong nonce", lambda: _hello(nonce=OTHER_NONCE), "handshake_failed"),
    ("ts too old", lambda: _hello(ts=NOW - DEFAULT_SKEW_MS - 1), "handshake_failed"),
    ("ts too new", lambda: _hello(ts=NOW + DEFAULT_SKEW_MS + 1), "handshake_failed"),
    ("ts zero", lambda: _hello(ts=0), "handshake_failed"),
    ("signed by another node's key", lambda: _hello("GBR-GW1", USA_KEY), "bad_signature"),
    ("signed for another broker", lambda: _hello(broker="evil.example"), "bad_signature"),
    ("expired certificate", lambda: _hello("OLD-GW1", OLD_KEY), "node_inactive"),
    ("certificate not yet valid", lambda: _hello("NEW-GW1", NEW_KEY), "node_inactive"),
    ("certificate ends now (exclusive)", lambda: _hello("EDG-GW1", EDGE_KEY), "node_inactive"),
    ("suspended node", lambda: _hello("SUS-GW1", SUS_KEY), "node_inactive"),
]


@pytest.mark.parametrize(("why", "make", "code"), HELLO_FAILURES,
                         ids=[case[0] for case in HELLO_FAILURES])
def test_hello_that_does_not_answer_the_challenge_is_refused_and_closes(
    why: str, make: Callable[[], bytes], code: str
) -> None:
    session = _session()
    session.start()
    events = session.receive(make(), NOW)
    _assert_fatal(session, events, code)
    assert session.node is None
    # nothing more is processed, not even a correct hello
    assert session.receive(_hello(), NOW) == []


def test_hello_signature_with_a_flipped_bit_is_refused() -> None:
    sig = bytearray(crypto.sign(GBR_KEY, crypto.DOMAIN_HELLO,
                                hello_message(BROKER, "GBR-GW1", NONCE, NOW)))
    sig[10] ^= 0x04
    data = wire.encode_frame(wire.Hello(v=1, node="GBR-GW1", nonce=NONCE, ts=NOW, sig=bytes(sig)))
    session = _session()
    _assert_fatal(session, session.receive(data, NOW), "bad_signature")


def test_hello_signed_without_the_domain_is_refused() -> None:
    message = hello_message(BROKER, "GBR-GW1", NONCE, NOW)
    sig = bytes(GBR_KEY.sign(message).signature)
    data = wire.encode_frame(wire.Hello(v=1, node="GBR-GW1", nonce=NONCE, ts=NOW, sig=sig))
    session = _session()
    _assert_fatal(session, session.receive(data, NOW), "bad_signature")


def test_hello_with_a_short_signature_is_refused() -> None:
    data = wire.encode_frame(wire.Hello(v=1, node="GBR-GW1", nonce=NONCE, ts=NOW, sig=b"\x00"))
    session = _session()
    _assert_fatal(session, session.receive(data, NOW), "bad_signature")


def test_hello_replayed_to_another_connection_is_refused() -> None:
    recorded = _hello()
    assert _session().receive(recorded, NOW) == [Authenticated(GBR)]
    other = _session(nonce=OTHER_NONCE)
    _assert_fatal(other, other.receive(recorded, NOW), "handshake_failed")


def test_hello_timestamp_edges_of_the_skew_are_accepted() -> None:
    for ts in (NOW - DEFAULT_SKEW_MS, NOW + DEFAULT_SKEW_MS):
        assert _session().receive(_hello(ts=ts), NOW) == [Authenticated(GBR)]


def test_configured_skew_is_used() -> None:
    session = _session(skew_ms=1000)
    _assert_fatal(session, session.receive(_hello(ts=NOW - 1001), NOW), "handshake_failed")
    assert _session(skew_ms=1000).receive(_hello(ts=NOW - 1000), NOW) == [Authenticated(GBR)]


def test_certificate_valid_from_now_is_accepted() -> None:
    hello = _hello("NEW-GW1", NEW_KEY, ts=NOW + DAY)
    assert _session().receive(hello, NOW + DAY) == [Authenticated(NEW)]


def test_suspension_is_asked_for_the_hello_node() -> None:
    asked: list[str] = []

    def inactive(node: str) -> bool:
        asked.append(node)
        return False

    assert _session(is_inactive=inactive).receive(_hello(), NOW) == [Authenticated(GBR)]
    assert asked == ["GBR-GW1"]


# --- after the handshake -------------------------------------------------------------------------


def test_second_hello_is_unexpected_and_does_not_close() -> None:
    session = _open_session()
    events = session.receive(_hello("USA-GW1", USA_KEY), NOW)
    _assert_non_fatal(session, events, "unexpected_frame")
    assert session.node == GBR  # the identity does not change


@pytest.mark.parametrize(
    "frame",
    [
        wire.Challenge(v=1, broker=BROKER, nonce=NONCE),
        wire.Welcome(node="USA-GW1"),
        wire.Receipt(id=b"\x00" * 16, audit=1, recipients={}),
        wire.Deliver(env=b"e", seq=1),
        wire.Routes(recipients={}, keys={}),
        wire.Checkpoint(note="n", proof=(), old=0),
        wire.Expired(id=b"\x00" * 16, recipient="USA-GW1"),
        wire.Error(code="internal", reason="x"),
    ],
    ids=lambda f: f.T,
)
def test_broker_only_frame_from_a_node_is_unexpected(frame: wire.Frame) -> None:
    session = _open_session()
    _assert_non_fatal(session, session.receive(wire.encode_frame(frame), NOW), "unexpected_frame")
    # the connection still works
    assert session.receive(wire.encode_frame(wire.Ping()), NOW) == [Send(wire.Pong())]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc1", "bad_frame"),
        (canonical.encode({"t": "sub"}), "bad_frame"),
        (canonical.encode({"t": "sub", "topic": "a", "x": 1}), "bad_frame"),
        (canonical.encode({"t": "ack", "seqs": [-1]}), "bad_frame"),
        (b"\x82\xa5topic\xa1a\xa1t\xa3sub", "non_canonical"),
        (b"\x81\xa1t\xa4ping\x00", "bad_frame"),
    ],
)
def test_bad_bytes_after_welcome_are_an_error_without_close(data: bytes, code: str) -> None:
    session = _open_session()
    _assert_non_fatal(session, session.receive(data, NOW), code)


def test_error_frames_carry_no_ref_for_frame_errors() -> None:
    session = _open_session()
    (event,) = session.receive(b"\xc1", NOW)
    assert isinstance(event, Send) and isinstance(event.frame, wire.Error)
    assert event.frame.ref is None


@pytest.mark.parametrize("opened", [False, True], ids=["before-hello", "after-welcome"])
def test_oversized_frame_is_too_large_and_closes(opened: bool) -> None:
    session = _session(max_frame=300)
    session.start()
    if opened:
        assert session.receive(_hello(), NOW) == [Authenticated(GBR)]
    data = wire.encode_frame(wire.Pub(env=b"x" * 300))
    events = session.receive(data, NOW)
    _assert_fatal(session, events, "too_large")


def test_frame_at_the_limit_is_accepted() -> None:
    session = _session(max_frame=400)
    assert session.receive(_hello(), NOW) == [Authenticated(GBR)]
    overhead = len(wire.encode_frame(wire.Pub(env=b"x" * 300))) - 300  # bin16 header
    frame = wire.Pub(env=b"x" * (400 - overhead))
    data = wire.encode_frame(frame)
    assert len(data) == 400
    assert session.receive(data, NOW) == [Request(frame)]
    _assert_fatal(session, session.receive(wire.encode_frame(wire.Pub(env=frame.env + b"x")), NOW),
                  "too_large")


def test_after_close_receive_returns_nothing() -> None:
    session = _session()
    _assert_fatal(session, session.receive(wire.encode_frame(wire.Ping()), NOW),
                  "not_authenticated")
    for data in (_hello(), wire.encode_frame(wire.Ping()), b"\xc1", b"x" * (2 << 20)):
        assert session.receive(data, NOW) == []


def test_fail_reports_an_error_with_its_ref_and_may_close() -> None:
    session = _open_session()
    ref = b"\x07" * 16
    assert session.fail("replay", "seen", ref=ref) == [
        Send(wire.Error(code="replay", reason="seen", ref=ref))
    ]
    assert session.state is State.OPEN
    assert session.fail("unavailable", "full", close=True) == [
        Send(wire.Error(code="unavailable", reason="full")), Close("unavailable", "full")
    ]
    assert session.state is State.CLOSED
    assert session.receive(wire.encode_frame(wire.Ping()), NOW) == []


def test_every_error_code_sent_is_documented() -> None:
    from broker.errors import ERROR_CODES

    codes = {code for _, _, code in HELLO_FAILURES} | {
        "not_authenticated", "unexpected_frame", "too_large", "bad_frame", "non_canonical",
    }
    assert codes <= set(ERROR_CODES)


def test_directory_with_certs_from_a_node_is_unexpected() -> None:
    session = _open_session()
    events = session.receive(wire.encode_frame(wire.Directory(certs=(b"forged",))), NOW)
    _assert_non_fatal(session, events, "unexpected_frame")


def test_attacker_chosen_text_is_bounded_before_it_reaches_frames_logs_and_the_audit_log() -> None:
    """A hello naming a 60 KB node id must not write 60 KB into the permanent ``auth_failed``
    entry (the server records ``claimed`` and the reason there)."""
    session = _session()
    session.start()
    huge = "X" * 60_000
    hello = wire.Hello(v=wire.PROTOCOL_VERSION, node=huge, nonce=NONCE, ts=NOW, sig=bytes(64))
    events = session.receive(wire.encode_frame(hello), NOW)
    error = events[0]
    assert isinstance(error, Send) and isinstance(error.frame, wire.Error)
    assert error.frame.code == "unknown_node"
    assert len(error.frame.reason) == 256 and error.frame.reason.endswith("…")
    assert session.claimed is not None and len(session.claimed) == 64
    close = events[1]
    assert isinstance(close, Close) and close.reason == error.frame.reason
