"""A gateway as a witness of the broker's audit log: :class:`LogWitness` checks the checkpoints
the broker offers, cosigns the consistent ones and raises the alarm on a forked log, and verifies
the inclusion proofs of the gateway's own entries; :class:`WitnessState` keeps the checkpoints it
cosigned in a local file that survives restarts, and the evidence when the broker equivocates.

The file is JSON, replaced atomically (write, fsync, rename, fsync the directory), so a crash
leaves either the old or the new state, never a torn one. The history is bounded: the broker
proves consistency from the last size it stored a cosignature for, which is one of the recent
ones.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from broker import wire
from broker.audit.leaves import RouteEntry, entry_from_bytes
from broker.audit.merkle import leaf_hash, verify_inclusion
from broker.audit.note import Checkpoint, Cosigner, Verifier
from broker.audit.witness import Equivocation, check_offered_checkpoint, verify_log_checkpoint
from broker.errors import BrokerError, StorageError, VerificationError
from clients.identity import KeyFile
from policies.model import TrustRoot

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


def broker_log_key(trust_root: TrustRoot, broker_name: str) -> Verifier | None:
    """The key the trust root lists for ``broker_name`` (its checkpoints' signer), if any."""
    for broker in trust_root.brokers:
        if broker.name == broker_name:
            return Verifier(broker.name, broker.key)
    return None


class LogWitness:
    """One gateway's witness duty for one broker's log.

    It cosigns an offered checkpoint only if it can prove it consistent with the last one it
    cosigned (kept in :class:`WitnessState`), handing the cosignature line to
    ``send_cosignature``; evidence of a forked log goes to :attr:`alarms`, ``on_alarm`` and the
    state directory. Its methods are synchronous: the frame dispatcher calls them.
    """

    def __init__(
        self,
        trust_root: TrustRoot,
        broker_name: str,
        identity: KeyFile,
        state_dir: Path | None,
        *,
        send_cosignature: Callable[[str], None],
        on_alarm: Callable[[Equivocation], None] | None = None,
    ) -> None:
        self.broker_name = broker_name
        self.node = identity.name
        self._cosigner = Cosigner.from_seed(identity.name, bytes(identity.signing_key))
        self.state = WitnessState(state_dir)
        self.log_key = broker_log_key(trust_root, broker_name)
        self.alarms: list[Equivocation] = []
        self.on_alarm = on_alarm
        self.cosigned = 0  # checkpoints cosigned by this client
        self._send_cosignature = send_cosignature

    def check(self, note: str, proof: list[bytes] | None, old: int, *, cosign: bool) -> None:
        """Check an offered checkpoint against the ones this gateway cosigned; cosign it if it
        is consistent (and ``cosign``), raise the alarm if it is evidence of a forked log."""
        if self.log_key is None:
            log.error("checkpoint_not_cosigned", reason="the trust root lists no key for broker "
                      f"{self.broker_name}")
            return
        try:
            checkpoint = check_offered_checkpoint(
                self.state.cosigned, note, proof, old, self.log_key,
                previous_note=self.state.latest_note)
        except Equivocation as alarm:
            self._raise_alarm(alarm, proof or [])
            return
        except BrokerError as exc:
            log.warning("checkpoint_not_cosigned", code=exc.code, reason=exc.reason)
            if cosign and self.state.latest_note is not None and proof is not None:
                # The broker proves from an older size (it lost our last cosignature): tell it
                # again which checkpoint we cosigned last, so the next proof starts there.
                self._cosign(verify_log_checkpoint(self.state.latest_note, self.log_key))
            return
        if not cosign:
            return
        self.state.record(checkpoint, note)  # durably, before the cosignature leaves
        self.cosigned += 1
        self._cosign(checkpoint)

    def verify_proof(self, answer: wire.Proof, message_id: bytes) -> Checkpoint:
        """Check that ``answer`` proves this gateway's ``route`` entry for ``message_id``
        against a checkpoint signed by the broker's key and cosigned by this gateway; return
        that checkpoint. Raises ``VerificationError`` (an :class:`Equivocation` for a root that
        contradicts a cosigned one)."""
        if self.log_key is None:
            raise VerificationError(f"the trust root lists no key for {self.broker_name}")
        checkpoint = verify_log_checkpoint(answer.checkpoint, self.log_key)
        if checkpoint.size != answer.size:
            raise VerificationError("the proof is for another tree size", code="bad_proof")
        known = self.state.cosigned.get(checkpoint.size)
        if known is None:
            # Only a checkpoint this gateway checked for consistency proves anything to it.
            raise VerificationError(f"the checkpoint of size {checkpoint.size} is not one this "
                                    "gateway cosigned yet; retry after it is", code="bad_proof")
        if known != checkpoint.root:
            alarm = Equivocation(f"two different roots for size {checkpoint.size}",
                                 previous=self.state.latest_note, offered=answer.checkpoint)
            self._raise_alarm(alarm, list(answer.proof))
            raise alarm
        entry = entry_from_bytes(answer.entry)
        if not isinstance(entry, RouteEntry) or entry.id != message_id or entry.sender != self.node:
            raise VerificationError("the proven entry is not this message's route entry",
                                    code="bad_proof")
        verify_inclusion(answer.index, answer.size, leaf_hash(answer.entry), answer.proof,
                         checkpoint.root)
        return checkpoint

    def _cosign(self, checkpoint: Checkpoint) -> None:
        line = self._cosigner.cosign(checkpoint.to_text(), time.time_ns() // 10**9).to_line()
        self._send_cosignature(line)

    def _raise_alarm(self, alarm: Equivocation, proof: list[bytes]) -> None:
        evidence = self.state.save_evidence(alarm, proof, time.time_ns() // 10**6)
        log.error("broker_equivocation", broker=self.broker_name, reason=alarm.reason,
                  evidence=None if evidence is None else str(evidence))
        self.alarms.append(alarm)
        if self.on_alarm is not None:
            try:
                self.on_alarm(alarm)
            except Exception:  # the application's bug must not silence the alarm or the link
                log.exception("on_alarm_failed")
