"""TLS for the node listener and for gateways: SSL contexts, and self-signed pairs for trials.

TLS protects the transport only. Who a node is stays decided by the signed hello against the
node certificates of the trust root (``docs/protocol.md``); a client certificate (mutual TLS,
``client_ca``) is an extra admission gate at the network edge, not an identity the broker uses.

Both ends negotiate TLS 1.3 whenever the other end can; TLS 1.2 is the floor, limited to
forward-secret AEAD suites. Certificate files are parsed here first, with ``cryptography``, so
that a bad file is a :class:`~broker.errors.ConfigError` naming it (OpenSSL's own errors do not
say which file they are about). Nothing here logs or puts into an error any key material.

:func:`handshake_refusal` names why a client's handshake on the node listener failed, from the
error the event loop raised: OpenSSL's reason code only, never a certificate's content.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import ipaddress
import ssl
from collections.abc import Sequence
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.config import TlsSection
from broker.errors import ConfigError

log = structlog.get_logger("broker.tls")

#: TLS 1.2 suites allowed (TLS 1.3 suites are all AEAD with forward secrecy and stay OpenSSL's
#: default): ephemeral ECDH key exchange and AEAD ciphers only, no CBC, no static RSA, no DHE.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: How far back a generated certificate's validity starts, for peers whose clocks run behind.
BACKDATE = datetime.timedelta(minutes=5)

#: Why a handshake failed, coarsely: the label values of ``coalition_tls_handshakes_refused``.
#: A fixed set, so that nothing a client sends can add a time series.
REFUSAL_KINDS = ("no_certificate", "bad_certificate", "not_tls", "timeout", "client_aborted",
                 "other")

#: OpenSSL reasons for a client that sent no certificate although ``client_ca`` requires one.
_NO_CERTIFICATE = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED"})
#: OpenSSL reasons for bytes that are not a TLS ClientHello at all: an HTTP request (plain
#: ``ws://`` or ``http://`` to the TLS port), a proxy's CONNECT, or anything else.
_NOT_TLS = frozenset({"HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER",
                      "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"})
#: Prefixes of the reasons for a TLS alert the client sent: it gave up on the handshake itself,
#: typically because it does not trust the broker's certificate.
_CLIENT_ALERT = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The node listener's context: ``cert`` (PEM, leaf first, then any intermediates) and its
    unencrypted PEM ``key``; with ``client_ca``, every client must present a certificate that
    chains to it (mutual TLS), or the handshake fails before any WebSocket byte.

    Raises :class:`ConfigError` naming the file that cannot be read or parsed, or the pair if
    the key does not belong to the certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _harden(ctx)
    leaf = _load_pair(ctx, cert, key, "TLS certificate")
    # Without a CA the server asks for no client certificate (CERT_NONE, the default here).
    if client_ca is not None:
        _load_ca(ctx, client_ca, "TLS client CA")
        ctx.verify_mode = ssl.CERT_REQUIRED
    _log_certificate(cert, leaf, mutual=client_ca is not None)
    return ctx


def server_context_for(section: TlsSection) -> ssl.SSLContext | None:
    """The listener's context from the configuration's ``[tls]`` section; ``None`` (plain
    WebSocket) when it names no certificate. The configuration already checked that ``cert``
    and ``key`` come together and that ``client_ca`` needs them."""
    if section.cert is None or section.key is None:
        return None
    return server_context(section.cert, section.key, section.client_ca)


def client_context(ca: Path, cert: Path | None = None,
                   key: Path | None = None) -> ssl.SSLContext:
    """A gateway's context: the broker's certificate must chain to ``ca`` (the coalition's CA,
    or the broker's self-signed certificate itself) and name the host of the URL; the system's
    CAs are not trusted. ``cert`` and ``key`` (together) are the gateway's client certificate,
    for a broker that requires mutual TLS.

    Raises :class:`ConfigError` naming the file that cannot be read or parsed.
    """
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate and its key go together")
    _read_certs(ca, "TLS CA")  # a clear error for a missing or malformed file
    try:
        # With a cafile, create_default_context loads that and not the system's CAs (without
        # one it would load them all: any public CA could then vouch for "the broker").
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS CA {ca}: refused by OpenSSL: {exc}") from exc
    _harden(ctx)  # check_hostname and CERT_REQUIRED are create_default_context's own
    if cert is not None and key is not None:
        _load_pair(ctx, cert, key, "TLS client certificate")
    return ctx


def make_self_signed(common_name: str, hosts: Sequence[str], days: int, *,
                     now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 server certificate and its key, both PEM (the key is PKCS #8,
    unencrypted: protect the file). For trials and closed networks: gateways pin the
    certificate itself as their ``ca``.

    ``hosts`` become the subjectAltName (an entry that parses as an IP address is an IP entry,
    anything else a DNS name); clients check the host of the URL against them. The validity
    starts 5 minutes before ``now`` (for peers whose clock runs behind) and lasts ``days``.

    P-256 rather than Ed25519: every TLS stack accepts it for server authentication, in TLS 1.2
    as in 1.3. The certificate is not a CA (``cA=false``): it authenticates this one server
    and cannot vouch for any other, even if its key leaks. Raises ``ValueError`` for an empty
    name or host list, a non-positive ``days``, or a host that is not a valid DNS name.
    """
    if not common_name:
        raise ValueError("the certificate needs a common name")
    if days < 1:
        raise ValueError("days must be at least 1")
    names = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not names:
        raise ValueError("the certificate needs at least one host (DNS name or IP address)")
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in names]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Key identifiers: strict verifiers (Python 3.13's default VERIFY_X509_STRICT) want them.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
    )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate (DER), hex: what an operator compares out of band."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclasses.dataclass(frozen=True)
