"""Refused TLS handshakes on the node listener are logged (``tls_handshake_refused``, at most
once per interval per address and kind) and counted (``coalition_tls_handshakes_refused``), under
asyncio's loop and under uvloop (the one ``coalition broker serve`` runs): a client without a
certificate, with one from another CA, plain bytes to the TLS port, a client that never starts
its handshake, one that hangs up. A valid client gets through and nothing is logged."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from structlog.testing import capture_logs

from broker.coalition import Coalition
from broker.listener import HandshakeRefusals, TlsSite
from broker.metrics import Metrics
from broker.server import BrokerServer
from broker.tls import (
    REFUSAL_KINDS,
    HandshakeRefusal,
    client_context,
    handshake_refusal,
    server_context,
)
from tests.integration.test_tls import Ca, exchange, gateway, self_signed, sessions, tls_broker

uvloop = pytest.importorskip("uvloop")

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
EVENT = "tls_handshake_refused"
#: Short, so that the timeout case takes half a second.
HANDSHAKE_TIMEOUT_S = 0.5


@pytest.fixture(params=LOOPS.values(), ids=LOOPS.keys())
def run(request: pytest.FixtureRequest) -> Iterator[Run[Any]]:
    """Runs a scenario on a fresh event loop: asyncio's, then uvloop's."""
    with asyncio.Runner(loop_factory=request.param) as runner:
        yield runner.run


class Pki:
    """The broker's self-signed certificate, the gateways' CA and a stranger CA."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert, self.key = self_signed(directory)
        self.ca, self.stranger = Ca.make("Coalition gateways CA"), Ca.make("Someone else")
        self.ca_file = self.ca.write(directory / "clients-ca.crt")

    def server(self) -> ssl.SSLContext:
        """Mutual TLS: clients need a certificate from ``ca``."""
        return server_context(self.cert, self.key, client_ca=self.ca_file)

    def client(self, issuer: Ca | None, name: str = "usa-gw1") -> ssl.SSLContext:
        """A client that trusts the broker, with a certificate from ``issuer`` (or none)."""
        if issuer is None:
            return client_context(self.cert)
        return client_context(self.cert, *issuer.issue_client(self.directory, name))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


# --- helpers ---------------------------------------------------------------------------


def refusals(server: BrokerServer) -> HandshakeRefusals:
    assert server._runner is not None
    (site,) = [s for s in server._runner.sites if isinstance(s, TlsSite)]
    return site.refusals


def counted(server: BrokerServer) -> dict[str, float]:
    """``coalition_tls_handshakes_refused_total`` by kind."""
    registry = server.hub.metrics.registry  # the broker's, exported at /metrics
    return {kind: registry.get_sample_value("coalition_tls_handshakes_refused_total",
                                            {"kind": kind}) for kind in REFUSAL_KINDS}


#: No refusal of any kind.
NONE = dict.fromkeys(REFUSAL_KINDS, 0.0)


def only(kind: str, count: float = 1) -> dict[str, float]:
    return {**NONE, kind: count}


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def connected_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def drained(reader: asyncio.StreamReader) -> None:
    """Read until the broker closes the connection (end of stream, a reset or a TLS alert)."""
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        while await asyncio.wait_for(reader.read(4096), 5):
            pass


async def tls_attempt(port: int, context: ssl.SSLContext) -> int:
    """A TLS client that waits for the broker's verdict; its own port. (In TLS 1.3 the client's
    side of the handshake completes before the broker checks the client's certificate.)"""
    sock = await connected_socket(port)
    own_port: int = sock.getsockname()[1]
    reader, writer = await asyncio.open_connection(sock=sock, ssl=context,
                                                   server_hostname="127.0.0.1")
    try:
        await drained(reader)
    finally:
        writer.close()
    return own_port


async def raw_attempt(port: int, data: bytes, *, hang_up: bool = False) -> int:
    """A plain TCP client that sends ``data`` and waits for the broker to close the connection
    (or, with ``hang_up``, closes it itself at once); its own port."""
    sock = await connected_socket(port)
    own_port: int = sock.getsockname()[1]
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(data)
        if not hang_up:
            await drained(reader)
    finally:
        writer.close()
    return own_port


async def refused_once(server: BrokerServer, attempt: Coroutine[Any, Any, int],
                       kind: str) -> tuple[int, list[dict[str, Any]]]:
    """Run one refused attempt: the client's port and the refusal events logged meanwhile."""
    with capture_logs() as logs:
        own_port = await attempt
        await until(lambda: counted(server)[kind] >= 1)
    assert counted(server) == only(kind)
    return own_port, [e for e in logs if e["event"] == EVENT]


# --- one refusal each ------------------------------------------------------------------


