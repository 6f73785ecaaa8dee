"""A gateway's witness state: the checkpoints it cosigned, kept in a local file that survives
restarts, and the evidence it keeps when the broker equivocates.

The file is JSON, replaced atomically (write, fsync, rename, fsync the directory), so a crash
leaves either the old or the new state, never a torn one. The history is bounded: the broker
proves consistency from the last size it stored a cosignature for, which is one of the recent
ones.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import structlog

from broker.audit.note import Checkpoint
from broker.audit.witness import Equivocation
from broker.errors import StorageError

log = structlog.get_logger("clients.witness")

STATE_FILE = "witness.json"
HISTORY = 256


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


class WitnessState:
    """Cosigned checkpoints (size → root) and the latest cosigned note; ``directory=None`` keeps
    them in memory only."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.cosigned: dict[int, bytes] = {}
        self.latest_note: str | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._load(directory / STATE_FILE)

    def _load(self, path: Path) -> None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self.cosigned = {int(size): base64.b64decode(root, validate=True)
                             for size, root in raw["cosigned"].items()}
            self.latest_note = raw["latest_note"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never start afresh silently: that would accept any log on first use again.
            raise StorageError(f"witness state {path} is unreadable ({exc}); move it away "
                               f"only if you accept trusting the broker's next checkpoint "
                               f"on first use") from exc

    def record(self, checkpoint: Checkpoint, note: str) -> None:
        """Remember a checkpoint this gateway is about to cosign (durably, before cosigning)."""
        self.cosigned[checkpoint.size] = checkpoint.root
        for size in sorted(self.cosigned)[:-HISTORY]:
            del self.cosigned[size]
        self.latest_note = note
        if self.directory is not None:
            state = {"cosigned": {str(s): base64.b64encode(r).decode()
                                  for s, r in sorted(self.cosigned.items())},
                     "latest_note": note}
            write_atomically(self.directory / STATE_FILE, json.dumps(state).encode())

    def save_evidence(self, alarm: Equivocation, proof: list[bytes], now_ms: int) -> Path | None:
        """Keep both notes (and the proof) for the nations' investigators."""
        if self.directory is None:
            return None
        folder = self.directory / f"evidence-{now_ms}"
        folder.mkdir(exist_ok=True)
        if alarm.previous is not None:
            write_atomically(folder / "cosigned.note", alarm.previous.encode())
        write_atomically(folder / "offered.note", alarm.offered.encode())
        write_atomically(folder / "proof.json", json.dumps(
            {"reason": alarm.reason, "proof": [base64.b64encode(p).decode() for p in proof]},
            indent=2).encode())
        return folder
