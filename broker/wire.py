"""Frame codec of the node protocol (DESIGN §7): bytes in, typed frames out, and back.

Every WebSocket message is one binary frame holding a canonical msgpack map with a ``t`` field.
Each frame type is a frozen dataclass below; :func:`decode_frame` checks the canonical form, the
size limit, the type tag, that every required field is present with the right type and that no
unknown field is present. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from broker import canonical
from broker.errors import ProtocolError

PROTOCOL_VERSION = 1
_MAX_INT = (1 << 63) - 1


@dataclasses.dataclass(frozen=True)
class Frame:
    """Base of all frames; ``T`` is the wire type tag."""

    T: ClassVar[str] = ""

    def to_map(self) -> dict[str, Any]:
        """The frame as a plain map, optional fields omitted when ``None``."""
        out: dict[str, Any] = {"t": self.T}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                out[field.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class Challenge(Frame):
    T: ClassVar[str] = "challenge"
    v: int
    broker: str
    nonce: bytes


@dataclasses.dataclass(frozen=True)
class Hello(Frame):
    T: ClassVar[str] = "hello"
    v: int
    node: str
    nonce: bytes
    ts: int
    sig: bytes


@dataclasses.dataclass(frozen=True)
class Welcome(Frame):
    T: ClassVar[str] = "welcome"
    node: str
    checkpoint: str | None = None


@dataclasses.dataclass(frozen=True)
class Sub(Frame):
    T: ClassVar[str] = "sub"
    topic: str


@dataclasses.dataclass(frozen=True)
class Unsub(Frame):
    T: ClassVar[str] = "unsub"
    topic: str


@dataclasses.dataclass(frozen=True)
class Pub(Frame):
    T: ClassVar[str] = "pub"
    env: bytes


@dataclasses.dataclass(frozen=True)
class Receipt(Frame):
    T: ClassVar[str] = "receipt"
    id: bytes
    audit: int
    recipients: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class Deliver(Frame):
    T: ClassVar[str] = "deliver"
    env: bytes
    seq: int


@dataclasses.dataclass(frozen=True)
class Ack(Frame):
    T: ClassVar[str] = "ack"
    seqs: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Route(Frame):
    T: ClassVar[str] = "route"
    topic: str
    label: Mapping[str, Any]
    to: tuple[str, ...] | None = None
    #: Extension: ask for the label catalogue of each destination nation as well.
    catalogue: bool | None = None


@dataclasses.dataclass(frozen=True)
class Routes(Frame):
    T: ClassVar[str] = "routes"
    recipients: Mapping[str, str]
    keys: Mapping[str, bytes]
    #: Extension, only when asked: destination nation → label catalogue (policies.catalogue).
    catalogue: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Directory(Frame):
    """Request (no ``certs``) and answer (``certs``: signed node certificates) share one tag."""

    T: ClassVar[str] = "directory"
    certs: tuple[bytes, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Checkpoint(Frame):
    T: ClassVar[str] = "checkpoint"
    note: str
    proof: tuple[bytes, ...]
    old: int


@dataclasses.dataclass(frozen=True)
class Cosign(Frame):
    T: ClassVar[str] = "cosign"
    line: str


@dataclasses.dataclass(frozen=True)
class Prove(Frame):
    """Extension: a node asks for the inclusion proof of an audit entry about itself."""

    T: ClassVar[str] = "prove"
    index: int


@dataclasses.dataclass(frozen=True)
class Proof(Frame):
    """Extension: the entry, its inclusion proof and the signed checkpoint it is proven in."""

    T: ClassVar[str] = "proof"
    index: int
    size: int
    entry: bytes
    proof: tuple[bytes, ...]
    checkpoint: str


@dataclasses.dataclass(frozen=True)
class Expired(Frame):
    T: ClassVar[str] = "expired"
    id: bytes
    recipient: str


@dataclasses.dataclass(frozen=True)
class Ping(Frame):
    T: ClassVar[str] = "ping"


@dataclasses.dataclass(frozen=True)
class Pong(Frame):
    T: ClassVar[str] = "pong"


@dataclasses.dataclass(frozen=True)
class Error(Frame):
    T: ClassVar[str] = "error"
    code: str
    reason: str
    ref: bytes | None = None


FRAME_TYPES: dict[str, type[Frame]] = {
    cls.T: cls
    for cls in (
        Challenge, Hello, Welcome, Sub, Unsub, Pub, Receipt, Deliver, Ack, Route, Routes,
        Directory, Checkpoint, Cosign, Prove, Proof, Expired, Ping, Pong, Error,
    )
}

#: Field annotations of every frame type, resolved once.
_FIELD_TYPES: dict[str, dict[str, Any]] = {
    tag: {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    for tag, cls in FRAME_TYPES.items()
}

#: Frames a node may send (anything else from a node is ``unexpected_frame``).
NODE_FRAMES = frozenset({"hello", "sub", "unsub", "pub", "ack", "route", "directory", "cosign",
                         "prove", "ping", "pong"})


#: Per frame type: its fields and ``t`` in canonical key order.
_ENCODE_ORDER: dict[str, tuple[str, ...]] = {
    tag: tuple(sorted([*hints, "t"])) for tag, hints in _FIELD_TYPES.items()
}


def encode_frame(frame: Frame) -> bytes:
    """Serialise a frame as canonical msgpack.

    Built in canonical key order, with only the nested values normalised: every receipt and
    delivery goes through here, and a delivery's envelope bytes need no pass (the result is
    the same as ``canonical.encode(frame.to_map())``, which the tests check).
    """
    out: dict[str, Any] = {}
    for name in _ENCODE_ORDER[frame.T]:
        value = frame.T if name == "t" else getattr(frame, name)
        if value is None:
            continue
        out[name] = value if canonical.is_scalar(value) else canonical.normalised(value, depth=1)
    return canonical.encode_ordered(out)


def decode_frame(data: bytes, *, max_bytes: int = canonical.DEFAULT_MAX_BYTES) -> Frame:
    """Parse one frame; raise :class:`ProtocolError` (``too_large``, ``bad_frame`` or
    ``non_canonical``)."""
    obj = canonical.decode(data, max_bytes=max_bytes)
    if not isinstance(obj, dict):
        raise ProtocolError("a frame must be a map", code="bad_frame")
    tag = obj.get("t")
    if not isinstance(tag, str):
        raise ProtocolError("a frame needs a str field 't'", code="bad_frame")
    cls = FRAME_TYPES.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown frame type {tag!r}", code="bad_frame")
    return _frame_from_map(cls, obj)


def _frame_from_map(cls: type[Frame], obj: dict[str, Any]) -> Frame:
    fields = _FIELD_CHECKS[cls.T]
    if not obj.keys() - {"t"} <= fields.keys():
        unknown = set(obj) - set(fields) - {"t"}
        raise ProtocolError(f"{cls.T}: unknown field(s) {sorted(unknown)}", code="bad_frame")
    kwargs: dict[str, Any] = {}
    for name, (optional, check) in fields.items():
        if name not in obj:
            if optional:
                continue
            raise ProtocolError(f"{cls.T}: missing field {name!r}", code="bad_frame")
        kwargs[name] = check(obj[name])
    return cls(**kwargs)


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


_Check = Callable[[Any], Any]


def _checker(hint: Any, where: str) -> _Check:
    """A function that checks a value against a field annotation and returns it in its frozen
    form. Built once per field: the annotations are walked at import, not per frame."""
    if _is_optional(hint):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if hint is bool:
        return functools.partial(_check_bool, where=where)
    if hint is int:
        return functools.partial(_check_int, where=where)
    if hint in (str, bytes):
        return functools.partial(_check_exact, kind=hint, where=where)
    if origin is tuple:
        return functools.partial(_check_tuple, item=_checker(typing.get_args(hint)[0], where),
                                 where=where)
    if origin is Mapping:
        _key_type, value_type = typing.get_args(hint)
        item = None if value_type is Any else _checker(value_type, f"{where}[…]")
        return functools.partial(_check_map, item=item, value_type=value_type, where=where)
    raise AssertionError(f"unsupported annotation {hint!r} at {where}")  # pragma: no cover


def _check_bool(value: Any, *, where: str) -> Any:
    if type(value) is not bool:
        raise ProtocolError(f"{where} must be a boolean", code="bad_frame")
    return value


def _check_int(value: Any, *, where: str) -> Any:
    if type(value) is not int or not 0 <= value <= _MAX_INT:
        raise ProtocolError(f"{where} must be a non-negative int", code="bad_frame")
    return value


def _check_exact(value: Any, *, kind: type, where: str) -> Any:
    if type(value) is not kind:
        raise ProtocolError(f"{where} must be {kind.__name__}", code="bad_frame")
    return value


def _check_tuple(value: Any, *, item: _Check, where: str) -> Any:
    if not isinstance(value, list):
        raise ProtocolError(f"{where} must be an array", code="bad_frame")
    return tuple(map(item, value))


def _check_map(value: Any, *, item: _Check | None, value_type: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a map", code="bad_frame")
    if item is None:
        return value
    out = {}
    for key, entry in value.items():
        try:
            out[key] = item(entry)
        except ProtocolError:
            # Checked again by a checker that names the key (only on the way to an error).
            _checker(value_type, f"{where}[{key!r}]")(entry)
            raise
    return out


#: Per frame type: each field's (optional, checker).
_FIELD_CHECKS: dict[str, dict[str, tuple[bool, _Check]]] = {
    tag: {name: (_is_optional(hint), _checker(hint, f"{tag}.{name}"))
          for name, hint in hints.items()}
    for tag, hints in _FIELD_TYPES.items()
}
