"""Broker configuration: validated at load, errors name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import AuditSection, load_config, parse_config
from broker.errors import ConfigError

PIN = "ab" * 32
GOOD = {
    "broker": {"name": "broker.example", "data_dir": "data", "key": "keys/broker.key"},
    "listen": {"host": "127.0.0.1", "port": 8470},
    "policy": {"dir": "policy", "trust_root_sha256": PIN},
    "limits": {"max_frame_bytes": 65536},
}


def with_change(section: str, key: str, value: object) -> dict[str, dict[str, object]]:
    table = {name: dict(values) for name, values in GOOD.items()}
    if value is None:
        del table[section][key]
    else:
        table.setdefault(section, {})[key] = value
    return table


def test_valid_config_resolves_paths_against_the_config_directory(tmp_path: Path) -> None:
    config = parse_config(GOOD, base=tmp_path)
    assert config.broker.data_dir == (tmp_path / "data").resolve()
    assert config.policy.dir == (tmp_path / "policy").resolve()
    assert config.policy.trust_root_sha256 == bytes.fromhex(PIN)
    assert config.limits.max_frame_bytes == 65536
    assert config.limits.clock_skew_seconds == 300  # default


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("listen", "port", 70000, "listen.port must be between 0 and 65535"),
        ("listen", "port", "8470", "listen.port must be an integer"),
        ("listen", "port", True, "listen.port must be an integer"),
        ("broker", "name", None, "broker.name is required"),
        ("broker", "name", "", "broker.name must be a non-empty string"),
        ("policy", "trust_root_sha256", "abc", "policy.trust_root_sha256 must be hex"),
        ("policy", "trust_root_sha256", "ab" * 31, "policy.trust_root_sha256 must be a SHA-256"),
        ("limits", "max_frame_bytes", 10, "limits.max_frame_bytes must be between"),
        ("limits", "delivery_window", 0, "limits.delivery_window must be between"),
        ("limits", "frame_limit", 5, "[limits]: unknown key(s): frame_limit"),
        ("limits", "max_queued_bytes_per_node", 1000,
         "limits.max_queued_bytes_per_node must be between"),
        ("limits", "max_store_bytes", -1, "limits.max_store_bytes must be between"),
        ("limits", "expiry_interval_ms", 0, "limits.expiry_interval_ms must be between"),
        ("limits", "frames_per_second", 0, "limits.frames_per_second must be between"),
        ("limits", "frames_per_second", 1.5, "limits.frames_per_second must be an integer"),
        ("limits", "frames_burst", 0, "limits.frames_burst must be between"),
        ("limits", "bytes_per_second", 100, "limits.bytes_per_second must be between"),
        ("limits", "max_throttle_seconds", 0.01, "limits.max_throttle_seconds must be between"),
        ("limits", "max_throttle_seconds", "5", "limits.max_throttle_seconds must be a number"),
        ("limits", "idle_timeout_seconds", True, "limits.idle_timeout_seconds must be a number"),
        ("limits", "idle_timeout_seconds", 0, "limits.idle_timeout_seconds must be between"),
        ("limits", "idle_timeout_seconds", float("nan"),
         "limits.idle_timeout_seconds must be between"),
        ("limits", "handshake_timeout_seconds", 601,
         "limits.handshake_timeout_seconds must be between 0.1 and 600"),
        ("limits", "request_timeout_seconds", 0, "limits.request_timeout_seconds must be between"),
        ("limits", "write_stall_timeout_seconds", -1,
         "limits.write_stall_timeout_seconds must be between"),
        ("limits", "max_connections", 0, "limits.max_connections must be between"),
        ("limits", "max_unauthenticated_per_address", 0,
         "limits.max_unauthenticated_per_address must be between"),
        ("limits", "node_connects_per_minute", 0,
         "limits.node_connects_per_minute must be between"),
        ("limits", "auth_backoff_free_failures", -1,
         "limits.auth_backoff_free_failures must be between"),
        ("limits", "auth_backoff_initial_seconds", 0,
         "limits.auth_backoff_initial_seconds must be between"),
        ("limits", "auth_backoff_table_size", 0, "limits.auth_backoff_table_size must be between"),
        ("limits", "max_topic_bytes", 256, "limits.max_topic_bytes must be between 1 and 255"),
        ("limits", "max_label_bytes", 10, "limits.max_label_bytes must be between"),
        ("limits", "max_to_entries", 1025, "limits.max_to_entries must be between 1 and 1024"),
        ("limits", "max_keys_entries", 0, "limits.max_keys_entries must be between 1 and 1024"),
        ("limits", "bytes_burst", 32768,
         "limits.bytes_burst must be at least limits.max_frame_bytes (65536)"),
        ("limits", "auth_backoff_initial_seconds", 600,
         "limits.auth_backoff_initial_seconds must not exceed limits.auth_backoff_max_seconds"),
        ("broker", "verify_workers", -1, "broker.verify_workers must be between 0 and 64"),
        ("broker", "verify_workers", 65, "broker.verify_workers must be between 0 and 64"),
        ("broker", "verify_workers", 1.5, "broker.verify_workers must be an integer"),
        ("audit", "writer", "thread", "audit.writer must be one of loop, process, got 'thread'"),
        ("audit", "writer", 1, "audit.writer must be a non-empty string"),
        ("limits", "node_rates", {"USA GW": {"frames_per_second": 10}},
         "limits.node_rates.USA GW: 'USA GW' is not a node id"),
        ("limits", "node_rates", {"USA-GW1": {}},
         "limits.node_rates.USA-GW1 must be a table setting at least one of"),
        ("limits", "node_rates", {"USA-GW1": {"idle_timeout_seconds": 5}},
         "limits.node_rates.USA-GW1: unknown key(s): idle_timeout_seconds"),
        ("limits", "node_rates", {"USA-GW1": {"frames_per_second": 0}},
         "limits.node_rates.USA-GW1.frames_per_second must be between 1 and 1000000, got 0"),
        ("limits", "node_rates", {"USA-GW1": {"frames_burst": 1.5}},
         "limits.node_rates.USA-GW1.frames_burst must be an integer"),
        ("limits", "node_rates", {"USA-GW1": {"bytes_burst": 32768}},
         "limits.node_rates.USA-GW1: the bytes burst must be at least limits.max_frame_bytes"),
        ("limits", "node_rates", [{"node": "USA-GW1"}],
         "limits.node_rates must be a table of node ids"),
    ],
)
def test_bad_field_is_named(section: str, key: str, value: object, message: str,
                            tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(section, key, value), base=tmp_path)
    assert message in caught.value.reason


def test_a_served_broker_checks_signatures_in_one_worker_by_default(tmp_path: Path) -> None:
    table = with_change("broker", "verify_workers", 0)
    assert parse_config(table, base=tmp_path).broker.verify_workers == 0
    del table["broker"]["verify_workers"]
    assert parse_config(table, base=tmp_path).broker.verify_workers == 1


@pytest.mark.parametrize("writer", ["process", "loop"])
def test_the_audit_writer_is_chosen_in_the_config(writer: str, tmp_path: Path) -> None:
    assert AuditSection().writer == "loop"
    config = parse_config(with_change("audit", "writer", writer), base=tmp_path)
    assert config.audit.writer == writer


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown section"):
        parse_config({**GOOD, "lisen": {}}, base=tmp_path)


def test_unreadable_and_malformed_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_abuse_limits_have_defaults_and_take_fractional_seconds(tmp_path: Path) -> None:
    config = parse_config(GOOD, base=tmp_path)
    assert (config.limits.idle_timeout_seconds, config.limits.max_connections,
            config.limits.max_to_entries) == (120, 1000, 256)
    table = with_change("limits", "idle_timeout_seconds", 0.5)
    table["limits"]["handshake_timeout_seconds"] = 3  # an integer is a number too
    config = parse_config(table, base=tmp_path)
    assert config.limits.idle_timeout_seconds == 0.5
    assert config.limits.handshake_timeout_seconds == 3.0
    assert isinstance(config.limits.handshake_timeout_seconds, float)


def test_the_commented_abuse_limits_of_broker_toml_are_the_defaults() -> None:
    """deploy/broker.toml shows the abuse limits commented out, at their default values."""
    import re
    import tomllib

    from broker.config import LimitsSection

    text = (Path(__file__).resolve().parents[2] / "deploy" / "broker.toml").read_text()
    block = text.split("[limits]\n")[1].split("\n[")[0]
    shown = tomllib.loads("\n".join(line[2:] for line in block.splitlines()
                                    if re.match(r"# [a-z_]+ = ", line)))
    assert len(shown) >= 19
    assert {key: getattr(LimitsSection(), key) for key in shown} == shown
