"""The coverage-guided harness (``tests/fuzz``) stays usable without atheris.

Every target runs over its generated seeds (each must parse: a seed that no longer does means
the format moved and the harness would start from nothing) and over random bytes; the targets'
oracle really does report wrong error classes, undocumented codes and foreign exceptions; and
the runner's command line maps to the libFuzzer flags the README documents.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from broker import wire
from broker.errors import ProtocolError, VerificationError
from tests.fuzz import mutators, run, seeds, targets


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[bytes]]:
    return seeds.seeds()


def test_every_target_has_seeds_and_every_seed_parses(corpus: dict[str, list[bytes]]) -> None:
    assert set(corpus) == set(targets.TARGETS) == set(targets.DOCUMENTED)
    for name, inputs in corpus.items():
        assert inputs, name
        outcome = targets.run_all(name, inputs)
        assert outcome == targets.Outcome(parsed=len(inputs), refused=0), name


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_random_and_mangled_bytes_never_crash_a_target(name: str,
                                                       corpus: dict[str, list[bytes]]) -> None:
    rnd = random.Random(name)
    inputs = [rnd.randbytes(rnd.randint(0, 300)) for _ in range(100)]
    for seed in corpus[name]:
        for _ in range(10):
            data = bytearray(seed)
            for _ in range(rnd.randint(1, 4)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
            inputs.append(bytes(data[:rnd.randint(0, len(data))]))
            inputs.append(bytes(data))
    outcome = targets.run_all(name, inputs)
    assert outcome.parsed + outcome.refused == len(inputs)
    assert outcome.refused > 0  # random bytes are not all valid


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_structural_mutations_apply_to_every_seed_and_never_crash_a_target(
        name: str, corpus: dict[str, list[bytes]]) -> None:
    rnd = random.Random(name)
    inputs = corpus[name]
    outputs = [mutators.mutate(name, inputs[i % len(inputs)], rnd) for i in range(30)]
    mutated = [out for out in outputs if out is not None]
    assert len(mutated) == len(outputs)  # every seed decodes in its target's format
    assert len(set(mutated)) > 10  # and the edits vary
    targets.run_all(name, mutated)


def test_structural_mutation_is_deterministic_and_declines_what_does_not_decode(
        corpus: dict[str, list[bytes]]) -> None:
    seed = corpus["trust_root"][0]
    first = mutators.mutate("trust_root", seed, random.Random(7))
    assert first == mutators.mutate("trust_root", seed, random.Random(7))
    assert first != seed
    assert mutators.mutate("trust_root", b"\xff not UTF-8", random.Random(7)) is None
    assert mutators.mutate("frame", b"\xc1", random.Random(7)) is None
    assert mutators.mutate("entry", b"\x91" * 5_000 + b"\x00", random.Random(7)) is None


def test_seed_writer_writes_every_seed(tmp_path: Path, corpus: dict[str, list[bytes]]) -> None:
    assert seeds.main([str(tmp_path)]) == 0
    for name, inputs in corpus.items():
        files = sorted((tmp_path / name).iterdir())
        assert len(files) == len(inputs)
        for path in files:
            assert targets.TARGETS[name](path.read_bytes()) is True, path


def test_a_documented_refusal_is_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes, **_: object) -> wire.Frame:
        raise ProtocolError("no", code="non_canonical")

    monkeypatch.setattr(wire, "decode_frame", refuse)
    assert targets.frame(b"") is False


@pytest.mark.parametrize("error", [
    KeyError("t"), RecursionError(), UnicodeDecodeError("utf-8", b"\x80", 0, 1, "bad"),
])
def test_a_foreign_exception_propagates(monkeypatch: pytest.MonkeyPatch,
                                        error: Exception) -> None:
    def crash(data: bytes, **_: object) -> wire.Frame:
        raise error

    monkeypatch.setattr(wire, "decode_frame", crash)
    with pytest.raises(type(error)):
        targets.frame(b"")


@pytest.mark.parametrize("error", [
    ProtocolError("undocumented code", code="internal"),
    VerificationError("documented code, wrong class", code="bad_frame"),
])
def test_an_undocumented_refusal_is_an_invariant_failure(monkeypatch: pytest.MonkeyPatch,
                                                         error: Exception) -> None:
    def refuse(data: bytes, **_: object) -> wire.Frame:
        raise error

    monkeypatch.setattr(wire, "decode_frame", refuse)
    with pytest.raises(targets.FuzzInvariantError):
        targets.frame(b"")


def test_a_frame_that_does_not_re_encode_is_an_invariant_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "decode_frame", lambda data, **_: wire.Ping())
    with pytest.raises(targets.FuzzInvariantError, match="re-encoding"):
        targets.frame(wire.encode_frame(wire.Pong()))


def test_export_inputs_split_into_six_parts() -> None:
    parts = [b"manifest", b"entries", b"leaves", b"9", b"note", b"bundle"]
    assert targets.split_export(targets.EXPORT_SEPARATOR.join(parts)) == parts
    assert targets.split_export(b"only a manifest") == [b"only a manifest"] + [b""] * 5


def test_runner_command_line_maps_to_libfuzzer_flags() -> None:
    args = run.parse_args(["envelope", "/tmp/corpus/envelope", "/tmp/seeds/envelope",
                           "--runs", "1000000", "--seconds", "600", "--max-len", "8192",
                           "--", "-use_value_profile=1"])
    assert run.libfuzzer_argv(args) == [
        "tests.fuzz.run:envelope", "/tmp/corpus/envelope", "/tmp/seeds/envelope",
        f"-artifact_prefix={run.DEFAULT_ARTIFACTS}/envelope-", "-print_final_stats=1",
        "-runs=1000000", "-max_total_time=600", "-max_len=8192", "-use_value_profile=1"]
    assert str(run.DEFAULT_ARTIFACTS).startswith("/tmp/")
    assert run.parse_args(["--list"]).list
    assert run.parse_args(["frame", "--structured"]).structured
    assert not args.structured


def test_runner_requires_a_target() -> None:
    with pytest.raises(SystemExit):
        run.parse_args([])
