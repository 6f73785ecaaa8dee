"""Bounded fuzzing of every parser that reads untrusted bytes (hypothesis; issue 8, item 2).

The invariant, for each parser: any input either parses or is refused with the documented
:class:`~broker.errors.BrokerError` subclass and one of its documented codes — never
``KeyError``, ``TypeError``, ``ValueError``, ``RecursionError``, … — and what parses re-encodes
to the very same bytes where the module can encode. The oracles live in the fuzz targets
(``tests/fuzz/targets.py``), shared with the coverage-guided harness; the inputs here are
arbitrary bytes, mutations of valid inputs (bit flips, truncation, insertion, field
replacement) and structured-but-wrong values, with exact expectations where the input's
defect is known.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import itertools
import json
import struct
import tomllib
import typing
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from broker import canonical, wire
from broker.audit import note
from broker.errors import ProtocolError
from tests.fuzz import targets
from tests.fuzz.context import context, dump_toml
from tests.fuzz.seeds import seeds
from tests.property.strategies import ints, nested, text

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
SLOW = settings(FUZZ, max_examples=40)
EDITS = settings(FUZZ, max_examples=150)
MAX_INT = (1 << 63) - 1


@functools.cache
def _seeds() -> dict[str, list[bytes]]:
    return seeds()


def _seed(target: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from(_seeds()[target])


# --- strategies ---------------------------------------------------------------------------------

values = nested(3)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after 1–4 edits: bit flip, byte replacement, deletion, insertion, truncation,
    or a copy of one slice over another."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            out += draw(st.binary(min_size=1, max_size=8))
            continue
        pos = draw(st.integers(0, len(out) - 1))
        kind = draw(st.sampled_from(["flip", "replace", "delete", "insert", "truncate", "copy"]))
        if kind == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "replace":
            out[pos] = draw(st.integers(0, 255))
        elif kind == "delete":
            del out[pos:pos + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del out[pos:]
        else:
            start = draw(st.integers(0, len(out) - 1))
            out[pos:pos] = out[start:start + draw(st.integers(1, 32))]
    return bytes(out)


def mutated_seed(target: str) -> st.SearchStrategy[bytes]:
    """A mutation of one of ``target``'s valid seeds."""
    return _seed(target).flatmap(lambda data: mutated(data))


def _header(kind: str, n: int, *, wide: bool = False) -> bytes:
    """A msgpack map/array header; ``wide`` uses the 16-bit form even where a fix form fits."""
    fix, form16 = {"map": (0x80, 0xDE), "array": (0x90, 0xDC)}[kind]
    return bytes([fix | n]) if n < 16 and not wide else bytes([form16]) + struct.pack(">H", n)


def raw_map(pairs: list[tuple[str, Any]], *, wide_header: bool = False) -> bytes:
    """A msgpack map in exactly the given key order (duplicates kept), values canonical."""
    body = b"".join(canonical.encode(k) + canonical.encode(v) for k, v in pairs)
    return _header("map", len(pairs), wide=wide_header) + body


def wide_encoding(value: Any) -> bytes | None:
    """A valid but non-shortest msgpack encoding of ``value`` (``None`` if it has none)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 <= value < 1 << 32:
        return b"\xcf" + struct.pack(">Q", value)
    if isinstance(value, int) and -(1 << 31) <= value < 0:
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, str) and len(value.encode()) < 256:
        return b"\xda" + struct.pack(">H", len(value.encode())) + value.encode()
    if isinstance(value, bytes) and len(value) < 256:
        return b"\xc5" + struct.pack(">H", len(value)) + value
    if isinstance(value, list) and len(value) < 16:
        return _header("array", len(value), wide=True) + b"".join(map(canonical.encode, value))
    return None


# --- frames -------------------------------------------------------------------------------------

FRAME_CLASSES = sorted(wire.FRAME_TYPES.values(), key=lambda cls: cls.T)


def _hints(cls: type[wire.Frame]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint) and typing.get_origin(hint) is not tuple


def _unwrap(hint: Any) -> Any:
    if _optional(hint):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as decoded) is what the frame annotation ``hint`` asks for; written
    independently of ``wire._checker``."""
    hint = _unwrap(hint)
    if hint is bool or hint is str or hint is bytes:
        return type(value) is hint
    if hint is int:
        return type(value) is int and 0 <= value <= MAX_INT
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value)
    assert origin is typing.get_origin(typing.Mapping[str, str])
    if not isinstance(value, dict):
        return False
    return args[1] is Any or all(fits(v, args[1]) for v in value.values())


