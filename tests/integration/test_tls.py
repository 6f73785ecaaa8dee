"""The node listener over TLS, end to end on loopback with certificates made at test time:
gateways exchange messages over ``wss://``, a gateway that does not trust the broker's
certificate fails at once (no endless reconnecting), mutual TLS refuses clients without a
certificate from the configured CA before any WebSocket byte, and a ``[tls]`` configuration
(written with ``coalition tls``) serves ``wss://``, also as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.audit.leaves import SessionEntry, entry_from_bytes
from broker.cli import main
from broker.coalition import Coalition
from broker.config import load_config
from broker.errors import ConfigError
from broker.server import BrokerServer, Limits
from broker.tls import client_context, make_self_signed, server_context
from clients.gateway import GatewayClient, label
from clients.link import Backoff
from tests.integration.conftest import FAST_COMMIT
from tests.integration.process import free_port, running_broker, write_broker_config

TO_GBR = label("NATO", "SECRET", "USA", ["GBR"])


# --- certificates ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ca:
    """A small certificate authority for client certificates (mutual TLS)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue_client(self, directory: Path, name: str) -> tuple[Path, Path]:
        """A client certificate (clientAuth) for ``name``, signed by this CA: (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


def self_signed(directory: Path, name: str = "broker",
                hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
    cert_pem, key_pem = make_self_signed(f"{name}.test", list(hosts), 1)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key


# --- brokers and gateways --------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_broker(coalition: Coalition, context: ssl.SSLContext, port: int = 0,
                     handshake_timeout_s: float = 10.0) -> AsyncIterator[BrokerServer]:
    limits = Limits(max_frame_bytes=64 * 1024, handshake_timeout_s=handshake_timeout_s)
    async with BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                            key=coalition.broker_key, data_dir=coalition.base / "broker-data",
                            port=port, limits=limits,
                            commit=FAST_COMMIT, ssl_context=context) as server:
        yield server


def gateway(url: str, coalition: Coalition, node: str, context: ssl.SSLContext | None,
            reconnect: Backoff | None = None) -> GatewayClient:
    return GatewayClient(url, coalition.nodes[node], coalition.trust_root,
                         broker_name=coalition.broker_name, timeout=5, max_frame=64 * 1024,
                         reconnect=reconnect, ssl=context)


async def exchange(usa: GatewayClient, gbr: GatewayClient, payload: bytes) -> None:
    """USA-GW1 publishes to GBR-GW1, which receives it."""
    await gbr.subscribe("maritime.>")
    receipt = await usa.publish("maritime.tracks", payload, TO_GBR)
    assert receipt.recipients == {"GBR-GW1": "delivered"}
    stream = gbr.messages()
    message = await asyncio.wait_for(anext(stream), 5)
    await stream.aclose()
    assert message.payload == payload


def sessions(server: BrokerServer) -> list[SessionEntry]:
    entries = (entry_from_bytes(e) for e in server.audit.store.entries(0, server.audit.size))
    return [e for e in entries if isinstance(e, SessionEntry)]


async def refused(client: GatewayClient) -> BaseException:
    """The client's first connection fails by itself, promptly; the error it raised."""
    with pytest.raises((aiohttp.ClientError, OSError)) as raised:
        await asyncio.wait_for(client.connect(), 10)
    assert not client.connected and client.failure is not None  # ended, not reconnecting
    await client.close()
    return raised.value


# --- tests -----------------------------------------------------------------------------


