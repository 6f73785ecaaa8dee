"""Make a throwaway coalition on disk: authority keys, a signed trust root, the common and
national classification schemes, signed node certificates, signed agreements and node key files.
Used by ``coalition demo``, the tests and the benchmarks.

Layout written under ``base``::

    policy/trust-root.toml(.sig)   policy/schemes/NAME.toml(.sig)
    policy/nodes/NODE.toml(.sig)   policy/agreements/ID.toml(.sig)
    keys/authority-NATION.key      keys/NODE.key      keys/broker.key

Defaults: the common scheme is :func:`default_common_scheme`; a nation without a scheme of its
own gets one identical in shape to the common scheme with an identity equivalence; and one
agreement, ``COALITION-DEFAULT``, puts every nation in one tier up to the top common level.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from clients.identity import KeyFile
from policies import authoring
from policies.bundle import Bundle, build_bundle
from policies.documents import SignedDocument
from policies.loader import read_policy_dir
from policies.model import RESTRICTIVE, Agreement, Scheme, Tag, Tier, TrustRoot

DAY_MS = 24 * 3600 * 1000
DEFAULT_AGREEMENT = "COALITION-DEFAULT"


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


def default_common_scheme(name: str = "NATO") -> Scheme:
    """UNCLASSIFIED < RESTRICTED < CONFIDENTIAL < SECRET < TOP SECRET, and a restrictive NTK."""
    return Scheme(
        name=name,
        levels=("UNCLASSIFIED", "RESTRICTED", "CONFIDENTIAL", "SECRET", "TOP SECRET"),
        tags={"NTK": Tag("NTK", RESTRICTIVE, ("ALPHA", "BRAVO", "CHARLIE"))},
        identity=True,
    )


def identity_scheme(nation: str, common: Scheme) -> Scheme:
    """A national scheme shaped like ``common``, mapping every level, tag and value to itself."""
    return Scheme(
        name=nation, levels=common.levels, tags=common.tags,
        level_map={level: level for level in common.levels},
        tag_map={tag: tag for tag in common.tags},
        value_map={tag: {v: (v,) for v in spec.values} for tag, spec in common.tags.items()},
    )


def default_agreement(nations: Sequence[str], common: Scheme, now_ms: int) -> Agreement:
    """Every nation in one tier, up to the top common level, valid for a year around now."""
    members = tuple(sorted(nations))
    return Agreement(
        id=DEFAULT_AGREEMENT, version=1, purpose="Default sharing among all coalition nations",
        parties=members, not_before=now_ms - DAY_MS, not_after=now_ms + 365 * DAY_MS,
        tiers=(Tier(name="all", members=members, ceiling=common.levels[-1]),),
    )


@dataclasses.dataclass(frozen=True)
class CoalitionDocuments:
    """A coalition's signed documents and keys, in memory (what :func:`build_coalition` writes)."""

    documents: Mapping[str, SignedDocument]
    broker_name: str
    broker_key: KeyFile
    authorities: Mapping[str, KeyFile]
    nodes: Mapping[str, KeyFile]
    root_sha256: bytes

    def bundle(self) -> Bundle:
        """Verify the documents as the broker would."""
        return build_bundle(self.documents, pinned_root_sha256=self.root_sha256)

    def signed(self, path: str, data: bytes, signers: Sequence[str]) -> SignedDocument:
        """``data`` as document ``path``, signed by the authorities of ``signers`` (for tests
        that craft or alter a document)."""
        sig = authoring.signature_file(data, [(n, self.authorities[n].signing_key)
                                              for n in signers])
        return SignedDocument(name=path, data=data, sig=sig)