def good(hint: Any) -> st.SearchStrategy[Any]:
    """Values that fit ``hint``."""
    hint = _unwrap(hint)
    simple = {bool: st.booleans(), int: st.integers(0, MAX_INT), str: text,
              bytes: st.binary(max_size=40)}
    if hint in simple:
        return simple[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return st.lists(good(args[0]), max_size=4)
    return st.dictionaries(text, values if args[1] is Any else good(args[1]), max_size=4)


def wrong(hint: Any) -> st.SearchStrategy[Any]:
    """Values of allowed msgpack types that do not fit ``hint`` (huge and negative ints,
    the wrong scalar, containers with a wrong item, nested containers)."""
    return values.filter(lambda v: not fits(v, hint))


@dataclasses.dataclass(frozen=True)
class FrameCase:
    """A frame-shaped map, the order its keys are written in, and what is wrong with it."""

    cls: type[wire.Frame]
    pairs: list[tuple[str, Any]]
    defective: bool

    @property
    def sorted(self) -> bool:
        keys = [k for k, _ in self.pairs]
        return all(a < b for a, b in itertools.pairwise(keys))


@st.composite
def frame_cases(draw: st.DrawFn) -> FrameCase:
    """Each field right, wrong-typed or absent; maybe extra keys, a wrong ``t``, any order."""
    cls = draw(st.sampled_from(FRAME_CLASSES))
    hints = _hints(cls)
    fields: dict[str, Any] = {}
    defective = False
    for name, hint in hints.items():
        mode = draw(st.sampled_from(["good", "good", "good", "wrong", "absent"]))
        if mode == "absent":
            defective |= not _optional(hint)
        elif mode == "wrong":
            fields[name], defective = draw(wrong(hint)), True
        else:
            fields[name] = draw(good(hint))
    extra = draw(st.dictionaries(text.filter(lambda k: k not in hints and k != "t"), values,
                                 max_size=2))
    other_tags = values.filter(lambda v: not (isinstance(v, str) and v in wire.FRAME_TYPES))
    tag = draw(st.one_of(st.just(cls.T), st.just(cls.T), other_tags))
    defective |= bool(extra) or tag != cls.T
    fields.update(extra, t=tag)
    pairs = sorted(fields.items())
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    return FrameCase(cls, pairs, defective)


def _refusal(parse: Callable[[bytes], object], data: bytes) -> str | None:
    """The code ``parse`` refuses ``data`` with, or ``None`` when it parses."""
    try:
        parse(data)
    except ProtocolError as exc:
        return exc.code
    return None


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_frame_decoder(data: bytes) -> None:
    targets.frame(data)


@FUZZ
@given(mutated_seed("frame"))
def test_mutated_frames_parse_and_re_encode_or_fail_cleanly(data: bytes) -> None:
    targets.frame(data)


@settings(FUZZ, max_examples=250)
@given(frame_cases())
def test_structured_frames_are_refused_exactly_for_their_defects(case: FrameCase) -> None:
    data = raw_map(case.pairs)
    assert targets.frame(data) == (case.sorted and not case.defective)
    code = _refusal(wire.decode_frame, data)
    if not case.sorted:
        assert code == "non_canonical"
    elif case.defective:
        assert code == "bad_frame"
    else:
        frame = wire.decode_frame(data)
        assert type(frame) is case.cls
        for name, value in case.pairs:
            if name != "t":
                assert canonical.encode(getattr(frame, name)) == canonical.encode(value)


@FUZZ
@given(_seed("frame"), st.data())
def test_non_shortest_or_duplicated_encodings_are_non_canonical(seed: bytes,
                                                                data: st.DataObject) -> None:
    pairs = list(canonical.decode(seed).items())
    how = data.draw(st.sampled_from(["wide value", "wide header", "duplicate key"]))
    if how == "wide header":
        encoded = raw_map(pairs, wide_header=True)
    elif how == "duplicate key":
        index = data.draw(st.integers(0, len(pairs) - 1))
        encoded = raw_map([*pairs[:index + 1], pairs[index], *pairs[index + 1:]])
    else:
        index = data.draw(st.integers(0, len(pairs) - 1))
        _key, value = pairs[index]
        wide = wide_encoding(value)
        assume(wide is not None)
        assert wide is not None
        encoded = _header("map", len(pairs)) + b"".join(
            canonical.encode(k) + (wide if i == index else canonical.encode(v))
            for i, (k, v) in enumerate(pairs))
    assert _refusal(wire.decode_frame, encoded) == "non_canonical"
    assert targets.frame(encoded) is False


@FUZZ
@given(st.sampled_from([c for c in FRAME_CLASSES if int in map(_unwrap, _hints(c).values())]),
       st.one_of(st.integers(MAX_INT + 1, (1 << 64) - 1), st.integers(-(1 << 63), -1)),
       st.data())
def test_huge_or_negative_ints_in_frames_are_bad_frames(cls: type[wire.Frame], number: int,
                                                        data: st.DataObject) -> None:
    hints = _hints(cls)
    fields = {name: data.draw(good(hint)) for name, hint in hints.items()}
    name = data.draw(st.sampled_from([n for n, h in hints.items() if _unwrap(h) is int]))
    fields.update({name: number, "t": cls.T})
    assert _refusal(wire.decode_frame, canonical.encode(fields)) == "bad_frame"


@FUZZ
@given(st.integers(17, 100_000), st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deeply_nested_containers_are_refused_cleanly(depth: int, opener: bytes) -> None:
    # nested arrays or maps, far deeper than canonical's limit of 16 and msgpack's own stack
    data = b"\x82\xa5label" + opener * depth + b"\x00" + b"\xa1t\xa5route"
    assert _refusal(wire.decode_frame, data) == "bad_frame"
    assert targets.frame(data) is False


@FUZZ
@given(_seed("frame"), st.sampled_from([None, 0.5, float("nan"), -0.0]), text)
def test_nil_and_floats_anywhere_are_non_canonical(seed: bytes, bad: Any, key: str) -> None:
    value = canonical.decode(seed)
    value[key] = bad
    encoded = msgpack.packb(dict(sorted(value.items())), use_bin_type=True)
    assert _refusal(wire.decode_frame, encoded) == "non_canonical"


# --- envelopes ----------------------------------------------------------------------------------

_ENVELOPE_PATHS: list[tuple[str, ...]] = [
    ("v",), ("id",), ("from",), ("ts",), ("topic",), ("prec",), ("ttl",), ("to",), ("label",),
    ("enc",), ("label", "policy"), ("label", "class"), ("label", "cats"), ("label", "rel"),
    ("label", "orig"), ("enc", "alg"), ("enc", "nonce"), ("enc", "ct"), ("enc", "keys")]
_REQUIRED_BODY = {"v", "id", "from", "ts", "topic", "prec", "ttl", "label", "enc"}


@dataclasses.dataclass(frozen=True)
class Edit:
    """A field of a map replaced, deleted, or an unknown field added."""

    path: tuple[str, ...]
    action: str
    value: Any = None


@st.composite
def edits(draw: st.DrawFn, paths: list[tuple[str, ...]]) -> Edit:
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if action == "add":
        return Edit((*path[:-1], "x-" + draw(text)), action, draw(values))
    return Edit(path, action, draw(values) if action == "replace" else None)


def apply(value: dict[str, Any], edit: Edit) -> dict[str, Any]:
    """``value`` with ``edit`` applied (a copy; a path through a non-map is left alone)."""
    out: dict[str, Any] = canonical.decode(canonical.encode(value))
    table = out
    for key in edit.path[:-1]:
        if not isinstance(table.get(key), dict):
            return out
        table = table[key]
    if edit.action == "delete":
        table.pop(edit.path[-1], None)
    else:
        table[edit.path[-1]] = edit.value
    return out


def _envelope_with(seed: bytes, edit: Edit) -> bytes:
    body, sig = canonical.decode(seed)
    return canonical.encode([canonical.encode(apply(canonical.decode(body), edit)), sig])


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_envelope_parser(data: bytes) -> None:
    targets.envelope(data)


@settings(FUZZ, max_examples=300)
@given(mutated_seed("envelope"))
def test_bit_flipped_truncated_or_spliced_envelopes_fail_cleanly(data: bytes) -> None:
    targets.envelope(data)


@settings(FUZZ, max_examples=300)
@given(_seed("envelope"), edits(_ENVELOPE_PATHS))
def test_envelopes_with_a_replaced_field_parse_or_fail_cleanly(seed: bytes, edit: Edit) -> None:
    data = _envelope_with(seed, edit)
    parsed = targets.envelope(data)
    top = len(edit.path) == 1
    if top and (edit.action == "add" or (edit.action == "delete" and edit.path[0] != "to")):
        assert _refusal(_parse_envelope, data) == "bad_frame"
    elif top and edit.action == "replace" and edit.path[0] in ("v", "prec"):
        allowed = {"v": (1,), "prec": (0, 1, 2, 3)}[edit.path[0]]
        assert parsed == (type(edit.value) is int and edit.value in allowed)


def _parse_envelope(data: bytes) -> object:
    from broker.envelope import Envelope

    return Envelope.from_bytes(data)


@FUZZ
@given(st.lists(values, max_size=3), st.dictionaries(
    st.sampled_from(sorted(_REQUIRED_BODY | {"to", "x"})), values, max_size=10))
def test_structured_garbage_envelopes_fail_cleanly(outer: list[Any],
                                                   body: dict[str, Any]) -> None:
    targets.envelope(canonical.encode(outer))
    targets.envelope(canonical.encode([canonical.encode(body), b"\x00" * 64]))


# --- policy documents ---------------------------------------------------------------------------

_DOCUMENT_TARGETS = {"trust-root.toml": "trust_root", "nodes/": "node_cert",
                     "schemes/": "scheme", "agreements/": "agreement"}


def _target_of(name: str) -> str:
    return next(t for prefix, t in _DOCUMENT_TARGETS.items() if name.startswith(prefix))


toml_scalars = st.one_of(
    st.booleans(), st.integers(-(1 << 63), MAX_INT), text, st.floats(),
    st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-23,
                                                                          minutes=-59)),
                                            dt.timezone(dt.timedelta(hours=5, minutes=30))])),
    st.datetimes(), st.dates(), st.times())
