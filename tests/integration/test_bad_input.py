"""The node listener's bad-input table (issue 8, item 4): every hostile or malformed input, with
what the node is told, whether its connection survives, what the broker audits and what it logs.

Each case pins four things against a real broker on loopback:

* the ``{t:"error", code, reason, ref?}`` frame the node receives (or, where the protocol has no
  error for it, the answer it gets instead);
* the connection: closed with a WebSocket close code, or alive (a ``ping`` still gets a ``pong``);
* the audit log (decoded with :mod:`broker.audit.leaves`): a handshake failure is one ``session``
  ``auth_failed`` entry with the code and reason; a rejected request adds **no** entry at all (in
  particular no ``route``: nothing of a rejected envelope is routed); a fatal error after
  ``welcome`` adds only the ``disconnect``;
* the structlog event (``connection_refused``, ``connection_closed``, ``request_rejected``,
  ``frame_too_large``, or none), and that no key material or payload plaintext is logged.

``docs/security-bad-input.md`` is the same table in prose; each row names its test here. Abuse
limits (rates, idle time, connection counts, label/topic/to/keys sizes) are not covered here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import msgpack
import pytest
from structlog.testing import capture_logs

from broker import canonical, crypto, wire
from broker.audit.leaves import AdminEntry, Entry, RouteEntry, SessionEntry, entry_from_bytes
from broker.audit.note import Cosigner, parse_note
from broker.coalition import Coalition
from broker.envelope import MAX_TTL_SECONDS, Envelope, build_envelope
from broker.server import BrokerServer, Limits
from broker.session import hello_message, make_hello
from broker.store.base import Batch
from clients.gateway import label
from clients.identity import KeyFile
from tests.integration.conftest import FAST_COMMIT
from tests.integration.rawnode import RawNode

#: The payload of every envelope built here: it must never reach a log line.
MARKER = b"BAD-INPUT-PLAINTEXT-3c9f1e"
SKEW_MS = 5 * 60 * 1000
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009

Logs = list[dict[str, Any]]


def now_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclasses.dataclass
class Ctx:
    """What a case needs to craft its input: the running broker and the coalition's keys;
    ``index`` is an audit index a case's setup found."""

    server: BrokerServer
    coalition: Coalition
    index: int = -1

    def key(self, node: str) -> KeyFile:
        """The private keys of ``node``."""
        return self.coalition.nodes[node]


# --- wire helpers -------------------------------------------------------------------------------


async def recv_frame(raw: RawNode, timeout: float = 5) -> wire.Frame:
    """The next frame from the broker, skipping the ``checkpoint`` offers a node gets at any
    time after ``welcome`` (they are not answers to anything the test sent)."""
    return await raw.recv(timeout, skip_checkpoints=True)


async def recv_error(raw: RawNode) -> wire.Error:
    """The next frame, which must be an ``error``."""
    frame = await recv_frame(raw)
    assert isinstance(frame, wire.Error), f"expected an error frame, got {frame!r}"
    return frame


async def close_code(raw: RawNode, timeout: float = 5) -> int | None:
    """Wait for the broker to close the connection (skipping checkpoint offers); the WebSocket
    close code. Fails if any other frame arrives first."""
    assert raw.ws is not None
    async with asyncio.timeout(timeout):
        while True:
            msg = await raw.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                frame = wire.decode_frame(msg.data, max_bytes=8 << 20)
                assert isinstance(frame, wire.Checkpoint), f"expected close, got {frame!r}"
                continue
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING), f"expected close, got {msg.type!r}"
            return raw.ws.close_code


async def assert_alive(raw: RawNode) -> None:
    """The connection survives: a ``ping`` is answered with ``pong`` (and nothing else comes
    first, so the bad input got no second answer)."""
    await raw.send(wire.Ping())
    assert await recv_frame(raw) == wire.Pong()


def hello_for(raw: RawNode, key: KeyFile, *, node: str | None = None, v: int = 1,
              nonce: bytes | None = None, ts: int | None = None) -> wire.Hello:
    """A hello answering ``raw``'s challenge as ``node`` (default: the key's node), signed with
    ``key``, with any field overridden (the signature covers the overridden values)."""
    assert raw.challenge is not None
    claimed = node if node is not None else key.name
    nonce = nonce if nonce is not None else raw.challenge.nonce
    ts = ts if ts is not None else now_ms()
    sig = crypto.sign(key.signing_key, crypto.DOMAIN_HELLO,
                      hello_message(raw.challenge.broker, claimed, nonce, ts))
    return wire.Hello(v=v, node=claimed, nonce=nonce, ts=ts, sig=sig)


# --- audit and log helpers ----------------------------------------------------------------------


