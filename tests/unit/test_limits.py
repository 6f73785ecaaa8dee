"""Size limits of envelopes and route frames (broker/limits.py), and the limits a configuration
section sets."""

from __future__ import annotations

from typing import Any

import nacl.public
import nacl.signing
import pytest

from broker import canonical, wire
from broker.config import LimitsSection, parse_config
from broker.envelope import Envelope, build_envelope
from broker.errors import ProtocolError
from broker.limits import (
    EnvelopeLimits,
    Limits,
    check_envelope_limits,
    check_route_limits,
    limits_from_section,
)
from clients.gateway import label

NOW = 1_800_000_000_000
SIGN = nacl.signing.SigningKey(b"\x01" * 32)
ENC = [bytes(nacl.public.PrivateKey(bytes([10 + i]) * 32).public_key) for i in range(3)]
LABEL = label("NATO", "SECRET", "GBR", ["USA"])


def envelope(*, topic: str = "maritime.tracks", to: tuple[str, ...] = (), keys: int = 1,
             cats: dict[str, list[str]] | None = None) -> Envelope:
    lab = label("NATO", "SECRET", "GBR", ["USA"], cats=cats) if cats else LABEL
    data = build_envelope(signing_key=SIGN, sender="GBR-GW1", topic=topic, payload=b"x",
                          label=lab, prec=0, ttl=60, now_ms=NOW, to=to,
                          recipient_keys={f"N{i}-GW1": ENC[i] for i in range(keys)})
    return Envelope.from_bytes(data)


def route(*, topic: str = "maritime.tracks", to: tuple[str, ...] | None = None,
          label_map: dict[str, Any] | None = None) -> wire.Route:
    return wire.Route(topic=topic, label=label_map or LABEL.to_map(), to=to)


SMALL = EnvelopeLimits(max_topic_bytes=20, max_label_bytes=200, max_to=2, max_keys=2)
BIG_CATS = {"NTK": [f"PROJECT-{i:03d}" for i in range(30)]}


def test_an_envelope_within_every_limit_passes() -> None:
    check_envelope_limits(envelope(to=("A-GW1", "B-GW1"), keys=2), SMALL)
    check_route_limits(route(to=("A-GW1", "B-GW1")), SMALL)


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"topic": "maritime.tracks.north-atlantic"}, "limits.max_topic_bytes is 20"),
    ({"to": ("A-GW1", "B-GW1", "C-GW1")}, "limits.max_to_entries is 2"),
    ({"keys": 3}, "limits.max_keys_entries is 2"),
    ({"cats": BIG_CATS}, "limits.max_label_bytes is 200"),
])
def test_an_envelope_over_a_limit_is_too_large_and_names_it(kwargs: dict[str, Any],
                                                             names: str) -> None:
    env = envelope(**kwargs)
    with pytest.raises(ProtocolError) as caught:
        check_envelope_limits(env, SMALL)
    assert caught.value.code == "too_large"
    assert names in caught.value.reason
    assert caught.value.ref == env.id