toml_values: st.SearchStrategy[Any] = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=10)


@st.composite
def toml_edit(draw: st.DrawFn, table: dict[str, Any]) -> dict[str, Any]:
    """``table`` with one value somewhere replaced, removed, or a key/element added."""
    out = tomllib.loads(dump_toml(table).decode())
    node: Any = out
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        child = draw(st.sampled_from(keys)) if keys else None
        if child is None or not isinstance(node[child], (dict, list)) or draw(st.booleans()):
            break
        node = node[child]
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if child is None or action == "add":
        if isinstance(node, dict):
            node[draw(text)] = draw(toml_values)
        else:
            node.append(draw(toml_values))
    elif action == "delete":
        del node[child]
    else:
        node[child] = draw(toml_values)
    return out


@st.composite
def edited_documents(draw: st.DrawFn) -> tuple[str, bytes]:
    """A demo document (its name) with one edit in its TOML table, written back as TOML."""
    name = draw(st.sampled_from(context().names))
    table = tomllib.loads(context().documents[name].data.decode())
    return name, dump_toml(draw(toml_edit(table)))


def test_the_toml_writer_round_trips_every_demo_document() -> None:
    # the edits below are only meaningful if an unedited document survives dump_toml
    for name, doc in context().documents.items():
        table = tomllib.loads(doc.data.decode())
        again = dump_toml(table)
        assert tomllib.loads(again.decode()) == table
        assert targets.TARGETS[_target_of(name)](again) is True, name
        if name in context().core_names:
            assert targets.bundle_document(targets.bundle_document_input(name, again)) is True


