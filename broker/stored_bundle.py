"""The policy bundle a store records as in force: what the broker ran under last time.

Read at start, before anything else is trusted: the hub refuses a bundle that steps back from
it (a rollback across a restart), and the audit log accepts the last checkpoint signed with the
broker key that bundle's trust root listed (the key before a rotation). Fails closed: a store
that cannot produce the bundle it records is damaged, and the broker does not start.
"""

from __future__ import annotations

from collections.abc import Iterator

from broker.errors import BrokerError, StorageError
from broker.store.base import Store
from policies.bundle import Bundle, build_bundle, documents_from_content
from policies.highwater import HighWater


def stored_bundle(store: Store) -> Bundle | None:
    """The bundle in force when the broker last ran (to refuse a rollback across a restart);
    ``None`` on a new store.

    Fails closed: a store that records a bundle as in force but does not hold it, or holds
    content that no longer verifies or is another bundle than the one recorded, raises
    :class:`StorageError`. Without that bundle the broker could not tell a rollback from a
    successor, so it does not start (docs/operations.md, "The stored policy bundle")."""
    digest = store.active_bundle()
    if digest is None:
        return None
    content = store.bundle(digest)
    if content is None:
        raise StorageError(f"the store records policy bundle {digest.hex()} as in force but "
                           "does not hold it: damaged store")
    return _verified(digest, content)


def stored_high_water(store: Store) -> HighWater:
    """The high-water marks of every bundle the store holds, i.e. every bundle ever in force
    here (:mod:`policies.highwater`): those stored with the last activation, or, in a store
    written before they were stored, rebuilt from its bundles (the broker stores them at its
    next activation, which every start makes). Fails closed: marks that do not decode, or (when
    rebuilding) a stored bundle that no longer verifies or is stored under another hash, raise
    :class:`StorageError` (damaged store)."""
    encoded = store.high_water()
    if encoded is None:
        return HighWater.of(_stored_bundles(store))
    try:
        return HighWater.from_bytes(encoded)
    except ValueError as exc:
        raise StorageError(f"the stored policy high-water marks do not decode ({exc}): "
                           "damaged store") from exc


def _stored_bundles(store: Store) -> Iterator[Bundle]:
    for digest in store.bundle_hashes():
        content = store.bundle(digest)
        if content is None:
            continue  # listed and gone meanwhile: nothing deletes bundles, so not reached
        yield _verified(digest, content)


def _verified(digest: bytes, content: bytes) -> Bundle:
    """The bundle stored under ``digest``, verified; :class:`StorageError` (damaged store) if
    it no longer verifies or is another bundle. The last one verified is remembered: a start
    reads the bundle in force twice (its broker keys for the log, then the hub's restore), and
    at 100 nations a verification takes ~0.4 s."""
    if _last is not None and _last[0] == digest and _last[1] == content:
        return _last[2]
    try:
        bundle = build_bundle(documents_from_content(content), pinned_root_sha256=None)
    except BrokerError as exc:
        raise StorageError(f"the stored policy bundle {digest.hex()} does not verify "
                           f"({exc.reason}): damaged store") from exc
    if bundle.hash != digest:
        raise StorageError(f"the store holds policy bundle {bundle.hash.hex()} under "
                           f"{digest.hex()}: damaged store")
    _remember(digest, content, bundle)
    return bundle


_last: tuple[bytes, bytes, Bundle] | None = None


def _remember(digest: bytes, content: bytes, bundle: Bundle) -> None:
    global _last
    _last = digest, content, bundle


def earlier_broker_keys(store: Store, name: str) -> list[bytes]:
    """The key the nations listed for this broker in the bundle in force when it last ran: after
    a rotation of the broker's key (a new trust root), the last checkpoint is signed with it."""
    previous = stored_bundle(store)
    if previous is None:
        return []
    return [b.key for b in previous.trust_root.brokers if b.name == name]
