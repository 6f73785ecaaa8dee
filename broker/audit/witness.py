"""What a witness checks before it cosigns a checkpoint (pure).

A gateway remembers the checkpoints it cosigned (size → root). A new checkpoint is cosigned only
if it is signed by the broker's key from the trust root, and either repeats a remembered
checkpoint exactly or extends one (a consistency proof from a remembered size verifies). A
checkpoint that is smaller than the latest remembered one, has a different root at a remembered
size, or comes with a proof that does not verify is evidence that the broker shows different logs
to different parties: :class:`Equivocation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from broker.audit.merkle import verify_consistency
from broker.audit.note import Checkpoint, Verifier, verify_note
from broker.errors import VerificationError


class Equivocation(VerificationError):
    """The broker offered a checkpoint inconsistent with one this witness cosigned."""

    code = "equivocation"

    def __init__(self, reason: str, *, previous: str | None, offered: str) -> None:
        super().__init__(reason)
        self.previous = previous  # the cosigned note it contradicts (when known)
        self.offered = offered


def verify_log_checkpoint(note: str, log: Verifier) -> Checkpoint:
    """The checkpoint of ``note`` if the broker's key signed it; raise otherwise."""
    checkpoint = Checkpoint.from_text(verify_note(note, [log]).text)
    if checkpoint.origin != log.name:
        raise VerificationError(f"checkpoint origin {checkpoint.origin!r} is not {log.name!r}")
    return checkpoint


def check_offered_checkpoint(
    cosigned: Mapping[int, bytes],
    note: str,
    proof: Sequence[bytes] | None,
    old: int,
    log: Verifier,
    *,
    previous_note: str | None = None,
) -> Checkpoint:
    """Decide whether to cosign ``note``; return its checkpoint, or raise.

    ``cosigned`` maps the sizes this witness cosigned to their roots; ``proof`` is the
    consistency proof from ``old`` (``None`` when the note came without one, as in ``welcome``).
    Raises :class:`Equivocation` on evidence of a forked log, and ``VerificationError`` when the
    note cannot be checked (bad signature, or a proof from a size this witness never saw).
    """
    checkpoint = verify_log_checkpoint(note, log)
    if not cosigned:
        return checkpoint  # the first checkpoint this witness sees: trust on first use
    latest = max(cosigned)

    def fork(reason: str) -> Equivocation:
        return Equivocation(reason, previous=previous_note, offered=note)

    if checkpoint.size < latest:
        raise fork(f"checkpoint of size {checkpoint.size} is older than the checkpoint of size "
                   f"{latest} already cosigned (rollback)")
    known = cosigned.get(checkpoint.size)
    if known is not None:
        if known != checkpoint.root:
            raise fork(f"two different roots for size {checkpoint.size}")
        return checkpoint
    if proof is None:
        raise VerificationError("a new checkpoint came without a consistency proof",
                                code="bad_proof")
    if old != latest:
        # Only a proof from the latest cosigned checkpoint shows the new one extends *it*; a
        # proof from an older one would let a fork after that older size through.
        raise VerificationError(f"the proof starts at size {old}, not at {latest}, the last "
                                f"size this witness cosigned", code="bad_proof")
    try:
        verify_consistency(old, checkpoint.size, cosigned[old], checkpoint.root, proof)
    except VerificationError as exc:
        raise fork(f"checkpoint of size {checkpoint.size} does not extend the cosigned "
                   f"checkpoint of size {old}: {exc.reason}") from None
    return checkpoint