async def settle(server: BrokerServer) -> int:
    """Wait until everything appended so far is durable (the writer commits in order, so an
    empty write is a barrier); return the log size."""
    await server.audit.write(Batch())
    return server.audit.size


def entries_since(server: BrokerServer, start: int) -> list[Entry]:
    """The durable entries from ``start`` on, decoded."""
    return [entry_from_bytes(data) for data in server.audit.store.entries(start,
                                                                           server.audit.size)]


async def wait_entries(server: BrokerServer, start: int,
                       done: Callable[[list[Entry]], bool]) -> list[Entry]:
    """Poll the durable entries from ``start`` until ``done`` holds (at most 5 s)."""
    async with asyncio.timeout(5):
        while not done(found := entries_since(server, start)):
            await asyncio.sleep(0.02)
    return found


async def login(ctx: Ctx, raw: RawNode, node: str = "USA-GW1") -> str:
    """Authenticate ``raw`` as ``node``; return the broker's connection id (from the durable
    ``connect`` entry, which the structlog lines of the connection carry as ``conn``)."""
    start = await settle(ctx.server)
    assert await raw.login(ctx.key(node)) == wire.Welcome(node=node, checkpoint=(
        ctx.server.witnesses.latest_note()))

    def connects(found: list[Entry]) -> list[SessionEntry]:
        return [e for e in found if isinstance(e, SessionEntry) and e.event == "connect"
                and e.node == node]

    found = await wait_entries(ctx.server, start, lambda found: len(connects(found)) == 1)
    return connects(found)[0].conn


def events_of(logs: Logs, conn: str) -> list[dict[str, Any]]:
    """The structlog events of one connection."""
    return [e for e in logs if e.get("conn") == conn]


def secret_forms(coalition: Coalition) -> Iterator[str]:
    """Every private key of the coalition, as base64 and hex, and the payload plaintext."""
    keys = [*coalition.nodes.values(), *coalition.authorities.values(), coalition.broker_key]
    for key in keys:
        for secret in (bytes(key.signing_key), bytes(key.enc_key) if key.enc_key else b""):
            if secret:
                yield base64.b64encode(secret).decode()
                yield secret.hex()
    yield MARKER.decode()
    yield MARKER.hex()


def assert_no_secrets(logs: Logs, coalition: Coalition) -> None:
    """No private key and no payload plaintext in any captured log line."""
    text = repr(logs)
    leaked = [form for form in secret_forms(coalition) if form in text]
    assert not leaked, f"secrets in the logs: {leaked}"


# --- envelopes ----------------------------------------------------------------------------------


def envelope(ctx: Ctx, *, sender: str = "USA-GW1", orig: str = "USA", ts: int | None = None,
             message_id: bytes | None = None) -> bytes:
    """A valid envelope from ``sender`` to GBR-GW1 (named in ``to`` and sealed for), carrying
    :data:`MARKER`."""
    return build_envelope(
        signing_key=ctx.key(sender).signing_key, sender=sender, topic="maritime.tracks",
        payload=MARKER, label=label("NATO", "SECRET", orig, ["GBR"]), prec=0, ttl=60,
        recipient_keys={"GBR-GW1": ctx.key("GBR-GW1").enc_public},
        now_ms=ts if ts is not None else now_ms(), to=("GBR-GW1",), message_id=message_id)


def resigned(ctx: Ctx, mutate: Callable[[dict[str, Any]], None], *,
             sender: str = "USA-GW1") -> bytes:
    """A valid envelope whose body map ``mutate`` changed, then re-encoded (canonically: map
    keys sorted, arrays left as they are) and validly signed again by ``sender``: only the
    change can be what the broker rejects."""
    body = canonical.decode(Envelope.from_bytes(envelope(ctx, sender=sender)).body)
    mutate(body)
    body_bytes = canonical.encode(body)
    sig = crypto.sign(ctx.key(sender).signing_key, crypto.DOMAIN_ENVELOPE, body_bytes)
    return canonical.encode([body_bytes, sig])


def envelope_id(env: bytes) -> bytes:
    """The id of a parseable envelope."""
    return Envelope.from_bytes(env).id


async def publish_ok(raw: RawNode, env: bytes) -> wire.Receipt:
    """Publish ``env`` and return its receipt."""
    await raw.send(wire.Pub(env=env))
    receipt = await recv_frame(raw)
    assert isinstance(receipt, wire.Receipt), receipt
    return receipt


# --- before welcome -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HandshakeCase:
    """One bad input before ``welcome``: every one of them is refused and closes."""

    send: Callable[[Ctx, RawNode], Awaitable[None]]
    code: str
    #: The node the ``auth_failed`` entry names ("" when the peer never named one).
    claimed: str = ""
    close: int = POLICY_VIOLATION
    prepare: Callable[[Ctx], Awaitable[object]] | None = None