@EDITS
@given(edited_documents())
def test_re_signed_documents_with_an_edited_field_parse_or_fail_cleanly(
        case: tuple[str, bytes]) -> None:
    name, data = case
    targets.TARGETS[_target_of(name)](data)
    if name in context().core_names:
        targets.bundle_document(targets.bundle_document_input(name, data))


@FUZZ
@given(st.sampled_from(context().names).flatmap(
    lambda n: st.tuples(st.just(n), mutated(context().documents[n].data))))
def test_byte_mutated_documents_parse_or_fail_cleanly(case: tuple[str, bytes]) -> None:
    name, data = case
    targets.TARGETS[_target_of(name)](data)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_as_any_document_never_crash(data: bytes) -> None:
    for target in ("trust_root", "node_cert", "scheme", "agreement", "signed_document",
                   "sig_file"):
        targets.TARGETS[target](data)


@FUZZ
@given(st.integers(1, 6_000), st.sampled_from(["[", "{x = "]),
       st.sampled_from(["trust_root", "node_cert", "scheme", "agreement"]))
def test_toml_nested_to_any_depth_is_refused_cleanly(depth: int, opener: str,
                                                     target: str) -> None:
    closer = "]" if opener == "[" else "}"
    data = f"a = {opener * depth}1{closer * depth}\n".encode()
    assert targets.TARGETS[target](data) is False


