"""``coalition tls``: a self-signed certificate and key for the node listener, for trials.

The certificate is its own trust anchor: the broker serves it (``[tls] cert`` and ``key``) and
every gateway pins the same file as its CA (``broker.tls.client_context(ca=...)``, passed to
``GatewayClient(..., ssl=...)``). A production coalition uses certificates from its own PKI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509

from broker.errors import ConfigError
from broker.tls import fingerprint, make_self_signed

DESCRIPTION = """\
Write a self-signed TLS certificate (ECDSA P-256) and its key for the node listener, for
trials. Production certificates come from the coalition's own PKI.
"""

EPILOG = """\
The certificate is self-signed and is its own CA: gateways pass the certificate file as `ca`
(broker.tls.client_context(ca=Path("broker.crt")), then GatewayClient(..., ssl=context)) and
connect to wss://HOST:PORT/v1/node with a HOST listed by --host. The broker names both files
in its configuration ([tls] cert = "broker.crt", key = "broker.key.pem"). The key is written
unencrypted with mode 0600: keep it readable by the broker only.
"""


def add_parser(commands: argparse._SubParsersAction[Any]) -> None:
    """Add ``coalition tls`` to the top-level commands."""
    tls = commands.add_parser(
        "tls", help="write a self-signed TLS certificate and key (for trials)",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tls.add_argument("--cn", required=True, help="the certificate's common name")
    tls.add_argument("--host", action="append", required=True, metavar="HOST",
                     help="a DNS name or IP address gateways connect to (repeatable; put "
                          "every name in the gateways' URLs here)")
    tls.add_argument("--days", type=int, default=30, help="validity from now (default 30)")
    tls.add_argument("--out-cert", type=Path, required=True, help="the certificate (PEM)")
    tls.add_argument("--out-key", type=Path, required=True,
                     help="the private key (PEM, unencrypted, mode 0600)")
    tls.add_argument("--force", action="store_true", help="overwrite existing files")
    tls.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    cert_path: Path = args.out_cert
    key_path: Path = args.out_key
    if cert_path.resolve() == key_path.resolve():
        raise ConfigError("--out-cert and --out-key must be different files")
    if not args.force:
        # Both checked before either is written: no half-replaced pair.
        for path in (cert_path, key_path):
            if path.exists():
                raise ConfigError(f"{path} exists; refusing to overwrite it (--force to "
                                  "replace it)")
    try:
        cert_pem, key_pem = make_self_signed(args.cn, args.host, args.days)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # The key first: a certificate without its key is of no use, the reverse is harmless.
    for path, data, mode in ((key_path, key_pem, 0o600), (cert_path, cert_pem, 0o644)):
        try:
            _write(path, data, mode, force=args.force)
        except FileExistsError as exc:
            raise ConfigError(f"{path} exists; refusing to overwrite it (--force to "
                              "replace it)") from exc
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
    cert = x509.load_pem_x509_certificate(cert_pem)
    print(f"wrote {cert_path} (certificate, valid until "
          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, SHA-256 {fingerprint(cert)})")
    print(f"wrote {key_path} (private key, mode 0600)")
    print(f"broker: [tls] cert = \"{cert_path}\", key = \"{key_path}\"; gateways pass "
          f"{cert_path} as their ca")
    return 0


def _write(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write ``data`` with permissions ``mode`` (never wider, whatever the umask or an existing
    file's mode). Without ``force`` the file must not exist (``O_EXCL``: no race with another
    writer: ``FileExistsError``); with it, the new content replaces the old one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return
    # mkstemp creates the file 0600 in the target's directory; os.replace swaps it in, so an
    # existing key is never truncated in place nor left with its old (maybe wider) mode.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode & ~_umask())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