async def _text(ctx: Ctx, raw: RawNode) -> None:
    assert raw.ws is not None
    await raw.ws.send_str('{"t": "hello"}')


async def _garbage(ctx: Ctx, raw: RawNode) -> None:
    await raw.send_bytes(b"\xc1\xff not msgpack")


async def _non_canonical_hello(ctx: Ctx, raw: RawNode) -> None:
    hello = hello_for(raw, ctx.key("USA-GW1")).to_map()
    await raw.send_bytes(msgpack.packb(dict(reversed(hello.items())), use_bin_type=True))


async def _sub_before_hello(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Sub(topic="maritime.>"))


async def _pub_before_hello(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Pub(env=envelope(ctx)))


async def _ping_before_hello(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Ping())


async def _wrong_version(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, ctx.key("USA-GW1"), v=2))


async def _unknown_node(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, KeyFile.generate("node", "XYZ-GW1")))


async def _wrong_nonce(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, ctx.key("USA-GW1"), nonce=os.urandom(32)))


async def _stale_ts(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, ctx.key("USA-GW1"), ts=now_ms() - SKEW_MS - 60_000))


async def _future_ts(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, ctx.key("USA-GW1"), ts=now_ms() + SKEW_MS + 60_000))


async def _signed_by_another_node(ctx: Ctx, raw: RawNode) -> None:
    # Claims USA-GW1, signed with GBR-GW1's (certified, but other) key.
    await raw.send(hello_for(raw, ctx.key("GBR-GW1"), node="USA-GW1"))


async def _expired_certificate(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, ctx.key("FRA-OLD")))


