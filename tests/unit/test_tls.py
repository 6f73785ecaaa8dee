"""broker.tls and ``coalition tls``: contexts with secure defaults, real handshakes on loopback
with certificates generated here, errors that name the bad file, no key material anywhere."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from broker.cli import main
from broker.config import TlsSection
from broker.errors import ConfigError
from broker.tls import client_context, make_self_signed, server_context, server_context_for

HOSTS = ["127.0.0.1", "localhost", "::1"]


def write_pair(tmp_path: Path, name: str = "broker", hosts: list[str] | None = None,
               now: datetime.datetime | None = None) -> tuple[Path, Path]:
    cert_pem, key_pem = make_self_signed(f"{name}.test", hosts or HOSTS, 7, now=now)
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
                    server_hostname: str = "127.0.0.1") -> tuple[str, str]:
    """A real TLS connection on loopback: (protocol version, cipher) as the client saw them,
    after one byte came through."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"!")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname=server_hostname)
            assert await reader.read() == b"!"
            tls = writer.get_extra_info("ssl_object")
            version, cipher = tls.version(), tls.cipher()[0]
            writer.close()
            return version, cipher
    finally:
        listener.close()


# --- make_self_signed ------------------------------------------------------------------


def test_self_signed_certificate_is_a_p256_server_leaf_for_its_hosts() -> None:
    before = datetime.datetime.now(datetime.UTC)
    cert_pem, _ = make_self_signed("broker.test", ["127.0.0.1", "localhost", "::1",
                                                   "localhost"], 30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=broker.test"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]  # duplicates dropped
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca  # vouches for nothing else
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # Back-dated 5 minutes for clocks that run behind; valid for the days asked.
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert before - datetime.timedelta(minutes=5, seconds=2) <= start <= before
    assert end - start == datetime.timedelta(days=30, minutes=5)


def test_self_signed_key_is_unencrypted_pkcs8_and_belongs_to_the_certificate() -> None:
    cert_pem, key_pem = make_self_signed("broker.test", ["localhost"], 1)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS #8, not encrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    assert make_self_signed("broker.test", ["localhost"], 1)[1] != key_pem  # a fresh key


@pytest.mark.parametrize(("cn", "hosts", "days", "message"), [
    ("", ["localhost"], 1, "common name"),
    ("b", [], 1, "at least one host"),
    ("b", ["  "], 1, "at least one host"),
    ("b", ["localhost"], 0, "days"),
    ("b", ["bröker.example"], 1, "neither an IP address nor an ASCII DNS name"),
])
def test_make_self_signed_refuses_what_would_make_a_useless_certificate(
        cn: str, hosts: list[str], days: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_self_signed(cn, hosts, days)


# --- contexts --------------------------------------------------------------------------


def test_server_context_has_secure_defaults_and_requires_client_certs_only_with_a_ca(
        tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path)
    plain = server_context(cert, key)
    assert plain.minimum_version is ssl.TLSVersion.TLSv1_2
    assert plain.verify_mode is ssl.CERT_NONE
    assert plain.options & ssl.OP_NO_RENEGOTIATION
    assert plain.options & ssl.OP_NO_COMPRESSION
    # TLS 1.2 suites: forward-secret AEAD only (TLS 1.3 suites are all of that kind).
    for cipher in plain.get_ciphers():
        if cipher["protocol"] == "TLSv1.2":
            assert cipher["kea"] == "kx-ecdhe" and cipher["aead"], cipher["name"]
    mutual = server_context(cert, key, client_ca=cert)
    assert mutual.verify_mode is ssl.CERT_REQUIRED
    assert mutual.cert_store_stats()["x509"] == 1


def test_client_context_trusts_only_the_given_ca_and_checks_the_host(tmp_path: Path) -> None:
    cert, _ = write_pair(tmp_path)
    ctx = client_context(cert)
    assert ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    # Only the pinned certificate: not the system's CAs, any of which could vouch for anyone.
    assert ctx.cert_store_stats()["x509"] == 1


def test_server_context_for_a_config_section(tmp_path: Path) -> None:
    assert server_context_for(TlsSection()) is None
    cert, key = write_pair(tmp_path)
    ctx = server_context_for(TlsSection(cert=cert, key=key, client_ca=cert))
    assert ctx is not None and ctx.verify_mode is ssl.CERT_REQUIRED


async def test_tls_13_is_negotiated_for_ip_and_dns_hosts(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path)
    server, client = server_context(cert, key), client_context(cert)
    for host in ("127.0.0.1", "localhost"):
        version, _ = await handshake(server, client, server_hostname=host)
        assert version == "TLSv1.3"


async def test_a_tls_12_client_gets_an_ecdhe_aead_suite(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path)
    client = client_context(cert)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = await handshake(server_context(cert, key), client)
    assert version == "TLSv1.2"
    assert cipher.startswith("ECDHE-ECDSA-") and ("GCM" in cipher or "CHACHA20" in cipher)


async def test_a_tls_11_client_is_refused(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path)
    server = server_context(cert, key)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer what it wants to
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 and TLSv1_1 are, indeed
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(server, old)
    # The same client allowed TLS 1.2 gets through: it was the version that was refused.
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert (await handshake(server, old))[0] == "TLSv1.2"


@pytest.mark.parametrize("trust", ["other", "system"])
async def test_a_client_that_does_not_trust_the_certificate_fails_verification(
        tmp_path: Path, trust: str) -> None:
    cert, key = write_pair(tmp_path)
    if trust == "other":
        other, _ = write_pair(tmp_path, "other")
        client = client_context(other)
    else:
        client = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        await handshake(server_context(cert, key), client)


async def test_a_host_not_in_the_certificate_fails_verification(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, hosts=["broker.example"])
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await handshake(server_context(cert, key), client_context(cert))


# --- errors name the file --------------------------------------------------------------


def _encrypted(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret"))


@pytest.mark.parametrize(("case", "broken", "message"), [
    ("missing cert", "cert", "cannot read"),
    ("cert not PEM", "cert", "not a PEM certificate"),
    ("cert is a key", "cert", "not a PEM certificate"),
    ("missing key", "key", "cannot read"),
    ("key not PEM", "key", "not a PEM private key"),
    ("key encrypted", "key", "encrypted"),
    ("key of another cert", "key", "does not belong to the certificate"),
    ("missing client CA", "ca", "cannot read"),
    ("client CA not PEM", "ca", "not a PEM certificate"),
])
def test_server_context_errors_name_the_bad_file_and_never_quote_the_key(
        tmp_path: Path, case: str, broken: str, message: str) -> None:
    cert, key = write_pair(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.read_bytes())
    secret = key.read_bytes()
    target = {"cert": cert, "key": key, "ca": ca}[broken]
    if case.startswith("missing"):
        target.unlink()
    elif case == "cert is a key":
        target.write_bytes(secret)
    elif case == "key encrypted":
        target.write_bytes(_encrypted(secret))
    elif case == "key of another cert":
        _, other_key = write_pair(tmp_path, "other")
        target.write_bytes(other_key.read_bytes())
    else:
        target.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ConfigError, match=message) as raised:
        server_context(cert, key, client_ca=ca)
    assert str(target) in raised.value.reason
    body = b"".join(secret.splitlines()[1:-1]).decode()
    assert body[:16] not in str(raised.value)


def test_client_context_errors_name_the_bad_file(tmp_path: Path) -> None:
    cert, _ = write_pair(tmp_path)
    with pytest.raises(ConfigError, match=f"TLS CA {tmp_path / 'nope.pem'}: cannot read"):
        client_context(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match="go together"):
        client_context(cert, cert=cert)
    (tmp_path / "bad.key").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'bad.key'}: not a PEM private key"):
        client_context(cert, cert=cert, key=tmp_path / "bad.key")


def test_the_listener_certificate_is_logged_without_key_material(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path)
    secret = key.read_bytes()
    with capture_logs() as logs:
        server_context(cert, key, client_ca=cert)
    assert [e["event"] for e in logs] == ["tls_enabled"]
    (event,) = logs
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert event["sha256"] == parsed.fingerprint(parsed.signature_hash_algorithm).hex()  # type: ignore[arg-type]
    assert event["mutual"] is True and event["subject"] == "CN=broker.test"
    text = repr(logs)
    assert "PRIVATE" not in text
    assert all(line.decode() not in text for line in secret.splitlines()[1:-1])


def test_a_certificate_outside_its_validity_is_served_with_a_warning(tmp_path: Path) -> None:
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    cert, key = write_pair(tmp_path, now=long_ago)
    with capture_logs() as logs:
        server_context(cert, key)
    assert [e["event"] for e in logs] == ["tls_enabled", "tls_certificate_not_valid_now"]
    assert logs[1]["log_level"] == "warning"


# --- coalition tls ---------------------------------------------------------------------


def run_tls(tmp_path: Path, *extra: str) -> int:
    return main(["tls", "--cn", "broker.test", "--host", "127.0.0.1", "--host", "localhost",
                 "--days", "30", "--out-cert", str(tmp_path / "broker.crt"),
                 "--out-key", str(tmp_path / "broker.key.pem"), *extra])


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


async def test_cli_writes_a_usable_pair_with_a_private_key_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_tls(tmp_path) == 0
    cert, key = tmp_path / "broker.crt", tmp_path / "broker.key.pem"
    assert mode(key) == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert mode(cert) == 0o644 & ~umask
    version, _ = await handshake(server_context(cert, key), client_context(cert))
    assert version == "TLSv1.3"
    out = capsys.readouterr().out
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert parsed.not_valid_after_utc - parsed.not_valid_before_utc == datetime.timedelta(
        days=30, minutes=5)
    assert f"wrote {key} (private key, mode 0600)" in out
    assert "as their ca" in out
    # The key never reaches the terminal.
    assert all(line.decode() not in out for line in key.read_bytes().splitlines()[1:-1])


@pytest.mark.parametrize("existing", ["broker.crt", "broker.key.pem"])
def test_cli_refuses_to_overwrite_either_file_and_writes_nothing(
        tmp_path: Path, existing: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / existing).write_bytes(b"keep me")
    assert run_tls(tmp_path) == 2
    assert f"{tmp_path / existing} exists; refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_cli_force_replaces_the_pair_and_tightens_an_open_key_file(tmp_path: Path) -> None:
    assert run_tls(tmp_path) == 0
    key = tmp_path / "broker.key.pem"
    old = key.read_bytes()
    key.chmod(0o644)
    assert run_tls(tmp_path) == 2
    assert run_tls(tmp_path, "--force") == 0
    assert key.read_bytes() != old
    assert mode(key) == 0o600
    server_context(tmp_path / "broker.crt", key)  # the new pair matches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.crt", "broker.key.pem"]


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "bröker"], "neither an IP address"),
    (["--host", "x", "--days", "0"], "days must be at least 1"),
    (["--host", "x", "--out-key", "same.pem", "--out-cert", "same.pem"], "different files"),
])
def test_cli_usage_errors_are_reported_not_raised(
        tmp_path: Path, args: list[str], message: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["tls", "--cn", "b", "--out-cert", "c.pem", "--out-key", "k.pem"]
    assert main([*base, *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_help_tells_gateways_to_pin_the_certificate_as_their_ca(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["tls", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "gateways pass the certificate file as `ca`" in text



def test_a_key_too_weak_for_openssl_is_a_config_error_naming_the_files(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # below SECLEVEL 2
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "weak.crt", tmp_path / "weak.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="refused by OpenSSL") as raised:
        server_context(cert_path, key_path)
    assert str(cert_path) in raised.value.reason and str(key_path) in raised.value.reason
