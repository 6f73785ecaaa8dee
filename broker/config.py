"""Broker configuration: a TOML file, validated at load with errors naming the bad field.

Unknown sections and keys are refused (a typo must not silently fall back to a default).
Relative paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from broker.envelope import MAX_RECIPIENTS
from broker.errors import ConfigError
from broker.router import MAX_TOPIC_BYTES
from policies.documents import NODE_RE


@dataclasses.dataclass(frozen=True)
class BrokerSection:
    name: str
    data_dir: Path
    key: Path
    #: Worker processes that check envelope signatures beside the event loop (0: on the loop;
    #: broker.verifier, docs/decisions.md "Signatures checked in worker processes").
    verify_workers: int = 1


@dataclasses.dataclass(frozen=True)
class ListenSection:
    host: str = "127.0.0.1"
    port: int = 8470


@dataclasses.dataclass(frozen=True)
class PolicySection:
    dir: Path
    trust_root_sha256: bytes


@dataclasses.dataclass(frozen=True)
class NodeRate:
    """``[limits.node_rates.<node>]``: one node's own per-connection rates (a busy gateway's),
    in force once it has authenticated; a key left out keeps the ``[limits]`` value."""

    node: str
    frames_per_second: int | None = None
    frames_burst: int | None = None
    bytes_per_second: int | None = None
    bytes_burst: int | None = None


#: The ``[limits]`` keys a node's own rates may set.
NODE_RATE_KEYS = ("frames_per_second", "frames_burst", "bytes_per_second", "bytes_burst")


@dataclasses.dataclass(frozen=True)
class LimitsSection:
    """``[limits]``: see ``docs/protocol.md`` (Limits) and :class:`broker.limits.Limits`."""

    max_frame_bytes: int = 1 << 20
    clock_skew_seconds: int = 300
    delivery_window: int = 64
    handshake_timeout_seconds: float = 10
    max_outbound_frames: int = 1024
    max_subscriptions_per_node: int = 1024
    max_queued_bytes_per_node: int = 256 << 20
    queue_memory_bytes_per_node: int = 1 << 20
    max_store_bytes: int = 64 << 30
    min_free_disk_bytes: int = 64 << 20
    expiry_interval_ms: int = 1000
    # Abuse limits (docs/operations.md, "Abuse limits").
    frames_per_second: int = 2000
    frames_burst: int = 4000
    bytes_per_second: int = 16 << 20
    bytes_burst: int = 32 << 20
    max_throttle_seconds: float = 10
    node_rates: tuple[NodeRate, ...] = ()
    idle_timeout_seconds: float = 120
    request_timeout_seconds: float = 10
    write_stall_timeout_seconds: float = 30
    max_connections: int = 1000
    max_unauthenticated_per_address: int = 32
    node_connects_per_minute: int = 30
    auth_backoff_free_failures: int = 3
    auth_backoff_initial_seconds: float = 1
    auth_backoff_max_seconds: float = 300
    auth_backoff_table_size: int = 10_000
    max_topic_bytes: int = MAX_TOPIC_BYTES
    max_label_bytes: int = 4096
    max_to_entries: int = 256
    max_keys_entries: int = MAX_RECIPIENTS


@dataclasses.dataclass(frozen=True)
class AuditSection:
    max_batch: int = 1024
    max_delay_ms: int = 2
    checkpoint_interval_ms: int = 1000
    #: Who commits: ``loop``, the broker's own process (small batches on the event loop, large
    #: ones in a thread), or ``process``, a child process that owns the store's write
    #: connection (the event loop goes on during a commit; broker.store.writer_process).
    #: docs/decisions.md, "Commits in a writer process", has the measured trade-off.
    writer: str = "loop"


@dataclasses.dataclass(frozen=True)
class TlsSection:
    """TLS on the node listener (absent: plain WebSocket, for loopback trials only)."""

    cert: Path | None = None
    key: Path | None = None
    #: Require client certificates signed by this CA (mutual TLS) when set.
    client_ca: Path | None = None


ROLES = ("viewer", "auditor", "operator")


@dataclasses.dataclass(frozen=True)
class AdminToken:
    """One bearer token of the admin API: who, which role, and the SHA-256 of the token."""

    name: str
    role: str
    sha256: bytes


@dataclasses.dataclass(frozen=True)
class AdminSection:
    """The operator's HTTP API, on its own listener (``port = -1`` turns it off)."""

    host: str = "127.0.0.1"
    port: int = 8471
    tokens: tuple[AdminToken, ...] = ()