async def _suspended_node(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(hello_for(raw, ctx.key("GBR-GW1")))


async def _suspend_gbr(ctx: Ctx) -> int:
    return await ctx.server.hub.set_status("GBR-GW1", "suspended", operator="test-operator")


async def _oversized_hello(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Pub(env=b"\x00" * ctx.server.limits.max_frame_bytes))


HANDSHAKE_CASES = {
    "text_message": HandshakeCase(_text, "bad_frame"),
    "garbage_bytes": HandshakeCase(_garbage, "bad_frame"),
    "non_canonical_map": HandshakeCase(_non_canonical_hello, "non_canonical"),
    "sub_before_hello": HandshakeCase(_sub_before_hello, "not_authenticated"),
    "pub_before_hello": HandshakeCase(_pub_before_hello, "not_authenticated"),
    "ping_before_hello": HandshakeCase(_ping_before_hello, "not_authenticated"),
    "wrong_protocol_version": HandshakeCase(_wrong_version, "unsupported_version", "USA-GW1"),
    "unknown_node": HandshakeCase(_unknown_node, "unknown_node", "XYZ-GW1"),
    "wrong_nonce": HandshakeCase(_wrong_nonce, "handshake_failed", "USA-GW1"),
    "stale_ts": HandshakeCase(_stale_ts, "handshake_failed", "USA-GW1"),
    "future_ts": HandshakeCase(_future_ts, "handshake_failed", "USA-GW1"),
    "signed_by_another_nodes_key": HandshakeCase(_signed_by_another_node, "bad_signature",
                                                 "USA-GW1"),
    "certificate_outside_window": HandshakeCase(_expired_certificate, "node_inactive",
                                                "FRA-OLD"),
    "suspended_by_operator": HandshakeCase(_suspended_node, "node_inactive", "GBR-GW1",
                                           prepare=_suspend_gbr),
    "oversized_frame": HandshakeCase(_oversized_hello, "too_large", close=MESSAGE_TOO_BIG),
}


@pytest.mark.parametrize("case", HANDSHAKE_CASES.values(), ids=HANDSHAKE_CASES.keys())
async def test_bad_input_before_welcome(server: BrokerServer, coalition: Coalition,
                                        case: HandshakeCase) -> None:
    ctx = Ctx(server, coalition)
    if case.prepare is not None:
        await case.prepare(ctx)
    start = await settle(server)
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            await case.send(ctx, raw)
            error = await recv_error(raw)
            assert (error.code, error.ref) == (case.code, None)
            assert await close_code(raw) == case.close
        (refused,) = [e for e in logs if e["event"] == "connection_refused"]
        assert (refused["code"], refused["reason"]) == (case.code, error.reason)
        (failed,) = await wait_entries(server, start, lambda found: len(found) >= 1)
    # One session entry, auth_failed, naming the claimed node, the code and the reason; the
    # node never counts as connected.
    assert failed == SessionEntry(ts=failed.ts, event="auth_failed", node=case.claimed,
                                  conn=refused["conn"], reason=f"{case.code}: {error.reason}")
    assert entries_since(server, start) == [failed]
    assert events_of(logs, refused["conn"]) == [refused]  # one line per refused connection
    assert_no_secrets(logs, coalition)


async def test_suspension_itself_is_the_only_other_entry(server: BrokerServer,
                                                         coalition: Coalition) -> None:
    """The ``suspended_by_operator`` row's setup: the suspension is an ``admin`` entry of its
    own, before the refused handshake (so the auditor replays the refusal's cause)."""
    start = await settle(server)
    index = await _suspend_gbr(Ctx(server, coalition))
    (entry,) = entries_since(server, start)
    assert index == start
    assert entry == AdminEntry(ts=entry.ts, operator="test-operator", action="suspend",
                               target="GBR-GW1", outcome="ok")


async def test_frame_over_twice_the_limit_before_welcome_is_cut_by_the_websocket_layer(
        server: BrokerServer, coalition: Coalition) -> None:
    """Beyond twice ``max_frame_bytes`` aiohttp refuses the message itself: close 1009 with no
    error frame, logged as ``frame_too_large``. Today no ``auth_failed`` entry is written for
    it (the session never saw a frame)."""
    start = await settle(server)
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            await raw.send_bytes(b"\x00" * (2 * server.limits.max_frame_bytes + 1))
            assert await close_code(raw) == MESSAGE_TOO_BIG
        async with asyncio.timeout(5):
            while not any(e["event"] == "frame_too_large" for e in logs):
                await asyncio.sleep(0.02)
    assert [e["event"] for e in logs if e.get("conn")] == ["frame_too_large"]
    await asyncio.sleep(0.1)  # a late entry would have been appended by now
    await settle(server)
    assert entries_since(server, start) == []
    assert_no_secrets(logs, coalition)


@pytest.mark.parametrize("after_welcome", [False, True], ids=["before_welcome",
                                                               "after_welcome"])
async def test_websocket_protocol_error_closes_without_an_error_frame(
        server: BrokerServer, coalition: Coalition, after_welcome: bool) -> None:
    """A text message that is not UTF-8 breaks the WebSocket protocol itself: aiohttp closes
    with 1007 and the broker sends no error frame and logs nothing. Before ``welcome`` nothing
    is audited either (no ``auth_failed``); after it, the ``disconnect``."""
    ctx = Ctx(server, coalition)
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            conn = await login(ctx, raw) if after_welcome else None
            start = await settle(server)
            assert raw.ws is not None
            await raw.ws.send_frame(b"\xff\xfe not utf-8", aiohttp.WSMsgType.TEXT)
            assert await close_code(raw) == 1007
        if after_welcome:
            (gone,) = await wait_entries(server, start, lambda found: len(found) >= 1)
            assert gone == SessionEntry(ts=gone.ts, event="disconnect", node="USA-GW1",
                                        conn=gone.conn)
            assert gone.conn == conn
        else:
            await asyncio.sleep(0.1)  # a late entry would have been appended by now
            await settle(server)
            assert entries_since(server, start) == []
    assert [e for e in logs if e.get("conn")] == []


async def test_nothing_at_all_is_a_handshake_timeout(coalition: Coalition) -> None:
    limits = Limits(max_frame_bytes=64 * 1024, handshake_timeout_s=0.3)
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "timeout-data",
                            limits=limits, commit=FAST_COMMIT) as server:
        start = await settle(server)
        with capture_logs() as logs:
            async with RawNode(server.url) as raw:
                started = time.monotonic()
                error = await recv_error(raw)
                waited = time.monotonic() - started
                assert (error.code, error.ref) == ("not_authenticated", None)
                assert await close_code(raw) == POLICY_VIOLATION
            (failed,) = await wait_entries(server, start, lambda found: len(found) >= 1)
        assert 0.2 <= waited < 2
        (refused,) = [e for e in logs if e["event"] == "connection_refused"]
        assert refused["code"] == "not_authenticated"
        assert failed == SessionEntry(ts=failed.ts, event="auth_failed", node="",
                                      conn=refused["conn"],
                                      reason="not_authenticated: no hello before the handshake "
                                             "timeout")
        assert entries_since(server, start) == [failed]


# --- after welcome: frames --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FrameCase:
    """One bad frame after ``welcome`` that is answered with an error; the connection
    survives and nothing is audited or logged."""

    send: Callable[[Ctx, RawNode], Awaitable[None]]
    code: str


async def _text_after(ctx: Ctx, raw: RawNode) -> None:
    assert raw.ws is not None
    await raw.ws.send_str('{"t": "ping"}')


async def _non_canonical_sub(ctx: Ctx, raw: RawNode) -> None:
    # A valid ``sub`` frame with its keys out of order: valid msgpack, not canonical.
    await raw.send_bytes(msgpack.packb({"topic": "maritime.>", "t": "sub"}, use_bin_type=True))


