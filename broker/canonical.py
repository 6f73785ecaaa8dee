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

#: Types encoded as they are (``bool`` is its own type, not ``int``, for ``type(x) in``).
_SCALARS = frozenset({str, bytes, int, bool})

#: One packer for every call: ``msgpack.packb`` builds one per call, with a 256 KiB buffer
#: (~1 µs). Shared only when it is msgpack's C packer, which packs with the GIL held and calls
#: no Python code (no ``default``), so two threads never interleave in it (the pure-Python one,
#: under PyPy or ``MSGPACK_PUREPYTHON``, would: then every call builds its own). Its buffer
#: grows to the largest object packed and stays: after one larger than
#: :data:`_KEEP_PACKER_BYTES`, or a pack that failed (perhaps after growing it), the packer is
#: replaced, to hand that memory back.
_SHARED_PACKER = msgpack.Packer.__module__.endswith("_cmsgpack")
_PACKER = msgpack.Packer(use_bin_type=True)
_KEEP_PACKER_BYTES = 1 << 20


def encode(obj: Any) -> bytes:
    """Encode ``obj`` as canonical msgpack; raise :class:`ProtocolError` on unencodable values."""
    try:
        packed = pack(_normalise(obj, 0))
    except (OverflowError, ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot encode: {exc}", code="bad_frame") from exc
    return packed


def encode_ordered(obj: Any) -> bytes:
    """Pack ``obj`` as it is: the caller built every map in canonical key order from canonical
    types (``str``, ``bytes``, ``int``, ``bool``, lists, maps), e.g. from values it normalised
    once and cached. For hot paths only; :func:`encode` is the checked way, and tests compare
    the two for every caller."""
    try:
        packed = pack(obj)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot encode: {exc}", code="bad_frame") from exc
    return packed


def normalised(obj: Any, *, depth: int = 0) -> Any:
    """``obj`` as :func:`encode` packs it (maps in canonical key order, tuples as lists); raise
    :class:`ProtocolError` on what the contract forbids. To cache and pass to
    :func:`encode_ordered`; ``depth`` is where ``obj`` sits in the structure it goes into."""
    return _normalise(obj, depth)


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
    # Map keys in the order received must already be the canonical order, and only the allowed
    # types may occur; then re-packing as decoded must give back the same bytes (shortest ints,
    # str vs bin, no trailing tricks). Cheaper than normalising a copy, same verdict.
    _check_decoded(obj, 0)
    if pack(obj) != data:
        raise ProtocolError("bytes do not re-encode identically", code="non_canonical")
    return obj


def pack(obj: Any) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)`` with the shared packer: no canonical checks."""
    global _PACKER
    if not _SHARED_PACKER:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    try:
        packed: bytes = _PACKER.pack(obj)
    except BaseException:
        _PACKER = msgpack.Packer(use_bin_type=True)
        raise
    if len(packed) > _KEEP_PACKER_BYTES:
        _PACKER = msgpack.Packer(use_bin_type=True)
    return packed


def is_sorted_unique(values: Sequence[str]) -> bool:
    """True when ``values`` is strictly increasing by UTF-8 bytes (a canonical set).

    UTF-8 preserves code point order, so comparing the ``str`` values is comparing their bytes.
    """
    return all(a < b for a, b in itertools.pairwise(values))


def canonical_set(values: Sequence[str]) -> list[str]:
    """Return ``values`` as a canonical set: unique, sorted by UTF-8 bytes."""
    return sorted(set(values))


def is_scalar(value: Any) -> bool:
    """``str``, ``bytes``, ``int`` or ``bool`` (exactly): encoded as it is."""
    return type(value) in _SCALARS


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"ext type {code} is not allowed", code="non_canonical")


def _normalise(obj: Any, depth: int) -> Any:
    """Return a structure msgpack encodes canonically; reject what the contract forbids."""
    if depth > _MAX_DEPTH:
        raise ProtocolError("nesting too deep", code="bad_frame")
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if obj and depth >= _MAX_DEPTH and isinstance(obj, (Mapping, list, tuple)):
        raise ProtocolError("nesting too deep", code="bad_frame")  # as if its items recursed
    if kind is dict or isinstance(obj, Mapping):
        for key in obj:
            if type(key) is not str:
                raise ProtocolError(f"map key {key!r} is not a str", code="bad_frame")
        # Code point order of str keys is the UTF-8 byte order the contract asks for. Scalars
        # are taken as they are without a call: this runs for every entry the broker logs.
        return {key: value if type(value := obj[key]) in _SCALARS
                else _normalise(value, depth + 1) for key in sorted(obj)}
    if kind is list or kind is tuple:
        return [item if type(item) in _SCALARS else _normalise(item, depth + 1)
                for item in obj]
    if isinstance(obj, (bool, int, str, bytes)):  # subclasses (IntEnum, …)
        return obj
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return [_normalise(item, depth + 1) for item in obj]
    if obj is None:
        raise ProtocolError("nil is not allowed: omit absent fields", code="bad_frame")
    if isinstance(obj, float):
        raise ProtocolError("floats are not allowed", code="bad_frame")
    raise ProtocolError(f"cannot encode {type(obj).__name__}", code="bad_frame")


def _check_decoded(obj: Any, depth: int) -> None:
    """Raise ``non_canonical`` unless ``obj`` (as decoded) is in canonical form.

    Scalars inside maps and arrays are checked inline, without a call each: every frame and
    envelope the broker receives goes through here.
    """
    if depth > _MAX_DEPTH:
        raise ProtocolError("nesting too deep", code="bad_frame")
    kind = type(obj)
    if kind in _SCALARS:
        return
    if obj and depth >= _MAX_DEPTH and (kind is dict or kind is list):
        raise ProtocolError("nesting too deep", code="bad_frame")  # as if its items recursed
    if kind is dict:
        previous = None
        for key, value in obj.items():
            if type(key) is not str:
                raise ProtocolError("not canonical: a map key is not a str", code="non_canonical")
            if previous is not None and not previous < key:
                raise ProtocolError("not canonical: map keys are not sorted",
                                    code="non_canonical")
            previous = key
            if type(value) not in _SCALARS:
                _check_decoded(value, depth + 1)
        return
    if kind is list:
        for item in obj:
            if type(item) not in _SCALARS:
                _check_decoded(item, depth + 1)
        return
    what = "nil" if obj is None else type(obj).__name__
    raise ProtocolError(f"not canonical: {what} is not allowed", code="non_canonical")