async def test_gateways_exchange_a_message_over_wss(coalition: Coalition, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with tls_broker(coalition, server_context(cert, key)) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        pinned = client_context(cert)
        async with gateway(server.url, coalition, "USA-GW1", pinned) as usa, \
                gateway(server.url, coalition, "GBR-GW1", pinned) as gbr:
            await exchange(usa, gbr, b"over tls")
            tls = usa._connection.link.ws.get_extra_info("ssl_object")  # type: ignore[union-attr]
            assert tls.version() == "TLSv1.3"


@pytest.mark.parametrize("trust", ["another certificate", "the system CAs", "wrong host"])
async def test_a_gateway_that_does_not_trust_the_broker_fails_at_once(
        coalition: Coalition, tmp_path: Path, trust: str) -> None:
    hosts = ("broker.example",) if trust == "wrong host" else ("127.0.0.1",)
    cert, key = self_signed(tmp_path, hosts=hosts)
    context = {"another certificate": client_context(self_signed(tmp_path, "other")[0]),
               "the system CAs": None, "wrong host": client_context(cert)}[trust]
    async with tls_broker(coalition, server_context(cert, key)) as server:
        # With reconnection on: a failed first connection is raised, never retried.
        client = gateway(server.url, coalition, "USA-GW1", context, reconnect=Backoff())
        error = await refused(client)
        assert isinstance(error, aiohttp.ClientConnectorCertificateError)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error)
        assert sessions(server) == []  # nothing reached the WebSocket layer


@pytest.mark.parametrize("sends", [b"", b"\x16\x03\x01"])
async def test_a_client_that_never_finishes_its_tls_handshake_is_dropped(
        coalition: Coalition, tmp_path: Path, sends: bytes) -> None:
    """The TLS handshake is bounded by ``handshake_timeout_s``, not the event loop's 60 s: a
    connection that sends nothing, or the start of a ClientHello and then nothing, is closed."""
    cert, key = self_signed(tmp_path)
    async with tls_broker(coalition, server_context(cert, key), handshake_timeout_s=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(sends)
            # Closed by the broker (end of stream, or reset); the bound is far below 60 s.
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 10) == b""
        finally:
            writer.close()
        assert sessions(server) == []