async def _unknown_type(ctx: Ctx, raw: RawNode) -> None:
    await raw.send_bytes(canonical.encode({"t": "shutdown"}))


async def _unknown_field(ctx: Ctx, raw: RawNode) -> None:
    await raw.send_bytes(canonical.encode({"t": "ping", "x": 1}))


async def _deliver(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Deliver(env=envelope(ctx), seq=1))


async def _welcome(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Welcome(node="GBR-GW1"))


async def _receipt(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Receipt(id=b"\x01" * 16, audit=1, recipients={}))


async def _directory_answer(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Directory(certs=(b"forged",)))


async def _hello_again(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(make_hello(wire.Challenge(v=1, broker=ctx.coalition.broker_name,
                                             nonce=os.urandom(32)),
                              "GBR-GW1", ctx.key("GBR-GW1").signing_key, now_ms()))


FRAME_CASES = {
    "text_message": FrameCase(_text_after, "bad_frame"),
    "garbage_bytes": FrameCase(_garbage, "bad_frame"),
    "non_canonical_map": FrameCase(_non_canonical_sub, "non_canonical"),
    "unknown_frame_type": FrameCase(_unknown_type, "bad_frame"),
    "unknown_field": FrameCase(_unknown_field, "bad_frame"),
    "broker_only_deliver": FrameCase(_deliver, "unexpected_frame"),
    "broker_only_welcome": FrameCase(_welcome, "unexpected_frame"),
    "broker_only_receipt": FrameCase(_receipt, "unexpected_frame"),
    "directory_with_certs": FrameCase(_directory_answer, "unexpected_frame"),
    "second_hello": FrameCase(_hello_again, "unexpected_frame"),
}


@pytest.mark.parametrize("case", FRAME_CASES.values(), ids=FRAME_CASES.keys())
async def test_bad_frame_after_welcome(server: BrokerServer, coalition: Coalition,
                                       case: FrameCase) -> None:
    ctx = Ctx(server, coalition)
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            conn = await login(ctx, raw)
            start = await settle(server)
            await case.send(ctx, raw)
            error = await recv_error(raw)
            assert (error.code, error.ref) == (case.code, None)
            await assert_alive(raw)
            assert entries_since(server, await settle(server)) == []
            assert server.audit.size == start
    assert events_of(logs, conn) == []  # frame-level errors after welcome are not logged
    assert server.hub.subscriptions.get("USA-GW1", set()) == set()
    assert_no_secrets(logs, coalition)


@pytest.mark.parametrize("size", ["over_limit", "over_twice_the_limit"])
async def test_oversized_frame_after_welcome_closes_with_1009(
        server: BrokerServer, coalition: Coalition, size: str) -> None:
    """Over the limit: ``too_large`` then close 1009, logged ``connection_closed``; over twice
    the limit aiohttp cuts it without an error frame (``frame_too_large``). Either way the only
    entry is the ``disconnect``."""
    ctx = Ctx(server, coalition)
    limit = server.limits.max_frame_bytes
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            conn = await login(ctx, raw)
            start = await settle(server)
            if size == "over_limit":
                await raw.send(wire.Pub(env=b"\x00" * limit))
                error = await recv_error(raw)
                assert (error.code, error.ref) == ("too_large", None)
            else:
                await raw.send_bytes(b"\x00" * (2 * limit + 1))
            assert await close_code(raw) == MESSAGE_TOO_BIG
        (gone,) = await wait_entries(server, start, lambda found: len(found) >= 1)
    assert gone == SessionEntry(ts=gone.ts, event="disconnect", node="USA-GW1", conn=conn)
    events = [(e["event"], e.get("code")) for e in events_of(logs, conn)]
    assert events == ([("connection_closed", "too_large")] if size == "over_limit"
                      else [("frame_too_large", None)])
    assert_no_secrets(logs, coalition)


# --- after welcome: envelopes -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PubCase:
    """A ``pub`` whose envelope the broker rejects: ``error`` (with ``ref`` = the envelope id
    once it parsed), the connection survives, nothing is routed or audited."""

    build: Callable[[Ctx, RawNode], Awaitable[bytes]]
    code: str
    #: Whether the error carries ``ref`` = the envelope's id (it does once the envelope parsed).
    ref: bool


def _sync(build: Callable[[Ctx], bytes]) -> Callable[[Ctx, RawNode], Awaitable[bytes]]:
    """A case builder that needs no setup on the connection."""
    async def run(ctx: Ctx, raw: RawNode) -> bytes:
        return build(ctx)
    return run


def _non_canonical_body(ctx: Ctx) -> bytes:
    body = canonical.decode(Envelope.from_bytes(envelope(ctx)).body)
    reordered = msgpack.packb(dict(reversed(list(body.items()))), use_bin_type=True)
    sig = crypto.sign(ctx.key("USA-GW1").signing_key, crypto.DOMAIN_ENVELOPE, reordered)
    return canonical.encode([reordered, sig])


def _bad_signature(ctx: Ctx) -> bytes:
    body, sig = canonical.decode(envelope(ctx))
    return canonical.encode([body, bytes([sig[0] ^ 0x01]) + sig[1:]])


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A body mutation setting ``key`` to ``value``."""
    def mutate(body: dict[str, Any]) -> None:
        body[key] = value
    return mutate


def _unsorted_rel(body: dict[str, Any]) -> None:
    body["label"]["rel"] = ["USA", "GBR"]


def _no_rel(body: dict[str, Any]) -> None:
    del body["label"]["rel"]


def _enc_alg(body: dict[str, Any]) -> None:
    body["enc"]["alg"] = "aes256gcm"


async def _replayed(ctx: Ctx, raw: RawNode) -> bytes:
    env = envelope(ctx)
    await publish_ok(raw, env)
    return env


async def _replayed_id(ctx: Ctx, raw: RawNode) -> bytes:
    first = envelope(ctx)
    await publish_ok(raw, first)
    # Fresh bytes, fresh ts, valid signature: only the id was seen before.
    return envelope(ctx, message_id=envelope_id(first), ts=now_ms() + 1)


PUB_CASES = {
    "not_an_envelope_bytes": PubCase(_sync(lambda ctx: b"\xc1 not msgpack"), "bad_frame", False),
    "not_an_envelope_map": PubCase(_sync(lambda ctx: canonical.encode({"body": b"x"})),
                                   "bad_frame", False),
    "non_canonical_body": PubCase(_sync(_non_canonical_body), "non_canonical", False),
    "bad_signature": PubCase(_sync(_bad_signature), "bad_signature", True),
    "from_another_node": PubCase(_sync(lambda ctx: envelope(ctx, sender="USA-GW2")),
                                 "sender_mismatch", True),
    "orig_another_nation": PubCase(_sync(lambda ctx: envelope(ctx, orig="GBR")),
                                   "sender_mismatch", True),
    "replayed_envelope": PubCase(_replayed, "replay", True),
    "replayed_id": PubCase(_replayed_id, "replay", True),
    "stale_ts": PubCase(_sync(lambda ctx: envelope(ctx, ts=now_ms() - SKEW_MS - 60_000)),
                        "replay", True),
    "future_ts": PubCase(_sync(lambda ctx: envelope(ctx, ts=now_ms() + SKEW_MS + 60_000)),
                         "replay", True),
    "invalid_topic": PubCase(_sync(lambda ctx: resigned(ctx, _set("topic", "Maritime..x"))),
                             "invalid_topic", False),
    "invalid_label_unsorted_rel": PubCase(_sync(lambda ctx: resigned(ctx, _unsorted_rel)),
                                          "invalid_label", False),
    "invalid_label_missing_rel": PubCase(_sync(lambda ctx: resigned(ctx, _no_rel)),
                                         "invalid_label", False),
    "unsupported_enc_alg": PubCase(_sync(lambda ctx: resigned(ctx, _enc_alg)),
                                   "unsupported_version", False),
    "unsupported_envelope_version": PubCase(_sync(lambda ctx: resigned(ctx, _set("v", 2))),
                                            "unsupported_version", False),
    "ttl_out_of_range": PubCase(
        _sync(lambda ctx: resigned(ctx, _set("ttl", MAX_TTL_SECONDS + 1))), "bad_frame", False),
    "unsorted_to": PubCase(
        _sync(lambda ctx: resigned(ctx, _set("to", ["USA-GW2", "GBR-GW1"]))), "bad_frame", False),
}


@pytest.mark.parametrize("case", PUB_CASES.values(), ids=PUB_CASES.keys())
async def test_rejected_envelope(server: BrokerServer, coalition: Coalition,
                                 case: PubCase) -> None:
    ctx = Ctx(server, coalition)
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            conn = await login(ctx, raw)
            env = await case.build(ctx, raw)
            start = await settle(server)
            routed_before = _routed(server)
            queued_before = _queued(server, "GBR-GW1")
            await raw.send(wire.Pub(env=env))
            error = await recv_error(raw)
            assert error.code == case.code
            assert error.ref == (envelope_id(env) if case.ref else None)
            await assert_alive(raw)
            # Nothing of it is routed: no entry at all (no route), nothing queued.
            assert entries_since(server, await settle(server)) == []
            assert server.audit.size == start
            assert _routed(server) == routed_before
            assert _queued(server, "GBR-GW1") == queued_before
    (rejected,) = events_of(logs, conn)
    assert (rejected["event"], rejected["frame"], rejected["code"]) == (
        "request_rejected", "pub", case.code)
    assert rejected["reason"] == error.reason
    assert_no_secrets(logs, coalition)


def _routed(server: BrokerServer) -> list[bytes]:
    """The message ids of every ``route`` entry so far."""
    return [e.id for e in entries_since(server, 0) if isinstance(e, RouteEntry)]


def _queued(server: BrokerServer, node: str) -> int:
    """How many copies wait in ``node``'s queue."""
    queue = server.hub.queues.get(node)
    return 0 if queue is None else queue.depth


async def test_a_valid_envelope_is_routed_so_the_rejections_above_can_fail(
        server: BrokerServer, coalition: Coalition) -> None:
    """The control for :func:`test_rejected_envelope`: the same envelope, unaltered, is
    receipted, queued for GBR-GW1 and gets its ``route`` entry."""
    ctx = Ctx(server, coalition)
    async with RawNode(server.url) as raw:
        await login(ctx, raw)
        env = envelope(ctx)
        receipt = await publish_ok(raw, env)
    assert receipt.recipients == {"GBR-GW1": "queued"}
    assert _routed(server) == [envelope_id(env)]
    assert _queued(server, "GBR-GW1") == 1


async def test_label_valid_in_shape_but_not_in_its_scheme_is_routed_and_denied(
        server: BrokerServer, coalition: Coalition) -> None:
    """Not an error: a label whose class its scheme does not know parses, so the envelope is
    receipted with ``denied:invalid_label`` for every candidate and audited as a ``route``
    entry with that decision; nothing is queued."""
    ctx = Ctx(server, coalition)
    env = build_envelope(
        signing_key=ctx.key("USA-GW1").signing_key, sender="USA-GW1", topic="maritime.tracks",
        payload=MARKER, label=label("NATO", "ULTRA", "USA", ["GBR"]), prec=0, ttl=60,
        recipient_keys={"GBR-GW1": ctx.key("GBR-GW1").enc_public}, now_ms=now_ms(),
        to=("GBR-GW1",))
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            conn = await login(ctx, raw)
            start = await settle(server)
            receipt = await publish_ok(raw, env)
    assert receipt.recipients == {"GBR-GW1": "denied:invalid_label"}
    (route,) = entries_since(server, start)[:1]
    assert isinstance(route, RouteEntry) and route.id == envelope_id(env)
    assert [(n, d.permit, d.reasons) for n, d in route.decisions.items()] == [
        ("GBR-GW1", False, ("invalid_label",))]
    assert _queued(server, "GBR-GW1") == 0
    assert events_of(logs, conn) == []
    assert_no_secrets(logs, coalition)


@pytest.mark.parametrize("forgery", ["bad_signature", "sent_by_another_node"])
async def test_a_rejected_envelope_does_not_burn_its_id(
        server: BrokerServer, coalition: Coalition, forgery: str) -> None:
    """The replay guard records an id only after the signature verified for the authenticated
    sender: a forger replaying (or mangling) someone's envelope first cannot make the genuine
    one a ``replay``."""
    ctx = Ctx(server, coalition)
    genuine = envelope(ctx)
    async with RawNode(server.url) as usa, RawNode(server.url) as other:
        await login(ctx, usa, "USA-GW1")
        if forgery == "bad_signature":  # the same id and body, a mangled signature
            body, _sig = canonical.decode(genuine)
            await usa.send(wire.Pub(env=canonical.encode([body, bytes(64)])))
            assert (await recv_error(usa)).code == "bad_signature"
        else:  # USA-GW2 sends USA-GW1's envelope first
            await login(ctx, other, "USA-GW2")
            await other.send(wire.Pub(env=genuine))
            assert (await recv_error(other)).code == "sender_mismatch"
        receipt = await publish_ok(usa, genuine)
    assert receipt.id == envelope_id(genuine)
    assert receipt.recipients == {"GBR-GW1": "queued"}
    assert _routed(server) == [envelope_id(genuine)]


# --- after welcome: other requests --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequestCase:
    """A request after ``welcome`` with bad content: answered (``error`` with ``code``, or the
    documented non-error ``answer``), the connection survives, nothing is audited."""

    send: Callable[[Ctx, RawNode], Awaitable[None]]
    code: str | None
    #: The structlog event on the connection (``request_rejected`` or nothing).
    logged: bool
    answer: Callable[[wire.Frame], bool] | None = None
    prepare: Callable[[Ctx], Awaitable[None]] | None = None


async def _sub_bad_pattern(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Sub(topic="maritime.>.x"))


async def _unsub_bad_pattern(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Unsub(topic="Maritime.*"))


async def _route_garbage_label(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Route(topic="maritime.tracks", label={"class": 7, "junk": b"\x00"},
                              to=("GBR-GW1",)))


def _denied_invalid_label(frame: wire.Frame) -> bool:
    return frame == wire.Routes(recipients={"GBR-GW1": "deny:invalid_label"}, keys={})


async def _route_label_not_a_map(ctx: Ctx, raw: RawNode) -> None:
    await raw.send_bytes(canonical.encode({"t": "route", "topic": "maritime.tracks",
                                           "label": "SECRET"}))


async def _route_bad_topic(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Route(topic="maritime tracks",
                              label=label("NATO", "SECRET", "USA", ["GBR"]).to_map()))


async def _ack_unknown(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Ack(seqs=(7, 99_999, 1 << 40)))


async def _another_nodes_route_entry(ctx: Ctx) -> None:
    """USA-GW2 publishes; wait until a checkpoint covers its ``route`` entry."""
    async with RawNode(ctx.server.url) as other:
        await login(ctx, other, "USA-GW2")
        receipt = await publish_ok(other, envelope(ctx, sender="USA-GW2"))
    ctx.index = receipt.audit
    async with asyncio.timeout(5):
        while (ctx.server.audit.latest is None
               or ctx.server.audit.latest.size <= receipt.audit
               or not any(isinstance(e, SessionEntry) and e.event == "disconnect"
                          for e in entries_since(ctx.server, receipt.audit))):
            await asyncio.sleep(0.02)


async def _prove_others(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Prove(index=ctx.index))


async def _prove_beyond(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Prove(index=1 << 40))


async def _cosign_garbage(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Cosign(line="— USA-GW1 not base64!"))


async def _cosign_unverifiable(ctx: Ctx, raw: RawNode) -> None:
    await raw.send(wire.Cosign(line="— USA-GW1 " + base64.b64encode(os.urandom(76)).decode()))


async def _cosign_of_another_witness(ctx: Ctx, raw: RawNode) -> None:
    # GBR-GW1's genuine cosignature of the latest checkpoint, relayed by USA-GW1.
    latest = ctx.server.audit.latest
    assert latest is not None
    gbr = Cosigner.from_seed("GBR-GW1", bytes(ctx.key("GBR-GW1").signing_key))
    line = gbr.cosign(parse_note(latest.note).text, int(time.time())).to_line()
    await raw.send(wire.Cosign(line=line))


REQUEST_CASES = {
    "sub_invalid_pattern": RequestCase(_sub_bad_pattern, "invalid_topic", True),
    "unsub_invalid_pattern": RequestCase(_unsub_bad_pattern, "invalid_topic", True),
    "route_garbage_label": RequestCase(_route_garbage_label, None, False,
                                       answer=_denied_invalid_label),
    "route_label_not_a_map": RequestCase(_route_label_not_a_map, "bad_frame", False),
    "route_invalid_topic": RequestCase(_route_bad_topic, "invalid_topic", True),
    "ack_unknown_seqs": RequestCase(_ack_unknown, None, False),
    "prove_another_nodes_entry": RequestCase(_prove_others, "unexpected_frame", True,
                                             prepare=_another_nodes_route_entry),
    "prove_beyond_the_checkpoint": RequestCase(_prove_beyond, "unavailable", True),
    "cosign_malformed_line": RequestCase(_cosign_garbage, "bad_frame", True),
    "cosign_does_not_verify": RequestCase(_cosign_unverifiable, "bad_signature", True),
    "cosign_of_another_witness": RequestCase(_cosign_of_another_witness, "bad_signature", True),
}


@pytest.mark.parametrize("case", REQUEST_CASES.values(), ids=REQUEST_CASES.keys())
async def test_bad_request_after_welcome(server: BrokerServer, coalition: Coalition,
                                         case: RequestCase) -> None:
    ctx = Ctx(server, coalition)
    if case.prepare is not None:
        await case.prepare(ctx)
    async with asyncio.timeout(5):  # the cosign cases need a checkpoint to exist
        while server.audit.latest is None:
            await asyncio.sleep(0.02)
    with capture_logs() as logs:
        async with RawNode(server.url) as raw:
            conn = await login(ctx, raw)
            start = await settle(server)
            await case.send(ctx, raw)
            if case.code is not None:
                error = await recv_error(raw)
                assert (error.code, error.ref) == (case.code, None)
            elif case.answer is not None:
                answer = await recv_frame(raw)
                assert case.answer(answer), answer
            await assert_alive(raw)
            assert entries_since(server, await settle(server)) == []
            assert server.audit.size == start
    events = [(e["event"], e.get("code")) for e in events_of(logs, conn)]
    assert events == ([("request_rejected", case.code)] if case.logged else [])
    assert server.hub.subscriptions.get("USA-GW1", set()) == set()
    assert server.audit.store.last_cosigned_size("USA-GW1") == 0  # no cosignature stored
    assert_no_secrets(logs, coalition)