@FUZZ
@given(st.dictionaries(st.sampled_from(["doc", "name", "sig", "x"]),
                       st.one_of(text, st.binary(max_size=16), ints), max_size=4))
def test_signed_document_maps_parse_exactly_when_well_formed(value: dict[str, Any]) -> None:
    well_formed = (set(value) == {"doc", "name", "sig"} and type(value["doc"]) is bytes
                   and type(value["sig"]) is bytes and type(value["name"]) is str)
    assert targets.signed_document(canonical.encode(value)) is well_formed


@FUZZ
@given(mutated_seed("signed_document"))
def test_mutated_signed_documents_fail_cleanly(data: bytes) -> None:
    targets.signed_document(data)


sig_lines = st.one_of(
    st.builds(lambda s, k, b: f"{s} ed25519:{k} {b}",
              st.one_of(text, st.sampled_from(["DEU", "FRA", "USA"])),
              st.one_of(st.text("0123456789abcdef", min_size=16, max_size=16), text),
              st.one_of(st.binary(max_size=70).map(lambda b: base64.b64encode(b).decode()),
                        text)),
    text.map(lambda t: "#" + t), text)


@FUZZ
@given(st.lists(sig_lines, max_size=5), st.sampled_from(["\n", "\r\n", "\x0b", "\u2028"]))
def test_structured_signature_files_parse_or_fail_cleanly(lines: list[str], end: str) -> None:
    targets.sig_file(end.join(lines).encode())


