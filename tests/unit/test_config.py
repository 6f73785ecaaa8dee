"""Broker configuration: validated at load, errors name the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_config, parse_config
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
        table[section][key] = value
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
    ],
)
def test_bad_field_is_named(section: str, key: str, value: object, message: str,
                            tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(section, key, value), base=tmp_path)
    assert message in caught.value.reason


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