def test_a_client_without_a_certificate_is_logged_and_counted(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server()) as server:
            port, events = await refused_once(
                server, tls_attempt(server.port, pki.client(None)), "no_certificate")
            assert events == [{
                "event": EVENT, "log_level": "warning", "remote": "127.0.0.1",
                "remote_port": port, "kind": "no_certificate",
                "reason": "PEER_DID_NOT_RETURN_A_CERTIFICATE", "held_back": 0}]
            assert sessions(server) == []
    run(scenario())


def test_a_certificate_from_another_ca_is_logged_as_a_bad_certificate(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server()) as server:
            port, events = await refused_once(
                server, tls_attempt(server.port, pki.client(pki.stranger)), "bad_certificate")
            assert events == [{
                "event": EVENT, "log_level": "warning", "remote": "127.0.0.1",
                "remote_port": port, "kind": "bad_certificate",
                "reason": "CERTIFICATE_VERIFY_FAILED",
                "detail": "unable to get local issuer certificate", "held_back": 0}]
    run(scenario())


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET /v1/node HTTP/1.1\r\nHost: broker\r\nUpgrade: websocket\r\n\r\n", "HTTP_REQUEST"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "WRONG_VERSION_NUMBER"),
], ids=["http", "ssh"])
def test_plain_bytes_to_the_tls_port_are_logged_as_not_tls(
        run: Run[None], coalition: Coalition, pki: Pki, data: bytes, reason: str) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server()) as server:
            port, events = await refused_once(server, raw_attempt(server.port, data), "not_tls")
            assert [(e["kind"], e["reason"], e["remote_port"]) for e in events] == [
                ("not_tls", reason, port)]
    run(scenario())


def test_a_client_that_never_starts_its_handshake_is_logged_as_a_timeout(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server(),
                              handshake_timeout_s=HANDSHAKE_TIMEOUT_S) as server:
            loop = asyncio.get_running_loop()
            started = loop.time()
            port, events = await refused_once(server, raw_attempt(server.port, b""), "timeout")
            # Dropped by the broker after the handshake timeout, not the loop's default 60 s.
            assert HANDSHAKE_TIMEOUT_S * 0.9 <= loop.time() - started < 5
            assert [(e["log_level"], e["kind"], e["reason"], e["remote_port"])
                    for e in events] == [("warning", "timeout", "timeout", port)]
    run(scenario())


def test_a_client_that_hangs_up_during_the_handshake_is_logged_at_info(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server()) as server:
            port, events = await refused_once(
                server, raw_attempt(server.port, b"\x16\x03\x01", hang_up=True),
                "client_aborted")
            assert [(e["log_level"], e["kind"], e["reason"], e["remote_port"])
                    for e in events] == [("info", "client_aborted", "connection_closed", port)]
    run(scenario())


# --- the flood, the valid client, the shutdown -----------------------------------------


def test_a_flood_from_one_address_is_counted_in_full_and_logged_once(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server()) as server:
            with capture_logs() as logs:
                await asyncio.gather(*(raw_attempt(server.port, b"\0" * 16) for _ in range(8)))
                await until(lambda: counted(server)["not_tls"] >= 8)
            assert counted(server) == only("not_tls", 8)
            assert [(e["kind"], e["held_back"]) for e in logs if e["event"] == EVENT] == [
                ("not_tls", 0)]
    run(scenario())


