"""Structure-aware mutations (``python -m tests.fuzz.run TARGET --structured``).

libFuzzer's byte mutations rarely produce a *well-formed* input with a *wrong* structure: a
msgpack map missing one key needs the key removed and the map header decremented at once; a
trust root whose ``brokers`` is ``[1]`` needs a TOML rewrite. These mutators decode the input
the way its target's format says (msgpack, TOML, lines, the parts of an export), change one
thing in the decoded tree — a value replaced by one of another type, a key removed or added, an
array item duplicated — and encode it again. ``run.py --structured`` uses them for half of the
mutations and libFuzzer's own for the other half (and whenever an input does not decode).

Pure and deterministic for a given ``random.Random``; no atheris needed (tested in
``tests/unit/test_fuzz_targets.py``).
"""

from __future__ import annotations

import json
import random
import tomllib
from collections.abc import Callable
from typing import Any

import msgpack

from broker import canonical
from tests.fuzz.context import dump_toml
from tests.fuzz.targets import EXPORT_SEPARATOR, split_export

_INTS = (0, 1, 2, 3, -1, 16, 255, 256, 65536, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -(1 << 63))
_WORDS = ("", "x", "t", "NATO", "USA", "GBR", "SECRET", "ALPHA", "NTK", "restrictive",
          "maritime.>", "GBR-GW1", "ed25519:", "x25519:", "route", "kind", "cats", "rel",
          "serial", "brokers", "communities", "nations", "tiers", "members", "categories",
          "topics", "equivalence", "levels", "tags", "values", "version", "size", "format")


def _strings(value: Any, out: set[str]) -> set[str]:
    """Every string (keys included) in a decoded tree: the input's own vocabulary."""
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                out.add(key)
            _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)
    return out


class _Values:
    """Random replacement values for one format (``msgpack``, ``toml`` or ``json``)."""

    def __init__(self, rnd: random.Random, fmt: str, words: set[str]) -> None:
        self.rnd, self.fmt = rnd, fmt
        self.words = sorted(words | set(_WORDS))

    def word(self) -> str:
        return self.rnd.choice(self.words)

    def scalar(self) -> Any:
        choices: list[Callable[[], Any]] = [
            lambda: self.rnd.choice(_INTS), self.word, lambda: self.rnd.random() < 0.5]
        if self.fmt == "msgpack":
            choices.append(lambda: self.rnd.randbytes(self.rnd.choice((0, 1, 16, 32, 64))))
        if self.fmt != "msgpack":  # TOML and JSON have floats; JSON has null
            choices.append(lambda: self.rnd.choice((0.5, -0.0, 1e300, float("inf"))))
        if self.fmt == "json":
            choices.append(lambda: None)
        if self.fmt == "toml":
            choices.append(lambda: self.rnd.choice(_TOML_TIMES))
        return self.rnd.choice(choices)()

    def value(self, depth: int = 0) -> Any:
        roll = self.rnd.random()
        if depth < 3 and roll < 0.15:
            return [self.value(depth + 1) for _ in range(self.rnd.randint(0, 3))]
        if depth < 3 and roll < 0.3:
            return {self.word(): self.value(depth + 1) for _ in range(self.rnd.randint(0, 3))}
        return self.scalar()


def _toml_times() -> tuple[Any, ...]:
    parsed = tomllib.loads("a = 2026-11-19T00:00:00Z\nb = 0001-01-01T00:00:00+23:59\n"
                           "c = 9999-12-31T23:59:59.999999-23:59\nd = 2026-11-19T00:00:00\n"
                           "e = 2026-11-19\nf = 12:00:00")
    return tuple(parsed.values())


_TOML_TIMES = _toml_times()


def _containers(value: Any, out: list[Any]) -> list[Any]:
    if isinstance(value, (dict, list)):
        out.append(value)
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            _containers(item, out)
    return out


def edit_tree(tree: Any, values: _Values) -> Any:
    """One edit somewhere in ``tree`` (changed in place where it is a container)."""
    containers = _containers(tree, [])
    if not containers:
        return values.value()
    node = values.rnd.choice(containers)
    op = values.rnd.choice(("replace", "replace", "delete", "add", "duplicate", "wrap"))
    if isinstance(node, dict):
        keys = list(node)
        if op == "add" or not keys:
            node[values.word()] = values.value()
            return tree
        key = values.rnd.choice(keys)
        if op == "delete":
            del node[key]
        elif op == "wrap":
            node[key] = [node[key]] if values.rnd.random() < 0.5 else {values.word(): node[key]}
        elif op == "duplicate":
            node[values.word()] = node[key]
        else:
            node[key] = values.value()
        return tree
    if op == "add" or not node:
        node.insert(values.rnd.randint(0, len(node)), values.value())
        return tree
    index = values.rnd.randrange(len(node))
    if op == "delete":
        del node[index]
    elif op == "duplicate":
        node.insert(index, node[index])
    elif op == "wrap":
        node[index] = [node[index]]
    else:
        node[index] = values.value()
    return tree