@pytest.mark.parametrize(("kwargs", "names"), [
    ({"topic": "maritime.tracks.north-atlantic"}, "limits.max_topic_bytes is 20"),
    ({"to": ("A-GW1", "B-GW1", "C-GW1")}, "limits.max_to_entries is 2"),
    ({"label_map": label("NATO", "SECRET", "GBR", ["USA"], cats=BIG_CATS).to_map()},
     "limits.max_label_bytes is 200"),
])
def test_a_route_frame_over_a_limit_is_too_large_and_names_it(kwargs: dict[str, Any],
                                                              names: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_route_limits(route(**kwargs), SMALL)
    assert caught.value.code == "too_large" and names in caught.value.reason


def test_a_route_label_that_cannot_be_encoded_is_left_to_the_label_check() -> None:
    check_route_limits(route(label_map={"policy": 1.5}), SMALL)  # invalid_label, later


def test_the_label_limit_counts_canonical_bytes() -> None:
    env = envelope(cats=BIG_CATS)
    size = len(canonical.encode(env.label.to_map()))
    check_envelope_limits(env, EnvelopeLimits(max_label_bytes=size))
    with pytest.raises(ProtocolError):
        check_envelope_limits(env, EnvelopeLimits(max_label_bytes=size - 1))


def test_the_defaults_follow_the_contract() -> None:
    defaults = EnvelopeLimits()
    assert (defaults.max_topic_bytes, defaults.max_label_bytes, defaults.max_to,
            defaults.max_keys) == (255, 4096, 256, 1024)


def test_the_configuration_defaults_are_the_code_defaults() -> None:
    assert limits_from_section(LimitsSection()) == Limits()


def test_every_limits_key_reaches_the_limits(tmp_path: Any) -> None:
    table = {
        "broker": {"name": "b", "data_dir": "d", "key": "k"},
        "policy": {"dir": "p", "trust_root_sha256": "ab" * 32},
        "limits": {"frames_per_second": 7, "frames_burst": 8, "bytes_per_second": 9000,
                   "bytes_burst": 2 << 20, "max_throttle_seconds": 1.5,
                   "idle_timeout_seconds": 30, "request_timeout_seconds": 0.5,
                   "write_stall_timeout_seconds": 2, "max_connections": 11,
                   "max_unauthenticated_per_address": 12, "node_connects_per_minute": 13,
                   "auth_backoff_free_failures": 0, "auth_backoff_initial_seconds": 0.25,
                   "auth_backoff_max_seconds": 60, "auth_backoff_table_size": 14,
                   "max_topic_bytes": 100, "max_label_bytes": 1000, "max_to_entries": 15,
                   "max_keys_entries": 16, "handshake_timeout_seconds": 0.5},
    }
    limits = limits_from_section(parse_config(table, base=tmp_path).limits)
    assert (limits.rate.frames_per_second, limits.rate.frames_burst,
            limits.rate.bytes_per_second, limits.rate.bytes_burst,
            limits.rate.max_throttle_s) == (7, 8, 9000, 2 << 20, 1.5)
    assert (limits.idle_timeout_s, limits.request_timeout_s, limits.write_stall_timeout_s,
            limits.handshake_timeout_s) == (30, 0.5, 2, 0.5)
    conn = limits.connections
    assert (conn.max_connections, conn.max_unauthenticated_per_address,
            conn.node_connects_per_minute, conn.auth_backoff_free_failures,
            conn.auth_backoff_initial_s, conn.auth_backoff_max_s,
            conn.auth_backoff_table_size) == (11, 12, 13, 0, 0.25, 60, 14)
    assert limits.envelope == EnvelopeLimits(max_topic_bytes=100, max_label_bytes=1000,
                                             max_to=15, max_keys=16)


def test_a_node_s_own_rates_replace_the_listener_s_only_where_set(tmp_path: Any) -> None:
    table = {
        "broker": {"name": "b", "data_dir": "d", "key": "k"},
        "policy": {"dir": "p", "trust_root_sha256": "ab" * 32},
        "limits": {"frames_per_second": 7, "max_throttle_seconds": 1.5,
                   "node_rates": {"USA-GW1": {"frames_per_second": 20000,
                                              "frames_burst": 40000},
                                  "GBR-GW1": {"bytes_per_second": 64 << 20}}},
    }
    limits = limits_from_section(parse_config(table, base=tmp_path).limits)
    usa, gbr, fra = (limits.rate_of(n) for n in ("USA-GW1", "GBR-GW1", "FRA-GW1"))
    assert (usa.frames_per_second, usa.frames_burst, usa.bytes_per_second) == (
        20000, 40000, limits.rate.bytes_per_second)
    assert (gbr.frames_per_second, gbr.bytes_per_second) == (7, 64 << 20)
    assert fra is limits.rate
    assert usa.max_throttle_s == gbr.max_throttle_s == 1.5  # the listener's bound