@FUZZ
@given(mutated_seed("sig_file"))
def test_mutated_signature_files_fail_cleanly(data: bytes) -> None:
    targets.sig_file(data)


@SLOW
@given(mutated_seed("bundle_content"))
def test_mutated_bundle_contents_fail_cleanly(data: bytes) -> None:
    targets.bundle_content(data)


@SLOW
@given(st.dictionaries(st.sampled_from([*context().names, "x.toml", "nodes/"]),
                       st.one_of(st.binary(max_size=16), st.sampled_from(
                           [d.to_bytes() for d in context().documents.values()])),
                       max_size=6))
def test_bundle_contents_of_mixed_documents_fail_cleanly(value: dict[str, bytes]) -> None:
    targets.bundle_content(canonical.encode(value))


# --- audit entries, notes, exports --------------------------------------------------------------

_ENTRY_PATHS: list[tuple[str, ...]] = [
    *((k,) for k in ("kind", "ts", "id", "env", "from", "topic", "label", "prec", "ttl", "bundle",
                     "sealed", "decisions", "to", "seq", "event", "node", "conn", "reason",
                     "operator", "action", "target", "outcome")),
    ("label", "cats"), ("label", "rel"), ("label", "class"), ("decisions", "FRA-GW1"),
    ("decisions", "POL-GW1")]


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_entry_decoder(data: bytes) -> None:
    targets.entry(data)


@FUZZ
@given(mutated_seed("entry"))
def test_mutated_entries_fail_cleanly(data: bytes) -> None:
    targets.entry(data)


@settings(FUZZ, max_examples=300)
@given(_seed("entry"), edits(_ENTRY_PATHS))
def test_entries_with_a_replaced_field_round_trip_or_fail_cleanly(seed: bytes,
                                                                  edit: Edit) -> None:
    original = canonical.decode(seed)
    data = canonical.encode(apply(original, edit))
    parsed = targets.entry(data)
    if len(edit.path) == 1 and (edit.action == "add" or (edit.action == "delete"
                                                         and edit.path[0] in original)):
        assert parsed is False


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_note_parsers(data: bytes) -> None:
    targets.note_(data)
    targets.checkpoint(data)


@FUZZ
@given(mutated_seed("note"))
def test_mutated_signed_notes_fail_cleanly(data: bytes) -> None:
    targets.note_(data)


@FUZZ
@given(_seed("note"), st.data())
def test_notes_with_lines_dropped_duplicated_or_replaced_fail_cleanly(
        seed: bytes, data: st.DataObject) -> None:
    lines = seed.split(b"\n")
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(lines) - 1))
        how = data.draw(st.sampled_from(["drop", "duplicate", "replace"]))
        if how == "drop" and len(lines) > 1:
            del lines[index]
        elif how == "duplicate":
            lines.insert(index, lines[index])
        else:
            lines[index] = data.draw(text).encode()
    targets.note_(b"\n".join(lines))


def _parses(parse: Callable[[], object]) -> bool:
    try:
        parse()
    except ProtocolError:
        return False
    return True


@FUZZ
@given(st.one_of(text, st.sampled_from(["broker.coalition.example", "a+b", "a b", ""])),
       st.one_of(st.integers(-1, 1 << 64).map(str), st.sampled_from(["01", "+1", "1_0", "١"])),
       st.one_of(st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()), text),
       st.lists(text, max_size=2))
def test_structured_checkpoints_parse_exactly_when_well_formed(
        origin: str, size: str, root: str, extensions: list[str]) -> None:
    checkpoint_text = "".join(line + "\n" for line in (origin, size, root, *extensions))
    # what the text's lines say, however the parts split into lines
    lines = checkpoint_text[:-1].split("\n")
    origin, size, root, extensions = lines[0], lines[1], lines[2], lines[3:]
    raw_root = base64.b64decode(root) if _is_b64(root) else b""
    well_formed = (
        all(line and not any(ord(c) < 0x20 for c in line) for line in (origin, *extensions))
        and size.isascii() and size.isdigit() and (size == "0" or not size.startswith("0"))
        and int(size) <= MAX_INT and len(raw_root) == 32
        and base64.b64encode(raw_root).decode() == root)
    assert _parses(lambda: note.Checkpoint.from_text(checkpoint_text)) is well_formed
    assert targets.checkpoint(checkpoint_text.encode()) is well_formed