async def test_a_plain_ws_client_gets_nowhere_on_the_tls_listener(
        coalition: Coalition, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    async with tls_broker(coalition, server_context(cert, key)) as server:
        plain = server.url.replace("wss://", "ws://")
        await refused(gateway(plain, coalition, "USA-GW1", None, reconnect=Backoff()))
        assert sessions(server) == []


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
        coalition: Coalition, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    ca, stranger = Ca.make("Coalition gateways CA"), Ca.make("Someone else")
    context = server_context(cert, key, client_ca=ca.write(tmp_path / "clients-ca.crt"))
    async with tls_broker(coalition, context) as server:
        # No client certificate, or one from another CA: refused in the TLS handshake.
        await refused(gateway(server.url, coalition, "FRA-GW1", client_context(cert)))
        foreign = client_context(cert, *stranger.issue_client(tmp_path, "fra-gw1"))
        await refused(gateway(server.url, coalition, "FRA-GW1", foreign))
        # Certificates from the CA get through; the node is still authenticated by its hello.
        usa_tls = client_context(cert, *ca.issue_client(tmp_path, "usa-gw1"))
        gbr_tls = client_context(cert, *ca.issue_client(tmp_path, "gbr-gw1"))
        async with gateway(server.url, coalition, "USA-GW1", usa_tls) as usa, \
                gateway(server.url, coalition, "GBR-GW1", gbr_tls) as gbr:
            await exchange(usa, gbr, b"mutual")
        # The refused connections never reached the WebSocket layer: no session entry at all
        # (not even a failed handshake), only the two admitted gateways.
        assert {(e.event, e.node) for e in sessions(server)} <= {
            (event, node) for event in ("connect", "disconnect")
            for node in ("USA-GW1", "GBR-GW1")}


async def test_a_gateway_reconnects_over_tls_after_a_broker_restart(
        coalition: Coalition, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    pinned = client_context(cert)
    fast = Backoff(initial=0.01, maximum=0.05)
    async with tls_broker(coalition, server_context(cert, key), port) as first:
        usa = gateway(first.url, coalition, "USA-GW1", pinned, reconnect=fast)
        gbr = gateway(first.url, coalition, "GBR-GW1", pinned, reconnect=fast)
        await usa.connect()
        await gbr.connect()
    try:
        async with tls_broker(coalition, server_context(cert, key), port):
            async with asyncio.timeout(10):
                while usa.reconnections < 1 or gbr.reconnections < 1:
                    await asyncio.sleep(0.01)
            await exchange(usa, gbr, b"after the restart")
    finally:
        await usa.close()
        await gbr.close()


def tls_config(tmp_path: Path, coalition: Coalition, tls: str) -> Path:
    config = write_broker_config(tmp_path, coalition)
    config.write_text(config.read_text() + f"[tls]\n{tls}\n")
    return config


async def test_a_tls_section_written_with_coalition_tls_serves_wss(
        coalition: Coalition, tmp_path: Path) -> None:
    assert main(["tls", "--cn", "broker.test", "--host", "127.0.0.1", "--out-cert",
                 str(tmp_path / "tls" / "broker.crt"), "--out-key",
                 str(tmp_path / "tls" / "broker.key.pem")]) == 0
    # Paths relative to the configuration file, as an operator would write them.
    config = load_config(tls_config(tmp_path, coalition,
                                    'cert = "tls/broker.crt"\nkey = "tls/broker.key.pem"'))
    async with BrokerServer.from_config(config) as server:
        assert server.url.startswith("wss://")
        pinned = client_context(tmp_path / "tls" / "broker.crt")
        async with gateway(server.url, coalition, "USA-GW1", pinned) as usa, \
                gateway(server.url, coalition, "GBR-GW1", pinned) as gbr:
            await exchange(usa, gbr, b"configured")


async def test_a_tls_section_with_client_ca_requires_client_certificates(
        coalition: Coalition, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    ca = Ca.make("Coalition gateways CA")
    ca.write(tmp_path / "clients-ca.crt")
    config = load_config(tls_config(tmp_path, coalition, f'cert = "{cert}"\nkey = "{key}"\n'
                                    'client_ca = "clients-ca.crt"'))
    server = BrokerServer.from_config(config)
    assert server.ssl_context is not None
    assert server.ssl_context.verify_mode is ssl.CERT_REQUIRED


@pytest.mark.parametrize("field", ["cert", "key", "client_ca"])
def test_a_bad_tls_path_in_the_configuration_names_the_file(
        coalition: Coalition, tmp_path: Path, field: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = self_signed(tmp_path)
    paths = {"cert": cert, "key": key, "client_ca": cert}
    missing = tmp_path / "missing" / f"{field}.pem"
    paths[field] = missing
    config_path = tls_config(tmp_path, coalition,
                             "\n".join(f'{k} = "{v}"' for k, v in paths.items()))
    with pytest.raises(ConfigError, match="cannot read") as raised:
        BrokerServer.from_config(load_config(config_path))
    assert str(missing) in raised.value.reason
    # check-config, which builds the server the same way, says so to the operator.
    assert main(["broker", "check-config", "--config", str(config_path)]) == 2
    assert str(missing) in capsys.readouterr().err


async def test_coalition_broker_serve_with_tls_logs_a_wss_url_and_serves_it(
        coalition: Coalition, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = tls_config(tmp_path, coalition, f'cert = "{cert}"\nkey = "{key}"')
    async with running_broker(config) as broker:
        assert broker.url.startswith("wss://127.0.0.1:")
        pinned = client_context(cert)
        async with gateway(broker.url, coalition, "USA-GW1", pinned) as usa, \
                gateway(broker.url, coalition, "GBR-GW1", pinned) as gbr:
            await exchange(usa, gbr, b"from a process")
        broker.process.terminate()
        assert await broker.wait() == 0
    connected = {e["node"] for e in broker.events if e.get("event") == "node_connected"}
    assert connected == {"USA-GW1", "GBR-GW1"}
