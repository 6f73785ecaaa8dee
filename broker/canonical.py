"""Canonical msgpack (DESIGN §3): the one encoding for everything that is signed or hashed.

Rules: maps have ``str`` keys sorted by their UTF-8 bytes; integers in the shortest form; text as
``str`` and bytes as ``bin``; no floats, no ext types, no ``nil`` (absent optional fields are
omitted); arrays for sequences. A receiver decodes with size limits, re-encodes, and rejects
bytes that do not re-encode identically (``non_canonical``).

Pure: no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from broker.errors import ProtocolError

#: Default upper bound for one decoded object (one WebSocket frame).
DEFAULT_MAX_BYTES = 1 << 20

_MAX_DEPTH = 16


def encode(obj: Any) -> bytes:
    """Encode ``obj`` as canonical msgpack; raise :class:`ProtocolError` on unencodable values."""
    try:
        packed: bytes = msgpack.packb(_normalise(obj, 0), use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot encode: {exc}", code="bad_frame") from exc
    return packed


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Decode canonical msgpack ``data``, enforcing size limits and canonical form.

    Raises :class:`ProtocolError` with code ``too_large``, ``bad_frame`` or ``non_canonical``.
    """
    if len(data) > max_bytes:
        raise ProtocolError(f"{len(data)} bytes exceed the limit of {max_bytes}", code="too_large")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData as exc:
        raise ProtocolError("trailing bytes after the msgpack object", code="bad_frame") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolError(f"not valid msgpack: {type(exc).__name__}", code="bad_frame") from exc
    try:
        again = encode(obj)
    except ProtocolError as exc:
        raise ProtocolError(f"not canonical: {exc.reason}", code="non_canonical") from exc
    if again != data:
        raise ProtocolError("bytes do not re-encode identically", code="non_canonical")
    return obj


def is_sorted_unique(values: Sequence[str]) -> bool:
    """True when ``values`` is strictly increasing by UTF-8 bytes (a canonical set)."""
    encoded = [v.encode() for v in values]
    return all(a < b for a, b in itertools.pairwise(encoded))


def canonical_set(values: Sequence[str]) -> list[str]:
    """Return ``values`` as a canonical set: unique, sorted by UTF-8 bytes."""
    return sorted(set(values), key=lambda v: v.encode())


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"ext type {code} is not allowed", code="non_canonical")


def _normalise(obj: Any, depth: int) -> Any:
    """Return a structure msgpack encodes canonically; reject what the contract forbids."""
    if depth > _MAX_DEPTH:
        raise ProtocolError("nesting too deep", code="bad_frame")
    if isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, Mapping):
        items = []
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ProtocolError(f"map key {key!r} is not a str", code="bad_frame")
            items.append((key.encode(), key, _normalise(value, depth + 1)))
        items.sort(key=lambda item: item[0])
        return {key: value for _, key, value in items}
    if isinstance(obj, (list, tuple)):
        return [_normalise(item, depth + 1) for item in obj]
    if obj is None:
        raise ProtocolError("nil is not allowed: omit absent fields", code="bad_frame")
    if isinstance(obj, float):
        raise ProtocolError("floats are not allowed", code="bad_frame")
    raise ProtocolError(f"cannot encode {type(obj).__name__}", code="bad_frame")
