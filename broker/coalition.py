"""Make a throwaway coalition on disk: authority keys, a signed trust root, signed node
certificates and node key files. Used by ``coalition demo``, the tests and the benchmarks.

Layout written under ``base``::

    policy/trust-root.toml(.sig)   policy/nodes/NODE.toml(.sig)
    keys/authority-NATION.key      keys/NODE.key      keys/broker.key
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from clients.identity import KeyFile
from policies import authoring
from policies.bundle import Bundle, build_bundle
from policies.loader import read_policy_dir
from policies.model import TrustRoot

DAY_MS = 24 * 3600 * 1000


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    """A gateway node to certify."""

    node: str
    nation: str
    max_level: str = "SECRET"
    cats: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    not_before_ms: int | None = None
    not_after_ms: int | None = None


@dataclasses.dataclass(frozen=True)
class Coalition:
    """What :func:`build_coalition` wrote, with the keys in memory for convenience."""

    base: Path
    policy_dir: Path
    keys_dir: Path
    broker_name: str
    broker_key: KeyFile
    authorities: Mapping[str, KeyFile]
    nodes: Mapping[str, KeyFile]
    root_sha256: bytes

    def bundle(self) -> Bundle:
        """Load and verify the policy directory as the broker would."""
        return build_bundle(read_policy_dir(self.policy_dir), pinned_root_sha256=self.root_sha256)

    @property
    def trust_root(self) -> TrustRoot:
        return self.bundle().trust_root


def build_coalition(
    base: Path,
    *,
    nations: Sequence[str],
    nodes: Sequence[NodeSpec],
    now_ms: int,
    communities: Mapping[str, Sequence[str]] | None = None,
    threshold: int | None = None,
    broker_name: str = "broker.coalition.example",
    common_scheme: str = "NATO",
) -> Coalition:
    """Generate keys and signed documents for a coalition under ``base``."""
    policy_dir, keys_dir = base / "policy", base / "keys"
    (policy_dir / "nodes").mkdir(parents=True, exist_ok=True)
    keys_dir.mkdir(parents=True, exist_ok=True)
    authorities = {n: KeyFile.generate("authority", n) for n in nations}
    broker_key = KeyFile.generate("broker", broker_name)
    for nation, key in authorities.items():
        key.write(keys_dir / f"authority-{nation}.key")
    broker_key.write(keys_dir / "broker.key")
    needed = threshold if threshold is not None else max(1, (len(nations) // 2) + 1)
    root = authoring.trust_root_toml(
        version=1, common_scheme=common_scheme, threshold=needed,
        witness_quorum=min(2, len(nations)),
        nations={n: [k.sign_public] for n, k in authorities.items()},
        communities=communities or {}, brokers={broker_name: broker_key.sign_public},
    )
    _write_signed(policy_dir / "trust-root.toml", root,
                  [(n, authorities[n].signing_key) for n in sorted(nations)[:needed]])
    node_keys: dict[str, KeyFile] = {}
    for spec in nodes:
        key = node_keys[spec.node] = KeyFile.generate("node", spec.node)
        key.write(keys_dir / f"{spec.node}.key")
        cert = authoring.node_cert_toml(
            node=spec.node, nation=spec.nation, sign_key=key.sign_public, enc_key=key.enc_public,
            not_before_ms=spec.not_before_ms if spec.not_before_ms is not None else now_ms - DAY_MS,
            not_after_ms=(spec.not_after_ms if spec.not_after_ms is not None
                          else now_ms + 365 * DAY_MS),
            max_level=spec.max_level, cats=spec.cats,
        )
        _write_signed(policy_dir / "nodes" / f"{spec.node}.toml", cert,
                      [(spec.nation, authorities[spec.nation].signing_key)])
    return Coalition(
        base=base, policy_dir=policy_dir, keys_dir=keys_dir, broker_name=broker_name,
        broker_key=broker_key, authorities=authorities, nodes=node_keys,
        root_sha256=hashlib.sha256(root).digest(),
    )


def _write_signed(path: Path, data: bytes, signers: Sequence[tuple[str, object]]) -> None:
    path.write_bytes(data)
    path.with_name(path.name + ".sig").write_bytes(
        authoring.signature_file(data, signers)  # type: ignore[arg-type]
    )
