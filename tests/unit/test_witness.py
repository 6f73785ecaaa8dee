"""What a witness cosigns: table of offered checkpoints against what it cosigned before."""

from __future__ import annotations

import pytest

from broker.audit.merkle import MemoryTree, leaf_hash
from broker.audit.note import Checkpoint, Signer, sign_note
from broker.audit.witness import Equivocation, check_offered_checkpoint
from broker.errors import VerificationError

LOG = Signer.from_seed("broker.test", bytes(32))
TREE = MemoryTree(leaf_hash(bytes([i])) for i in range(20))
FORK = MemoryTree([*(leaf_hash(bytes([i])) for i in range(10)),
                   *(leaf_hash(b"forged" + bytes([i])) for i in range(10))])


def note(tree: MemoryTree, size: int, signer: Signer = LOG) -> str:
    return sign_note(Checkpoint("broker.test", size, tree.root(size)).to_text(), [signer])


def check(cosigned: dict[int, bytes], offered: str, proof: list[bytes] | None,
          old: int) -> Checkpoint:
    return check_offered_checkpoint(cosigned, offered, proof, old, LOG.verifier())


def test_first_checkpoint_is_trusted_on_first_use() -> None:
    assert check({}, note(TREE, 12), [], 0).size == 12


def test_extension_with_a_valid_proof_is_cosigned() -> None:
    assert check({8: TREE.root(8)}, note(TREE, 20), TREE.consistency_proof(8, 20), 8).size == 20


def test_repeated_checkpoint_is_accepted_without_proof() -> None:
    assert check({8: TREE.root(8)}, note(TREE, 8), None, 0).size == 8


@pytest.mark.parametrize("cosigned, offered, proof, old, why", [
    ({15: TREE.root(15)}, note(FORK, 15), None, 0, "two different roots"),
    ({15: TREE.root(15)}, note(TREE, 12), None, 0, "rollback"),
    ({8: TREE.root(8)}, note(FORK, 20), TREE.consistency_proof(8, 20), 8, "does not extend"),
    ({12: TREE.root(12)}, note(FORK, 20), FORK.consistency_proof(12, 20), 12, "does not extend"),
])
def test_forked_log_raises_the_alarm(cosigned: dict[int, bytes], offered: str,
                                     proof: list[bytes] | None, old: int, why: str) -> None:
    with pytest.raises(Equivocation, match=why) as caught:
        check(cosigned, offered, proof, old)
    assert caught.value.offered == offered


def test_proof_from_another_size_than_the_last_cosigned_is_not_cosigned() -> None:
    with pytest.raises(VerificationError, match="not at 8") as caught:
        check({8: TREE.root(8)}, note(TREE, 20), TREE.consistency_proof(5, 20), 5)
    assert not isinstance(caught.value, Equivocation)


def test_fork_after_the_last_cosigned_size_is_not_cosigned_via_an_older_size() -> None:
    """Cosigned 10 and 15 of TREE; FORK shares the first 10 leaves and differs after."""
    cosigned = {10: TREE.root(10), 15: TREE.root(15)}
    with pytest.raises(VerificationError):
        check(cosigned, note(FORK, 20), FORK.consistency_proof(10, 20), 10)


def test_checkpoint_signed_by_another_key_is_refused() -> None:
    with pytest.raises(VerificationError) as caught:
        check({}, note(TREE, 5, Signer.generate("broker.test")), [], 0)
    assert not isinstance(caught.value, Equivocation)