def coalition_documents(
    *,
    nations: Sequence[str],
    nodes: Sequence[NodeSpec],
    now_ms: int,
    communities: Mapping[str, Sequence[str]] | None = None,
    threshold: int | None = None,
    broker_name: str = "broker.coalition.example",
    common_scheme: str = "NATO",
    common: Scheme | None = None,
    schemes: Mapping[str, Scheme] | None = None,
    agreements: Sequence[Agreement] | None = None,
) -> CoalitionDocuments:
    """Generate keys and signed documents for a coalition, in memory.

    ``common`` replaces the default common scheme (its name then wins over ``common_scheme``);
    ``schemes`` gives national schemes by nation (others get :func:`identity_scheme`);
    ``agreements`` replaces the default agreement (pass ``()`` for none). Each document is
    signed by whom the trust rules require: the threshold for the root and the common scheme,
    the nation for its scheme and its nodes, every party for an agreement.
    """
    common = common if common is not None else default_common_scheme(common_scheme)
    authorities = {n: KeyFile.generate("authority", n) for n in nations}
    broker_key = KeyFile.generate("broker", broker_name)
    needed = threshold if threshold is not None else max(1, (len(nations) // 2) + 1)
    root = authoring.trust_root_toml(
        version=1, common_scheme=common.name, threshold=needed,
        witness_quorum=min(2, len(nations)),
        nations={n: [k.sign_public] for n, k in authorities.items()},
        communities=communities or {}, brokers={broker_name: broker_key.sign_public},
    )
    out = CoalitionDocuments(documents={}, broker_name=broker_name, broker_key=broker_key,
                             authorities=authorities, nodes={},
                             root_sha256=hashlib.sha256(root).digest())
    docs: dict[str, SignedDocument] = {}

    def add(path: str, data: bytes, signers: Sequence[str]) -> None:
        docs[path] = out.signed(path, data, signers)

    threshold_signers = sorted(nations)[:needed]
    add("trust-root.toml", root, threshold_signers)
    add(f"schemes/{common.name}.toml", authoring.scheme_toml(common), threshold_signers)
    for nation in nations:
        scheme = (schemes or {}).get(nation) or identity_scheme(nation, common)
        add(f"schemes/{nation}.toml", authoring.scheme_toml(scheme), [nation])
    chosen = (agreements if agreements is not None
              else [default_agreement(nations, common, now_ms)])
    for agreement in chosen:
        add(f"agreements/{agreement.id}.toml", authoring.agreement_toml(agreement),
            sorted(agreement.parties))
    node_keys: dict[str, KeyFile] = {}
    for spec in nodes:
        key = node_keys[spec.node] = KeyFile.generate("node", spec.node)
        cert = authoring.node_cert_toml(
            node=spec.node, nation=spec.nation, sign_key=key.sign_public, enc_key=key.enc_public,
            not_before_ms=spec.not_before_ms if spec.not_before_ms is not None else now_ms - DAY_MS,
            not_after_ms=(spec.not_after_ms if spec.not_after_ms is not None
                          else now_ms + 365 * DAY_MS),
            max_level=spec.max_level, cats=spec.cats,
        )
        add(f"nodes/{spec.node}.toml", cert, [spec.nation])
    return dataclasses.replace(out, documents=docs, nodes=node_keys)


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
    common: Scheme | None = None,
    schemes: Mapping[str, Scheme] | None = None,
    agreements: Sequence[Agreement] | None = None,
) -> Coalition:
    """Generate keys and signed documents for a coalition and write them under ``base``
    (parameters as for :func:`coalition_documents`)."""
    made = coalition_documents(
        nations=nations, nodes=nodes, now_ms=now_ms, communities=communities,
        threshold=threshold, broker_name=broker_name, common_scheme=common_scheme,
        common=common, schemes=schemes, agreements=agreements,
    )
    policy_dir, keys_dir = base / "policy", base / "keys"
    write_documents(made.documents, policy_dir)
    write_keys(made, keys_dir)
    return Coalition(
        base=base, policy_dir=policy_dir, keys_dir=keys_dir, broker_name=broker_name,
        broker_key=made.broker_key, authorities=made.authorities, nodes=made.nodes,
        root_sha256=made.root_sha256,
    )


def write_documents(documents: Mapping[str, SignedDocument], policy_dir: Path) -> None:
    """Write each document and its ``.sig`` under ``policy_dir`` (the layout the loader reads)."""
    for sub in ("nodes", "schemes", "agreements"):
        (policy_dir / sub).mkdir(parents=True, exist_ok=True)
    for path, doc in sorted(documents.items()):
        target = policy_dir / path
        target.write_bytes(doc.data)
        target.with_name(target.name + ".sig").write_bytes(doc.sig)


def write_keys(made: CoalitionDocuments, keys_dir: Path) -> None:
    """Write the private key files: ``authority-NATION.key``, ``NODE.key`` and ``broker.key``.

    Refuses to overwrite an existing key file (:class:`FileExistsError`).
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    for nation, key in sorted(made.authorities.items()):
        key.write(keys_dir / f"authority-{nation}.key")
    made.broker_key.write(keys_dir / "broker.key")
    for node, key in sorted(made.nodes.items()):
        key.write(keys_dir / f"{node}.key")