class HandshakeRefusal:
    """Why one TLS handshake on the node listener failed."""

    #: One of :data:`REFUSAL_KINDS`.
    kind: str
    #: Short and fixed: OpenSSL's reason code (``PEER_DID_NOT_RETURN_A_CERTIFICATE``,
    #: ``CERTIFICATE_VERIFY_FAILED``, ``HTTP_REQUEST``...), ``timeout``, ``connection_closed``,
    #: an errno name, or an exception's class name.
    reason: str
    #: OpenSSL's verdict on a client certificate (``certificate has expired``, ``unable to get
    #: local issuer certificate``...): a fixed message, never the certificate's content.
    detail: str | None = None


def handshake_refusal(exc: BaseException) -> HandshakeRefusal:
    """Classify the error ``loop.connect_accepted_socket`` raised for a failed server-side
    handshake. Both asyncio's loop and uvloop raise the ``ssl.SSLError`` of the handshake,
    ``ConnectionAbortedError`` when ``ssl_handshake_timeout`` expires, and
    ``ConnectionResetError`` when the client closes the connection before the handshake ends."""
    if isinstance(exc, ssl.SSLError):
        # ``reason`` is set by the ssl module on the errors OpenSSL reports, not on all others.
        reason = getattr(exc, "reason", None) or type(exc).__name__
        if isinstance(exc, ssl.SSLCertVerificationError):
            return HandshakeRefusal("bad_certificate", reason,
                                    getattr(exc, "verify_message", None) or None)
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return HandshakeRefusal("client_aborted", reason)
        return HandshakeRefusal(_ssl_kind(reason), reason)
    if isinstance(exc, (ConnectionAbortedError, TimeoutError)):
        return HandshakeRefusal("timeout", "timeout")
    if isinstance(exc, ConnectionError):  # reset, broken pipe, or end of stream
        return HandshakeRefusal("client_aborted", _errno_name(exc) or "connection_closed")
    if isinstance(exc, OSError):
        return HandshakeRefusal("other", _errno_name(exc) or type(exc).__name__)
    return HandshakeRefusal("other", type(exc).__name__)


def _ssl_kind(reason: str) -> str:
    if reason in _NO_CERTIFICATE:
        return "no_certificate"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return "bad_certificate"
    if reason in _NOT_TLS:
        return "not_tls"
    if reason.startswith(_CLIENT_ALERT):
        return "client_aborted"
    return "other"


def _errno_name(exc: OSError) -> str | None:
    return errno.errorcode.get(exc.errno) if exc.errno is not None else None


# --- internals -------------------------------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    # Client-initiated renegotiation (TLS 1.2) only ever served attacks (CPU exhaustion).
    ctx.options |= ssl.OP_NO_RENEGOTIATION


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path, what: str) -> x509.Certificate:
    """Check, then load, a certificate file and its key; the leaf certificate."""
    leaf = _read_certs(cert, what)[0]
    _check_key_matches(key, leaf, cert)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:  # checked above; OpenSSL may still refuse, e.g. a weak key
        raise ConfigError(f"{what} {cert} and key {key} are refused by OpenSSL: "
                          f"{exc.reason or exc}") from exc
    except OSError as exc:  # e.g. replaced or removed since
        raise ConfigError(f"{what} {cert} or key {key}: cannot read: {exc.strerror}") from exc
    return leaf


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key. Without it OpenSSL would prompt on the
    # terminal, and a broker under systemd would hang at start instead of failing.
    raise ConfigError("encrypted TLS keys are not supported; store the key unencrypted, "
                      "readable by the broker only (mode 0600)")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read: {exc.strerror}") from exc


def _read_certs(path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM file (at least one)."""
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: not a PEM certificate file ({exc})") from exc
    return certs


def _check_key_matches(key_path: Path, cert: x509.Certificate, cert_path: Path) -> None:
    """The key file parses, is not encrypted, and belongs to ``cert``. Errors never quote the
    file's content (cryptography's messages do not either)."""
    data = _read(key_path, "TLS key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography: "Password was not given but private key is encrypted"
        raise ConfigError(f"TLS key {key_path}: the key is encrypted; store it unencrypted, "
                          "readable by the broker only (mode 0600)") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"TLS key {key_path}: not a PEM private key") from exc
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(f"TLS key {key_path} does not belong to the certificate in "
                          f"{cert_path}")


def _load_ca(ctx: ssl.SSLContext, path: Path, what: str) -> None:
    _read_certs(path, what)  # a clear error for a missing or malformed file
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{what} {path}: refused by OpenSSL: {exc}") from exc


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return x509.DNSName(host)
    except ValueError as exc:  # e.g. a non-ASCII name: DNS names go in as A-labels
        raise ValueError(f"host {host!r} is neither an IP address nor an ASCII DNS name") from exc


def _log_certificate(path: Path, cert: x509.Certificate, *, mutual: bool) -> None:
    """What the operator needs to check the listener's certificate (public data only)."""
    now = datetime.datetime.now(datetime.UTC)
    not_after = cert.not_valid_after_utc
    log.info("tls_enabled", cert=str(path), subject=cert.subject.rfc4514_string(),
             not_after=not_after.isoformat(), sha256=fingerprint(cert), mutual=mutual)
    if not cert.not_valid_before_utc <= now <= not_after:
        # Served anyway (refusing to start would not help the clients either), but loudly.
        log.warning("tls_certificate_not_valid_now", cert=str(path),
                    not_before=cert.not_valid_before_utc.isoformat(),
                    not_after=not_after.isoformat())
