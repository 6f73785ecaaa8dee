"""The audit export: a directory an auditor verifies offline, trusting none of it.

Layout (``format = coalition-audit-export/v1``)::

    manifest.json            format, origin, size, counts, when
    entries.bin              per entry: index (u64 BE) ‖ length (u32 BE) ‖ canonical entry bytes
    leaves.bin               the leaf hashes the broker recorded at append time (32 bytes each)
    checkpoints/SIZE.note    every signed checkpoint, with every cosignature line received
    bundles/HASH.msgpack     every policy bundle that was active (documents with signatures)

Indexes are written as stored, so a deleted row shows as a gap rather than being renumbered
away. The recorded leaf hashes let the auditor name the exact entry that was changed when
the entries and the signed roots disagree.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Generator, Iterator
from pathlib import Path

from broker.errors import ProtocolError
from broker.store.base import Store, StoredCheckpoint
from broker.witnesses import cosigned_note
from clients.witness import write_atomically

FORMAT = "coalition-audit-export/v1"
_HEADER = struct.Struct(">QI")
MAX_ENTRY = 4 << 20


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    out: Path
    entries: int
    checkpoints: int
    bundles: int


def export_store(store: Store, origin: str, out: Path) -> ExportSummary:
    """Write everything an auditor needs from ``store`` into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "bundles").mkdir(exist_ok=True)
    with store.snapshot():  # a running broker keeps writing: export one consistent state
        count, checkpoints, hashes = _write_snapshot(store, out)
    manifest = {"format": FORMAT, "origin": origin, "size": count,
                "checkpoints": len(checkpoints), "bundles": len(hashes),
                "exported_at_ms": time.time_ns() // 1_000_000}
    write_atomically(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return ExportSummary(out, count, len(checkpoints), len(hashes))


def _write_snapshot(store: Store, out: Path) -> tuple[int, list[StoredCheckpoint],
                                                     list[bytes]]:
    count = 0
    with open(out / "entries.bin", "wb") as entries:
        for index, data in store.iter_entries():
            entries.write(_HEADER.pack(index, len(data)) + data)
            count += 1
    with open(out / "leaves.bin", "wb") as leaves:
        for _, digest in store.iter_nodes(0):
            leaves.write(digest)
    checkpoints = store.checkpoints()
    for checkpoint in checkpoints:
        write_atomically(out / "checkpoints" / f"{checkpoint.size}.note",
                         cosigned_note(checkpoint).encode())
    hashes = store.bundle_hashes()
    for digest in hashes:
        content = store.bundle(digest)
        assert content is not None
        write_atomically(out / "bundles" / f"{digest.hex()}.msgpack", content)
    return count, checkpoints, hashes


@dataclasses.dataclass(frozen=True)
class Export:
    """An export directory opened for reading (nothing in it is trusted)."""

    path: Path
    origin: str

    @classmethod
    def open(cls, path: Path) -> Export:
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
            raise ProtocolError(f"{path} is not an audit export: {exc}") from exc
        if not isinstance(manifest, dict):
            raise ProtocolError(f"{path}: manifest.json is not a JSON object")
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("origin"), str):
            raise ProtocolError(f"{path}: unknown export format {manifest.get('format')!r}")
        size = manifest.get("size", 0)
        if type(size) is not int or size < 0:  # the auditor reads it as a count
            raise ProtocolError(f"{path}: manifest size {size!r} is not a count of entries")
        return cls(path, manifest["origin"])

    def entries(self) -> Iterator[tuple[int, bytes]]:
        """``(index as stored, entry bytes)`` in file order."""
        with open(self.path / "entries.bin", "rb") as data:
            while header := data.read(_HEADER.size):
                if len(header) != _HEADER.size:
                    raise ProtocolError("entries.bin ends inside a record header")
                index, length = _HEADER.unpack(header)
                if length > MAX_ENTRY:
                    raise ProtocolError(f"entry {index} claims {length} bytes")
                body = data.read(length)
                if len(body) != length:
                    raise ProtocolError(f"entries.bin ends inside entry {index}")
                yield index, body

    def iter_recorded_leaves(self) -> Generator[bytes, None, None]:
        """The recorded leaf hashes one by one, read as they are needed (a partial last
        record is left out)."""
        path = self.path / "leaves.bin"
        if not path.is_file():  # absent, or not a file (a device would never end)
            return
        with open(path, "rb") as leaves:
            while len(digest := leaves.read(32)) == 32:
                yield digest

    def recorded_leaf_count(self) -> int:
        """How many whole leaf hashes :meth:`iter_recorded_leaves` yields."""
        path = self.path / "leaves.bin"
        return path.stat().st_size // 32 if path.is_file() else 0

    def checkpoint_notes(self) -> list[tuple[str, str]]:
        """``(file name, note)`` by size.

        A note that is not UTF-8 keeps its bad bytes as lone surrogates, so the note parser
        refuses that one checkpoint (as malformed) instead of the whole export failing to read.
        """
        files = sorted((self.path / "checkpoints").glob("*.note"),
                       key=lambda p: int(p.stem) if p.stem.isascii() and p.stem.isdigit()
                       else -1)  # "²".isdigit() is true, but int("²") fails
        return [(f.name, f.read_bytes().decode("utf-8", "surrogateescape")) for f in files]

    def bundles(self) -> dict[str, bytes]:
        """``{hex hash as named: content}``."""
        return {f.stem: f.read_bytes() for f in sorted((self.path / "bundles").glob("*.msgpack"))}
