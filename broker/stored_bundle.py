"""The policy bundle a store records as in force: what the broker ran under last time.

Read at start, before anything else is trusted: the hub refuses a bundle that steps back from
it (a rollback across a restart), and the audit log accepts the last checkpoint signed with the
broker key that bundle's trust root listed (the key before a rotation). Fails closed: a store
that cannot produce the bundle it records is damaged, and the broker does not start.
"""

from __future__ import annotations

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


def stored_high_water(store: Store, in_force: Bundle | None = None) -> HighWater:
    """The high-water marks of every bundle the store holds, i.e. every bundle ever in force
    here (:mod:`policies.highwater`): those stored with the last activation, with every stored
    bundle they do not cover folded in (all of them in a store written before the marks were
    stored, or the bundles a broker of that time activated after a downgrade); the broker
    stores the result at its next activation, which every start makes. Fails closed: marks
    that do not decode, or a bundle to fold in that no longer verifies or is stored under
    another hash, raise :class:`StorageError` (damaged store). ``in_force``, from
    :func:`stored_bundle`, is not verified again."""
    encoded = store.high_water()
    marks = HighWater()
    if encoded is not None:
        try:
            marks = HighWater.from_bytes(encoded)
        except ValueError as exc:
            raise StorageError(f"the stored policy high-water marks do not decode ({exc}): "
                               "damaged store") from exc
    for digest in store.bundle_hashes():
        if digest in marks.bundles:
            continue
        if in_force is not None and digest == in_force.hash:
            marks = marks.merge(in_force)
            continue
        content = store.bundle(digest)
        if content is not None:  # listed and gone meanwhile: nothing deletes bundles
            marks = marks.merge(_verified(digest, content))
    return marks


def _verified(digest: bytes, content: bytes) -> Bundle:
    """The bundle stored under ``digest``, verified; :class:`StorageError` (damaged store) if
    it no longer verifies or is another bundle."""
    try:
        bundle = build_bundle(documents_from_content(content), pinned_root_sha256=None)
    except BrokerError as exc:
        raise StorageError(f"the stored policy bundle {digest.hex()} does not verify "
                           f"({exc.reason}): damaged store") from exc
    if bundle.hash != digest:
        raise StorageError(f"the store holds policy bundle {bundle.hash.hex()} under "
                           f"{digest.hex()}: damaged store")
    return bundle


def earlier_broker_keys(in_force: Bundle | None, name: str) -> list[bytes]:
    """The key the nations listed for this broker in ``in_force``, the bundle in force when it
    last ran (:func:`stored_bundle`): after a rotation of the broker's key (a new trust root),
    the last checkpoint is signed with it."""
    if in_force is None:
        return []
    return [b.key for b in in_force.trust_root.brokers if b.name == name]