def _is_b64(value: str) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


@FUZZ
@given(st.one_of(text, st.sampled_from(["GBR-GW1", "a+b", "a b", ""])),
       st.binary(max_size=80))
def test_structured_signature_lines_parse_exactly_when_well_formed(name: str,
                                                                   raw: bytes) -> None:
    line = f"— {name} {base64.b64encode(raw).decode()}"
    well_formed = (bool(name) and "+" not in name and not any(c.isspace() for c in name)
                   and not any(ord(c) < 0x20 for c in name) and len(raw) >= 5)
    assert _parses(lambda: note.parse_signature_line(line)) is well_formed
    targets.checkpoint(line.encode())


json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8)


@FUZZ
@given(st.one_of(json_values, st.fixed_dictionaries(
    {"format": st.just("coalition-audit-export/v1"), "origin": json_values})), st.data())
def test_export_manifests_of_any_json_shape_fail_cleanly(manifest: Any,
                                                         data: st.DataObject) -> None:
    parts = targets.split_export(data.draw(_seed("export")))
    parts[0] = json.dumps(manifest).encode()
    targets.export(targets.EXPORT_SEPARATOR.join(parts))


@FUZZ
@given(_seed("export"), st.integers(1, 200_000), st.sampled_from(["[", '{"a": ']))
def test_export_manifests_nested_to_any_depth_are_refused(seed: bytes, depth: int,
                                                          opener: str) -> None:
    parts = targets.split_export(seed)
    parts[0] = (opener * depth).encode()
    assert targets.export(targets.EXPORT_SEPARATOR.join(parts)) is False


@FUZZ
@given(_seed("export"), st.integers(0, 5), st.data())
def test_exports_with_one_mutated_file_fail_cleanly(seed: bytes, part: int,
                                                    data: st.DataObject) -> None:
    parts = targets.split_export(seed)
    parts[part] = data.draw(mutated(parts[part]))
    targets.export(targets.EXPORT_SEPARATOR.join(parts))


@SLOW
@given(_seed("auditor"), st.integers(0, 5), st.data())
def test_audits_of_exports_with_one_mutated_file_report_instead_of_crashing(
        seed: bytes, part: int, data: st.DataObject) -> None:
    parts = targets.split_export(seed)
    parts[part] = data.draw(mutated(parts[part]))
    targets.auditor(targets.EXPORT_SEPARATOR.join(parts))


@FUZZ
@given(st.one_of(st.none(), st.floats(), st.text(max_size=5), st.lists(st.integers(),
                                                                        max_size=2),
                 st.integers(-5, -1), st.booleans()))
def test_export_manifest_size_that_is_not_a_count_is_refused(size: Any) -> None:
    parts = targets.split_export(_seeds()["auditor"][0])
    manifest = json.loads(parts[0])
    manifest["size"] = size
    parts[0] = json.dumps(manifest).encode()
    assert targets.auditor(targets.EXPORT_SEPARATOR.join(parts)) is False


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=6))
def test_exports_of_arbitrary_files_fail_cleanly(parts: list[bytes]) -> None:
    targets.export(targets.EXPORT_SEPARATOR.join(parts))


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_a_long_input_of_one_repeated_byte_fails_cleanly(target: str) -> None:
    # what a size-limit or recursion bug trips on: 200 KB of openers of every kind (a crash
    # propagates; a blank signature file or note list may well parse)
    for byte in b"[{\x91\x81\xdc\n":
        targets.TARGETS[target](bytes([byte]) * 200_000)

