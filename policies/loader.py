"""Read a policy directory from disk into :class:`SignedDocument` objects (the I/O edge).

Layout: ``trust-root.toml``, ``schemes/*.toml``, ``nodes/*.toml``, ``agreements/*.toml`` and
``revocations/*.toml``, each with a detached ``.sig`` beside it.
"""

from __future__ import annotations

from pathlib import Path

from broker.errors import PolicyDocumentError
from policies.bundle import Bundle, build_bundle
from policies.documents import MAX_DOCUMENT_BYTES, SignedDocument

_SUBDIRS = ("schemes", "nodes", "agreements", "revocations")


def _sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def read_document(base: Path, relative: str) -> SignedDocument:
    """Read one document and its ``.sig``; a missing signature file is an error."""
    path = base / relative
    sig_path = _sig_path(path)
    if not sig_path.is_file():
        raise PolicyDocumentError(f"unsigned: no signature file {sig_path.name}",
                                  document=relative, code="unsigned")
    try:
        data = path.read_bytes()
        sig = sig_path.read_bytes()
    except OSError as exc:
        raise PolicyDocumentError(f"cannot read: {exc.strerror}", document=relative) from exc
    if len(data) > MAX_DOCUMENT_BYTES:
        raise PolicyDocumentError(f"larger than {MAX_DOCUMENT_BYTES} bytes", document=relative)
    return SignedDocument(name=relative, data=data, sig=sig)


def read_policy_dir(base: Path) -> dict[str, SignedDocument]:
    """Every document of a policy directory, keyed by its path relative to ``base``.

    Documents without a signature file refuse the whole directory (nothing is read), and the
    error names every one of them, sorted (the first is its ``document``), so that the
    operator sees them all at once rather than one per attempt."""
    if not base.is_dir():
        raise PolicyDocumentError(f"policy directory {base} does not exist")
    names = ["trust-root.toml"]
    for sub in _SUBDIRS:
        if (base / sub).is_dir():
            names.extend(f"{sub}/{p.name}" for p in sorted((base / sub).glob("*.toml")))
    unsigned = sorted(name for name in names if not _sig_path(base / name).is_file())
    if len(unsigned) > 1:  # one alone: read_document says so, as for a single document
        raise PolicyDocumentError(
            f"unsigned: no signature files {', '.join(f'{name}.sig' for name in unsigned)} "
            f"({len(unsigned)} documents)", document=unsigned[0], code="unsigned")
    return {name: read_document(base, name) for name in names}


def load_bundle(base: Path, *, pinned_root_sha256: bytes | None) -> Bundle:
    """Read and verify a whole policy directory."""
    return build_bundle(read_policy_dir(base), pinned_root_sha256=pinned_root_sha256)