# --- formats ----------------------------------------------------------------------------------


def _msgpack(data: bytes, rnd: random.Random) -> bytes | None:
    try:
        tree = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # whatever the bytes are, this mutator just does not apply
        return None
    tree = edit_tree(tree, _Values(rnd, "msgpack", _strings(tree, set())))
    if rnd.random() < 0.9:
        try:
            return canonical.encode(tree)
        except Exception:  # e.g. a non-str key: fall back to plain msgpack
            pass
    try:
        packed: bytes = msgpack.packb(tree, use_bin_type=True)
    except Exception:
        return None
    return packed


def _envelope(data: bytes, rnd: random.Random) -> bytes | None:
    """Edit inside the signed body (kept a bin of the outer array) most of the time."""
    try:
        outer = canonical.decode(data)
    except Exception:
        return _msgpack(data, rnd)
    if (isinstance(outer, list) and outer and isinstance(outer[0], bytes)
            and rnd.random() < 0.8):
        body = _msgpack(outer[0], rnd)
        if body is not None:
            outer[0] = body
            return canonical.encode(outer)
    return _msgpack(data, rnd)


def _toml(data: bytes, rnd: random.Random) -> bytes | None:
    try:
        tree = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return None
    try:
        return dump_toml(edit_tree(tree, _Values(rnd, "toml", _strings(tree, set()))))
    except (TypeError, ValueError):
        return None


def _json(data: bytes, rnd: random.Random) -> bytes | None:
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return json.dumps(edit_tree(tree, _Values(rnd, "json", _strings(tree, set())))).encode()


def _lines(data: bytes, rnd: random.Random) -> bytes | None:
    lines = data.split(b"\n")
    index = rnd.randrange(len(lines))
    op = rnd.choice(("drop", "duplicate", "swap", "split", "word"))
    if op == "drop" and len(lines) > 1:
        del lines[index]
    elif op == "duplicate":
        lines.insert(index, lines[index])
    elif op == "swap":
        other = rnd.randrange(len(lines))
        lines[index], lines[other] = lines[other], lines[index]
    elif op == "split" and lines[index]:
        cut = rnd.randrange(len(lines[index]))
        lines[index:index + 1] = [lines[index][:cut], lines[index][cut:]]
    else:
        words = lines[index].split(b" ")
        words[rnd.randrange(len(words))] = rnd.choice(_WORDS).encode()
        lines[index] = b" ".join(words)
    return b"\n".join(lines)


def _records(data: bytes, rnd: random.Random) -> bytes | None:
    """``entries.bin``: one record's entry mutated as msgpack, its length header kept true."""
    records, pos = [], 0
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos + 8:pos + 12], "big")
        records.append([data[pos:pos + 8], data[pos + 12:pos + 12 + length]])
        pos += 12 + length
    if not records:
        return None
    record = rnd.choice(records)
    entry = _msgpack(record[1], rnd)
    if entry is None:
        return None
    record[1] = entry
    return b"".join(i + len(e).to_bytes(4, "big") + e for i, e in records) + data[pos:]


def _export(data: bytes, rnd: random.Random) -> bytes | None:
    parts = split_export(data)
    which = rnd.choice((0, 1, 1, 4))
    mutated = {0: _json, 1: _records, 4: _lines}[which](parts[which], rnd)
    if mutated is None:
        return None
    parts[which] = mutated
    return EXPORT_SEPARATOR.join(parts)


def _bundle_document(data: bytes, rnd: random.Random) -> bytes | None:
    if not data:
        return None
    if rnd.random() < 0.1:
        return bytes([rnd.randrange(256)]) + data[1:]
    document = _toml(data[1:], rnd)
    return None if document is None else data[:1] + document


MUTATORS: dict[str, Callable[[bytes, random.Random], bytes | None]] = {
    "frame": _msgpack, "envelope": _envelope, "signed_document": _msgpack,
    "sig_file": _lines, "trust_root": _toml, "node_cert": _toml, "scheme": _toml,
    "agreement": _toml, "bundle_content": _msgpack, "bundle_document": _bundle_document,
    "entry": _msgpack, "note": _lines, "checkpoint": _lines, "export": _export,
    "auditor": _export,
}


def mutate(target: str, data: bytes, rnd: random.Random) -> bytes | None:
    """A structural mutation of ``data`` for ``target``, or ``None`` when it does not apply."""
    try:
        return MUTATORS[target](data, rnd)
    except RecursionError:  # a tree nested deeper than this mutator walks
        return None