@dataclasses.dataclass(frozen=True)
class Config:
    broker: BrokerSection
    listen: ListenSection
    policy: PolicySection
    limits: LimitsSection
    audit: AuditSection = AuditSection()
    tls: TlsSection = TlsSection()
    admin: AdminSection = AdminSection()


_SECTIONS: dict[str, type] = {
    "broker": BrokerSection, "listen": ListenSection, "policy": PolicySection,
    "limits": LimitsSection, "audit": AuditSection, "tls": TlsSection, "admin": AdminSection,
}
_RANGES: dict[str, tuple[float, float]] = {
    "broker.verify_workers": (0, 64),
    "listen.port": (0, 65535),
    "admin.port": (-1, 65535),
    "limits.max_frame_bytes": (1024, 64 << 20),
    "limits.clock_skew_seconds": (1, 24 * 3600),
    "limits.delivery_window": (1, 100_000),
    "limits.handshake_timeout_seconds": (0.1, 600),
    "limits.max_outbound_frames": (16, 1_000_000),
    "limits.max_subscriptions_per_node": (1, 100_000),
    "limits.max_queued_bytes_per_node": (1 << 20, 1 << 50),
    "limits.queue_memory_bytes_per_node": (0, 1 << 40),
    "limits.max_store_bytes": (0, 1 << 60),
    "limits.min_free_disk_bytes": (0, 1 << 50),
    "limits.expiry_interval_ms": (10, 3600 * 1000),
    "limits.frames_per_second": (1, 1_000_000),
    "limits.frames_burst": (1, 10_000_000),
    "limits.bytes_per_second": (1024, 1 << 40),
    "limits.bytes_burst": (1024, 1 << 40),
    "limits.max_throttle_seconds": (0.1, 3600),
    "limits.idle_timeout_seconds": (0.1, 7 * 24 * 3600),
    "limits.request_timeout_seconds": (0.1, 3600),
    "limits.write_stall_timeout_seconds": (0.1, 3600),
    "limits.max_connections": (1, 1_000_000),
    "limits.max_unauthenticated_per_address": (1, 1_000_000),
    "limits.node_connects_per_minute": (1, 100_000),
    "limits.auth_backoff_free_failures": (0, 1000),
    "limits.auth_backoff_initial_seconds": (0.01, 3600),
    "limits.auth_backoff_max_seconds": (0.01, 7 * 24 * 3600),
    "limits.auth_backoff_table_size": (1, 10_000_000),
    "limits.max_topic_bytes": (1, MAX_TOPIC_BYTES),
    "limits.max_label_bytes": (64, 1 << 20),
    "limits.max_to_entries": (1, MAX_RECIPIENTS),
    "limits.max_keys_entries": (1, MAX_RECIPIENTS),
    "audit.max_batch": (1, 100_000),
    "audit.max_delay_ms": (0, 1000),
    "audit.checkpoint_interval_ms": (10, 24 * 3600 * 1000),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "audit.writer": ("loop", "process"),
}