def test_a_client_with_a_certificate_from_the_ca_connects_and_nothing_is_logged(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_broker(coalition, pki.server()) as server:
            with capture_logs() as logs:
                async with gateway(server.url, coalition, "USA-GW1",
                                   pki.client(pki.ca, "usa-gw1")) as usa, \
                        gateway(server.url, coalition, "GBR-GW1",
                                pki.client(pki.ca, "gbr-gw1")) as gbr:
                    await exchange(usa, gbr, b"admitted")
            assert [e for e in logs if e["event"] == EVENT] == []
            assert counted(server) == NONE
            assert b'coalition_tls_handshakes_refused_total{kind="no_certificate"} 0.0' in (
                refusals(server).metrics.exposition())
    run(scenario())


def test_a_handshake_in_progress_is_dropped_when_the_broker_stops(
        run: Run[None], coalition: Coalition, pki: Pki) -> None:
    async def scenario() -> None:
        with capture_logs() as logs:
            async with tls_broker(coalition, pki.server()) as server:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
                await asyncio.sleep(0.1)
                port = server.port
            try:
                await drained(reader)  # closed by the broker, long before the 10 s timeout
            finally:
                writer.close()
            # A shutdown is no refusal; and the port is free again at once.
            assert [e for e in logs if e["event"] == EVENT] == []
            socket.create_server(("127.0.0.1", port)).close()
    run(scenario())


# --- the pieces ------------------------------------------------------------------------


def test_refusals_are_logged_once_per_interval_per_address_and_kind() -> None:
    book = HandshakeRefusals(Metrics(), interval=10.0)
    no_certificate = ssl.SSLError(1, "[SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE]")
    no_certificate.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    timeout = ConnectionAbortedError("SSL handshake is taking longer than 1 seconds")
    with capture_logs() as logs:
        for t in (0.0, 1.0, 2.0):
            book.record(("192.0.2.1", 40000 + int(t)), no_certificate, now=t)
        book.record(("192.0.2.2", 40100), no_certificate, now=3.0)  # another address
        book.record(("192.0.2.1", 40200), timeout, now=4.0)  # another kind
        book.record(("2001:db8::1", 40300), timeout, now=5.0)
        book.record(("2001:db8::2", 40301), timeout, now=6.0)  # the same /64: held back
        book.record(("192.0.2.1", 40400), no_certificate, now=12.0)  # the interval is over
    assert [(e["remote"], e["remote_port"], e["kind"], e["held_back"]) for e in logs] == [
        ("192.0.2.1", 40000, "no_certificate", 0), ("192.0.2.2", 40100, "no_certificate", 0),
        ("192.0.2.1", 40200, "timeout", 0), ("2001:db8::1", 40300, "timeout", 0),
        ("192.0.2.1", 40400, "no_certificate", 2)]
    registry = book.metrics.registry
    assert {kind: registry.get_sample_value("coalition_tls_handshakes_refused_total",
                                            {"kind": kind}) for kind in REFUSAL_KINDS} == {
        **NONE, "no_certificate": 5, "timeout": 3}


def ssl_error(reason: str | None, cls: type[ssl.SSLError] = ssl.SSLError,
              **attributes: object) -> ssl.SSLError:
    """An error as the ssl module raises it (``reason`` is set on OpenSSL's errors only)."""
    exc = cls(1, f"[SSL: {reason}]")
    if reason is not None:
        exc.reason = reason
    for name, value in attributes.items():
        setattr(exc, name, value)
    return exc


@pytest.mark.parametrize(("error", "expected"), [
    (ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"),
     HandshakeRefusal("no_certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE")),
    (ssl_error("CERTIFICATE_VERIFY_FAILED", ssl.SSLCertVerificationError,
               verify_message="certificate has expired", verify_code=10),
     HandshakeRefusal("bad_certificate", "CERTIFICATE_VERIFY_FAILED", "certificate has expired")),
    (ssl_error("HTTP_REQUEST"), HandshakeRefusal("not_tls", "HTTP_REQUEST")),
    (ssl_error("HTTPS_PROXY_REQUEST"), HandshakeRefusal("not_tls", "HTTPS_PROXY_REQUEST")),
    (ssl_error("WRONG_VERSION_NUMBER"), HandshakeRefusal("not_tls", "WRONG_VERSION_NUMBER")),
    (ssl_error("TLSV1_ALERT_UNKNOWN_CA"),
     HandshakeRefusal("client_aborted", "TLSV1_ALERT_UNKNOWN_CA")),
    (ssl_error("UNEXPECTED_EOF_WHILE_READING", ssl.SSLEOFError),
     HandshakeRefusal("client_aborted", "UNEXPECTED_EOF_WHILE_READING")),
    (ssl_error("UNSUPPORTED_PROTOCOL"), HandshakeRefusal("other", "UNSUPPORTED_PROTOCOL")),
    (ssl_error(None), HandshakeRefusal("other", "SSLError")),
    (ConnectionAbortedError("SSL handshake is taking longer than 10 seconds: aborting"),
     HandshakeRefusal("timeout", "timeout")),
    (TimeoutError(), HandshakeRefusal("timeout", "timeout")),
    (ConnectionResetError(), HandshakeRefusal("client_aborted", "connection_closed")),
    (ConnectionResetError(errno.ECONNRESET, "reset"),
     HandshakeRefusal("client_aborted", "ECONNRESET")),
    (OSError(errno.ENOBUFS, "no buffer space"), HandshakeRefusal("other", "ENOBUFS")),
    (RuntimeError("unexpected"), HandshakeRefusal("other", "RuntimeError")),
], ids=lambda value: (value.kind if isinstance(value, HandshakeRefusal)
                     else getattr(value, "reason", None) or type(value).__name__))
def test_handshake_errors_map_to_a_fixed_set_of_kinds(error: BaseException,
                                                      expected: HandshakeRefusal) -> None:
    refusal = handshake_refusal(error)
    assert refusal == expected
    assert refusal.kind in REFUSAL_KINDS


def test_an_unknown_kind_is_counted_as_other() -> None:
    metrics = Metrics()
    metrics.tls_refused("made_up_by_a_client")
    assert metrics.registry.get_sample_value("coalition_tls_handshakes_refused_total",
                                             {"kind": "other"}) == 1
