"""Canonical msgpack (DESIGN §3): what encodes, what decodes, and every way bytes are refused."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from broker import canonical
from broker.errors import ProtocolError


def _refused(data: bytes, code: str, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        canonical.decode(data, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def _nested_lists(depth: int) -> list[Any]:
    """``depth`` nested lists around an int: ``_nested_lists(2) == [[1]]``."""
    out: Any = 1
    for _ in range(depth):
        out = [out]
    return out


# --- encoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\xcc\x80"),
        (255, b"\xcc\xff"),
        (256, b"\xcd\x01\x00"),
        (65535, b"\xcd\xff\xff"),
        (65536, b"\xce\x00\x01\x00\x00"),
        ((1 << 32) - 1, b"\xce\xff\xff\xff\xff"),
        (1 << 32, b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00"),
        ((1 << 64) - 1, b"\xcf" + b"\xff" * 8),
        (-1, b"\xff"),
        (-32, b"\xe0"),
        (-33, b"\xd0\xdf"),
        (-128, b"\xd0\x80"),
        (-129, b"\xd1\xff\x7f"),
        (-(1 << 63), b"\xd3\x80" + b"\x00" * 7),
    ],
)
def test_integers_encode_in_their_shortest_form(value: int, expected: bytes) -> None:
    assert canonical.encode(value) == expected
    assert canonical.decode(expected) == value


@pytest.mark.parametrize("value", [1 << 64, -(1 << 63) - 1])
def test_integers_outside_msgpack_range_cannot_be_encoded(value: int) -> None:
    with pytest.raises(ProtocolError) as info:
        canonical.encode(value)
    assert info.value.code == "bad_frame"


def test_text_encodes_as_str_and_bytes_as_bin() -> None:
    assert canonical.encode("a") == b"\xa1a"
    assert canonical.encode(b"a") == b"\xc4\x01a"
    assert canonical.encode(bytearray(b"a")) == b"\xc4\x01a"
    assert canonical.encode(memoryview(b"a")) == b"\xc4\x01a"
    # and they decode back to different Python types
    assert canonical.decode(b"\xa1a") == "a"
    assert canonical.decode(b"\xc4\x01a") == b"a"


def test_32_byte_str_uses_str8_not_str16() -> None:
    text = "x" * 32
    assert canonical.encode(text) == b"\xd9\x20" + text.encode()


def test_map_keys_are_sorted_by_utf8_bytes_whatever_the_insertion_order() -> None:
    # "Z" (0x5a) < "a" (0x61) < "aa" < "b" < "é" (0xc3 0xa9) < "€" (0xe2 0x82 0xac)
    keys = ["€", "b", "é", "aa", "a", "Z"]
    encoded = canonical.encode({k: 0 for k in keys})
    expected_order = ["Z", "a", "aa", "b", "é", "€"]
    assert encoded == msgpack.packb(
        {k: 0 for k in expected_order}, use_bin_type=True
    )
    assert list(canonical.decode(encoded)) == expected_order


def test_nested_maps_are_sorted_too() -> None:
    encoded = canonical.encode({"outer": [{"b": 1, "a": 2}]})
    assert encoded == b"\x81\xa5outer\x91\x82\xa1a\x02\xa1b\x01"


def test_tuples_encode_as_arrays() -> None:
    assert canonical.encode((1, "a")) == canonical.encode([1, "a"]) == b"\x92\x01\xa1a"


def test_booleans_are_msgpack_booleans_not_ints() -> None:
    assert canonical.encode(True) == b"\xc3"
    assert canonical.encode(False) == b"\xc2"
    assert canonical.decode(b"\xc3") is True


@pytest.mark.parametrize(
    "value",
    [
        None,
        1.0,
        float("nan"),
        {"a": None},
        [1, None],
        {"a": 0.5},
        {1: "int key"},
        {b"k": "bin key"},
        {"a", "set"},
        object(),
    ],
    ids=[
        "nil", "float", "nan", "nil-in-map", "nil-in-array", "float-in-map", "int-key",
        "bin-key", "python-set", "object",
    ],
)
def test_values_the_contract_forbids_cannot_be_encoded(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        canonical.encode(value)
    assert info.value.code == "bad_frame"


def test_lone_surrogate_text_cannot_be_encoded() -> None:
    with pytest.raises(ProtocolError):
        canonical.encode("\ud800")


# --- decoding: non-canonical bytes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\xcc\x01",  # uint8 for 1
        b"\xcd\x00\x01",  # uint16 for 1
        b"\xce\x00\x00\x00\x01",  # uint32 for 1
        b"\xcf\x00\x00\x00\x00\x00\x00\x00\x01",  # uint64 for 1
        b"\xcd\x00\xff",  # uint16 for 255
        b"\xd0\x01",  # int8 for positive 1
        b"\xd0\xff",  # int8 for -1 (fixint is shorter)
        b"\xd1\xff\x80",  # int16 for -128
        b"\xd3" + b"\xff" * 8,  # int64 for -1
    ],
)
def test_non_shortest_integer_is_rejected(data: bytes) -> None:
    _refused(data, "non_canonical")


@pytest.mark.parametrize(
    "data",
    [
        b"\xd9\x01a",  # str8 for a 1-byte string
        b"\xda\x00\x01a",  # str16
        b"\xdb\x00\x00\x00\x01a",  # str32
        b"\xc5\x00\x01a",  # bin16 for 1 byte
        b"\xc6\x00\x00\x00\x01a",  # bin32
        b"\xdc\x00\x01\x01",  # array16 of one element
        b"\xdd\x00\x00\x00\x01\x01",  # array32
        b"\xde\x00\x01\xa1a\x01",  # map16 of one entry
        b"\xdf\x00\x00\x00\x01\xa1a\x01",  # map32
    ],
)
def test_non_shortest_container_or_string_header_is_rejected(data: bytes) -> None:
    _refused(data, "non_canonical")


def test_non_canonical_map_order_is_rejected() -> None:
    assert canonical.decode(b"\x82\xa1a\x01\xa1b\x02") == {"a": 1, "b": 2}
    _refused(b"\x82\xa1b\x02\xa1a\x01", "non_canonical")


def test_map_keys_ordered_by_code_point_but_not_by_utf8_length_are_accepted() -> None:
    # Length-first ordering (as in CBOR's old canonical form) would put "b" before "aa".
    assert list(canonical.decode(b"\x82\xa2aa\x01\xa1b\x02")) == ["aa", "b"]
    _refused(b"\x82\xa1b\x02\xa2aa\x01", "non_canonical")


def test_non_ascii_key_sorted_before_ascii_is_rejected() -> None:
    e_acute = "é".encode()
    good = b"\x82\xa1Z\x01\xa2" + e_acute + b"\x02"
    bad = b"\x82\xa2" + e_acute + b"\x02\xa1Z\x01"
    assert canonical.decode(good) == {"Z": 1, "é": 2}
    _refused(bad, "non_canonical")


@pytest.mark.parametrize(
    "data",
    [
        b"\x82\xa1a\x01\xa1a\x02",  # same key twice, different values
        b"\x82\xa1a\x01\xa1a\x01",  # same key twice, same value
        b"\x91\x82\xa1k\xc2\xa1k\xc3",  # nested
    ],
)
def test_duplicate_map_keys_are_rejected(data: bytes) -> None:
    _refused(data, "non_canonical")


def test_str_where_bin_is_expected_is_a_different_value() -> None:
    # The codec keeps the distinction: a str never decodes to bytes nor the reverse.
    assert canonical.decode(b"\xa3abc") == "abc"
    assert canonical.decode(b"\xc4\x03abc") == b"abc"


def test_bin_map_key_is_rejected() -> None:
    _refused(b"\x81\xc4\x01a\x01", "non_canonical")


def test_int_map_key_is_rejected() -> None:
    _refused(b"\x81\x01\x01", "bad_frame")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc0", "non_canonical"),  # nil
        (b"\x81\xa1a\xc0", "non_canonical"),  # nil as a map value
        (b"\xca\x3f\x80\x00\x00", "non_canonical"),  # float32 1.0
        (b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", "non_canonical"),  # float64 1.0
        (b"\x91\xcb\x00\x00\x00\x00\x00\x00\x00\x00", "non_canonical"),  # float in an array
        (b"\xc7\x00\x05", "non_canonical"),  # ext8 of length 0 reaches the ext hook
        (b"\xd4\x05\x00", "bad_frame"),  # fixext1 exceeds max_ext_len=0
        (b"\xd6\xff\x00\x00\x00\x00", "bad_frame"),  # the msgpack timestamp extension
        (b"\xc1", "bad_frame"),  # the never-used byte
    ],
)
def test_nil_float_and_ext_are_rejected(data: bytes, code: str) -> None:
    _refused(data, code)


@pytest.mark.parametrize(
    "data",
    [b"\x01\x02", b"\xa1a\x00", b"\x80\x80", b"\x90\xc0"],
)
def test_trailing_bytes_are_rejected(data: bytes) -> None:
    _refused(data, "bad_frame")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x92\x01", b"\xa3ab", b"\xc4\x05abc", b"\x81\xa1a", b"\xcd\x01"],
    ids=["empty", "short-array", "short-str", "short-bin", "map-without-value", "short-int"],
)
def test_truncated_input_is_rejected(data: bytes) -> None:
    _refused(data, "bad_frame")


def test_invalid_utf8_in_str_is_rejected() -> None:
    _refused(b"\xa1\xff", "bad_frame")
    _refused(b"\xa2\xc3\x28", "bad_frame")


def test_cesu_encoded_surrogate_in_str_is_rejected() -> None:
    _refused(b"\xa3\xed\xa0\x80", "bad_frame")


# --- size and depth -------------------------------------------------------------------------------


def test_input_over_the_size_limit_is_too_large() -> None:
    data = canonical.encode(b"x" * 100)
    assert canonical.decode(data, max_bytes=len(data)) == b"x" * 100
    _refused(data, "too_large", max_bytes=len(data) - 1)


def test_default_size_limit_is_one_mebibyte() -> None:
    assert canonical.DEFAULT_MAX_BYTES == 1 << 20
    # a bin of 1 MiB plus its 5-byte header is just over the limit
    _refused(canonical.encode(b"\x00" * (1 << 20)), "too_large")


def test_declared_length_beyond_the_input_is_rejected_without_allocation() -> None:
    # bin32 claiming 4 GiB, array32 and map32 claiming 2**32-1 entries
    for data in (b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"):
        _refused(data, "bad_frame", max_bytes=64)


def test_nesting_up_to_the_limit_round_trips() -> None:
    value = _nested_lists(16)
    assert canonical.decode(canonical.encode(value)) == value


def test_nesting_beyond_the_limit_is_refused_on_encode_and_decode() -> None:
    value = _nested_lists(17)
    with pytest.raises(ProtocolError) as info:
        canonical.encode(value)
    assert info.value.code == "bad_frame"
    # hand-built bytes for the same value
    data = b"\x91" * 17 + b"\x01"
    with pytest.raises(ProtocolError) as info:
        canonical.decode(data)
    assert info.value.code in {"bad_frame", "non_canonical"}


def test_maps_count_towards_the_nesting_limit() -> None:
    value: Any = 1
    for _ in range(17):
        value = {"k": value}
    with pytest.raises(ProtocolError):
        canonical.encode(value)
    with pytest.raises(ProtocolError):
        canonical.decode(b"\x81\xa1k" * 17 + b"\x01")


def test_very_deep_input_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError):
        canonical.decode(b"\x91" * 100_000 + b"\x01")
    with pytest.raises(ProtocolError):
        canonical.decode(b"\x81\xa1k" * 50_000 + b"\x01")


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        (1 << 64) - 1,
        "",
        "é€😀",
        b"",
        b"\x00\xff",
        [],
        {},
        True,
        False,
        {"z": [1, {"y": b"\x01", "x": "s"}], "a": {"": 0}},
    ],
)
def test_round_trip_is_identity(value: Any) -> None:
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


# --- sets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], True),
        (["a"], True),
        (["Z", "a", "é"], True),
        (["a", "b", "c"], True),
        (["a", "a"], False),
        (["b", "a"], False),
        (["a", "é", "Z"], False),
        (["é", "€"], True),
        (["€", "é"], False),
        (["aa", "b"], True),
        (["b", "aa"], False),
        (["a", "b", "b"], False),
        (["", "a"], True),
    ],
)
def test_is_sorted_unique(values: list[str], expected: bool) -> None:
    assert canonical.is_sorted_unique(values) is expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], []),
        (["b", "a", "b"], ["a", "b"]),
        (["é", "a", "Z"], ["Z", "a", "é"]),
        (["€", "é", "z"], ["z", "é", "€"]),
        (["b", "aa"], ["aa", "b"]),
    ],
)
def test_canonical_set_sorts_by_utf8_bytes_and_removes_duplicates(
    values: list[str], expected: list[str]
) -> None:
    out = canonical.canonical_set(values)
    assert out == expected
    assert canonical.is_sorted_unique(out)


def test_the_shared_packer_survives_a_failed_pack_and_gives_back_a_large_buffer() -> None:
    kept = canonical._PACKER
    with pytest.raises(ProtocolError):
        canonical.encode_ordered({"a": [1, 2, object()]})  # fails half-way through the map
    assert canonical._PACKER is not kept  # whatever its buffer grew to is given back
    assert canonical.encode({"b": 1, "a": [2]}) == msgpack.packb({"a": [2], "b": 1})
    kept = canonical._PACKER
    canonical.pack(b"x" * 1000)
    assert canonical._PACKER is kept  # small: the packer and its buffer are reused
    big = b"x" * (canonical._KEEP_PACKER_BYTES + 1)
    assert canonical.decode(canonical.pack(big), max_bytes=len(big) + 8) == big
    assert canonical._PACKER is not kept  # its buffer had grown past the limit: replaced
    assert canonical.pack([1, "x", b"y"]) == msgpack.packb([1, "x", b"y"], use_bin_type=True)