def load_config(path: Path) -> Config:
    """Read and validate a configuration file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(table, base=path.parent)


def parse_config(table: dict[str, Any], *, base: Path) -> Config:
    """Validate a parsed TOML table; ``base`` resolves relative paths."""
    unknown = set(table) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    sections = {name: _section(name, cls, table.get(name, {}), base)
                for name, cls in _SECTIONS.items()}
    tls = sections["tls"]
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("tls.cert and tls.key go together")
    if tls.client_ca is not None and tls.cert is None:
        raise ConfigError("tls.client_ca (mutual TLS) needs tls.cert and tls.key")
    _check_limits(sections["limits"])
    return Config(**sections)


def _check_limits(limits: LimitsSection) -> None:
    """Limits that only make sense together."""
    if limits.bytes_burst < limits.max_frame_bytes:
        raise ConfigError("limits.bytes_burst must be at least limits.max_frame_bytes "
                          f"({limits.max_frame_bytes}): a largest frame must fit in a burst")
    for rate in limits.node_rates:
        if (rate.bytes_burst or limits.bytes_burst) < limits.max_frame_bytes:
            raise ConfigError(f"limits.node_rates.{rate.node}: the bytes burst must be at least "
                              f"limits.max_frame_bytes ({limits.max_frame_bytes})")
    if limits.auth_backoff_initial_seconds > limits.auth_backoff_max_seconds:
        raise ConfigError("limits.auth_backoff_initial_seconds must not exceed "
                          "limits.auth_backoff_max_seconds")


def _section(name: str, cls: type, raw: Any, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, spec in fields.items():
        where = f"{name}.{key}"
        has_default = spec.default is not dataclasses.MISSING
        if key not in raw:
            if not has_default:
                raise ConfigError(f"{where} is required")
            continue
        values[key] = _value(where, spec.type, raw[key], base)
    return cls(**values)


def _value(where: str, kind: Any, value: Any, base: Path, *, bounds: str | None = None) -> Any:
    """``value`` checked as a ``kind``; a number within the range of ``bounds`` (a key of
    ``_RANGES``; default: ``where``)."""
    if kind == "tuple[AdminToken, ...]":
        return _tokens(where, value)
    if kind == "tuple[NodeRate, ...]":
        return _node_rates(where, value, base)
    if kind == "Path | None":
        kind = "Path"
    if kind in ("int", int, "float", float):
        number = kind in ("float", float)
        if isinstance(value, bool) or not isinstance(value, (int, float) if number else int):
            raise ConfigError(f"{where} must be {'a number' if number else 'an integer'}")
        low, high = _RANGES.get(bounds or where, (0, 1 << 62))
        if not low <= value <= high:  # also false for NaN
            raise ConfigError(f"{where} must be between {_show(low)} and {_show(high)}, "
                              f"got {value}")
        return float(value) if number else value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string")
    if kind in ("Path", Path):
        return (base / value).resolve()
    if kind in ("bytes", bytes):
        try:
            raw = bytes.fromhex(value)
        except ValueError as exc:
            raise ConfigError(f"{where} must be hex") from exc
        if len(raw) != 32:
            raise ConfigError(f"{where} must be a SHA-256 (64 hex digits)")
        return raw
    choices = _CHOICES.get(where)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _node_rates(where: str, value: Any, base: Path) -> tuple[NodeRate, ...]:
    """``[limits.node_rates.<node>]`` tables: the rate keys of ``[limits]``, in their ranges."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table of node ids ([{where}.<node>])")
    rates = []
    for node, raw in sorted(value.items()):
        here = f"{where}.{node}"
        if not NODE_RE.match(node):
            raise ConfigError(f"{here}: {node!r} is not a node id")
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{here} must be a table setting at least one of "
                              f"{', '.join(NODE_RATE_KEYS)}")
        unknown = set(raw) - set(NODE_RATE_KEYS)
        if unknown:
            raise ConfigError(f"{here}: unknown key(s): {', '.join(sorted(unknown))} (a node's "
                              f"own rates are {', '.join(NODE_RATE_KEYS)})")
        rates.append(NodeRate(node, **{key: _value(f"{here}.{key}", "int", raw[key], base,
                                                   bounds=f"limits.{key}") for key in raw}))
    return tuple(rates)


def _tokens(where: str, value: Any) -> tuple[AdminToken, ...]:
    """``[[admin.tokens]]`` entries: ``name``, ``role``, ``sha256`` (hex of the token's SHA-256;
    the token itself never appears in the configuration)."""
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be an array of tables ([[admin.tokens]])")
    tokens = []
    for i, raw in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{here} must be a table")
        unknown = set(raw) - {"name", "role", "sha256"}
        if unknown:
            raise ConfigError(f"{here}: unknown key(s): {', '.join(sorted(unknown))}")
        for key in ("name", "role", "sha256"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ConfigError(f"{here}.{key} is required (a non-empty string)")
        if raw["role"] not in ROLES:
            raise ConfigError(f"{here}.role must be one of {', '.join(ROLES)}")
        try:
            digest = bytes.fromhex(raw["sha256"])
        except ValueError as exc:
            raise ConfigError(f"{here}.sha256 must be hex") from exc
        if len(digest) != 32:
            raise ConfigError(f"{here}.sha256 must be a SHA-256 (64 hex digits)")
        tokens.append(AdminToken(raw["name"], raw["role"], digest))
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: token names must be unique")
    if len({t.sha256 for t in tokens}) != len(tokens):
        raise ConfigError(f"{where}: two tokens have the same hash")
    return tuple(tokens)
