"""Revocation lists, certificate serials and the succession rules (pure, no broker)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from broker.cli import main
from broker.coalition import DAY_MS, CoalitionDocuments, NodeSpec, coalition_documents
from broker.errors import PolicyDocumentError, StorageError
from clients import certs as certs_module
from clients.certs import FLOOR_FILE, CertBook, CertFloorFile
from clients.dedup import StateReadFailed, StateWriteFailed
from clients.identity import KeyFile
from policies import authoring
from policies.bundle import Bundle, build_bundle, check_succession
from policies.decide import decide
from policies.documents import SignedDocument, parse_node_cert
from policies.loader import load_bundle
from policies.model import Label, NodeCert, Revocation
from policies.revocations import parse_revocations, verify_revocations

NOW = 1_795_000_000_000
NATIONS = ("FRA", "GBR", "USA")
NODES = [NodeSpec("USA-GW1", "USA"), NodeSpec("USA-GW2", "USA"), NodeSpec("GBR-GW1", "GBR")]
LABEL = Label(policy="NATO", cls="SECRET", cats={}, rel=("GBR", "USA"), orig="USA")


@pytest.fixture(scope="module")
def made() -> CoalitionDocuments:
    return coalition_documents(nations=NATIONS, nodes=NODES, now_ms=NOW)


def with_docs(made: CoalitionDocuments, extra: dict[str, SignedDocument]) -> Bundle:
    return build_bundle({**made.documents, **extra}, pinned_root_sha256=made.root_sha256)


def revocation_doc(made: CoalitionDocuments, node: str, *, nation: str = "USA",
                   signer: str | None = None, name: str | None = None) -> SignedDocument:
    cert = made.bundle().nodes[node]
    entry = Revocation(nation=nation, node=node, sign_key=cert.sign_key, reason="stolen laptop",
                       revoked_at=NOW)
    data = authoring.revocations_toml(nation, [entry])
    return made.signed(name or f"revocations/{nation}.toml", data, [signer or nation])


def rotated_doc(made: CoalitionDocuments, node: str, *, serial: int | None) -> SignedDocument:
    old = made.bundle().nodes[node]
    key = KeyFile.generate("node", node)
    data = authoring.node_cert_toml(node=node, nation=old.nation, sign_key=key.sign_public,
                                    enc_key=key.enc_public, not_before_ms=NOW,
                                    not_after_ms=NOW + DAY_MS, max_level="SECRET", serial=serial)
    return made.signed(f"nodes/{node}.toml", data, [old.nation])


# --- documents ------------------------------------------------------------------------------


def test_revocation_list_round_trips_through_its_toml(made: CoalitionDocuments) -> None:
    doc = revocation_doc(made, "USA-GW2")
    nation, entries = parse_revocations(doc)
    assert nation == "USA" and len(entries) == 1
    assert entries[0].node == "USA-GW2" and entries[0].reason == "stolen laptop"
    assert entries[0].sign_key == made.bundle().nodes["USA-GW2"].sign_key
    assert verify_revocations(doc, made.bundle().trust_root) == ("USA", entries)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.replace(b'nation = "USA"', b'nation = "usa"'), "not a nation code"),
    (lambda d: d.replace(b"[[revoked]]", b"extra = 1\n[[revoked]]"), "unknown field"),
    (lambda d: d.replace(b'reason = "stolen laptop"', b'reason = ""'), "reason"),
    (lambda d: d.replace(b"revoked_at = ", b"note = 1\nrevoked_at = "), "unknown field"),
    (lambda d: d + d[d.index(b"[[revoked]]"):], "listed twice"),
    (lambda d: d.replace(b'sign_key = "ed25519:', b'sign_key = "x25519:'), "sign_key"),
])
def test_malformed_revocation_lists_are_refused(made: CoalitionDocuments, mutate, message) -> None:  # type: ignore[no-untyped-def]
    data = mutate(revocation_doc(made, "USA-GW2").data)
    with pytest.raises(PolicyDocumentError, match=message):
        parse_revocations(SignedDocument("revocations/USA.toml", data, b""))


def test_a_revocation_list_must_be_signed_by_its_nation(made: CoalitionDocuments) -> None:
    doc = revocation_doc(made, "USA-GW2", signer="GBR")
    with pytest.raises(PolicyDocumentError) as refused:
        with_docs(made, {doc.name: doc})
    assert refused.value.code == "unsigned" and "USA" in refused.value.reason


def test_a_revocation_list_is_named_after_its_nation(made: CoalitionDocuments) -> None:
    doc = revocation_doc(made, "USA-GW2", name="revocations/GBR.toml")
    with pytest.raises(PolicyDocumentError, match="does not match the file name"):
        with_docs(made, {doc.name: doc})


def test_a_nation_revokes_only_its_own_nodes(made: CoalitionDocuments) -> None:
    """FRA listing a USA node has no effect, and does not refuse the bundle either: else FRA
    could block a USA node id for good by listing it before USA certifies it."""
    doc = revocation_doc(made, "USA-GW2", nation="FRA")
    bundle = with_docs(made, {doc.name: doc})
    assert bundle.revocation_of(bundle.nodes["USA-GW2"]) is None
    assert "USA-GW2" in [c.node for c in bundle.usable_certs()]


def test_a_node_id_does_not_change_nation(made: CoalitionDocuments) -> None:
    key = KeyFile.generate("node", "USA-GW1")
    data = authoring.node_cert_toml(node="USA-GW1", nation="GBR", sign_key=key.sign_public,
                                    enc_key=key.enc_public, not_before_ms=NOW,
                                    not_after_ms=NOW + DAY_MS, max_level="SECRET", serial=2)
    hijacked = with_docs(made, {"nodes/USA-GW1.toml": made.signed("nodes/USA-GW1.toml", data,
                                                                   ["GBR"])})
    with pytest.raises(PolicyDocumentError, match="does not change nation"):
        check_succession(made.bundle(), hijacked)


def test_re_signing_an_unchanged_certificate_needs_no_new_serial(
    made: CoalitionDocuments,
) -> None:
    path = "nodes/USA-GW1.toml"
    original = made.documents[path]
    resigned = with_docs(made, {path: made.signed(path, original.data, ["USA"])})
    check_succession(made.bundle(), resigned)


def test_a_new_trust_root_needs_the_threshold_of_the_one_in_force(
    made: CoalitionDocuments,
) -> None:
    root = made.bundle().trust_root
    strangers = {n: KeyFile.generate("authority", n) for n in root.nations}
    data = authoring.trust_root_toml(
        version=2, common_scheme=root.common_scheme, threshold=root.threshold,
        witness_quorum=root.witness_quorum,
        nations={n: [k.sign_public] for n, k in strangers.items()},
        brokers={b.name: b.key for b in root.brokers})
    sig = authoring.signature_file(data, [(n, k.signing_key) for n, k in strangers.items()])
    # Every other document must be signed by the new authorities too, for the bundle to load.
    docs = {"trust-root.toml": SignedDocument("trust-root.toml", data, sig)}
    for name, doc in made.documents.items():
        if name != "trust-root.toml":
            signers = [line.split(" ", 1)[0] for line in doc.sig.decode().splitlines() if line]
            docs[name] = SignedDocument(name, doc.data, authoring.signature_file(
                doc.data, [(n, strangers[n].signing_key) for n in signers]))
    import hashlib
    takeover = build_bundle(docs, pinned_root_sha256=hashlib.sha256(data).digest())
    with pytest.raises(PolicyDocumentError, match="not signed by the threshold") as refused:
        check_succession(made.bundle(), takeover)
    assert refused.value.code == "rollback"


def test_serial_defaults_to_one_and_must_be_positive(made: CoalitionDocuments) -> None:
    assert made.bundle().nodes["USA-GW1"].serial == 1
    assert with_docs(made, {"nodes/USA-GW1.toml": rotated_doc(made, "USA-GW1", serial=7)}
                     ).nodes["USA-GW1"].serial == 7
    bad = rotated_doc(made, "USA-GW1", serial=0)
    with pytest.raises(PolicyDocumentError, match="serial"):
        parse_node_cert(bad)


# --- effect on decisions and the directory --------------------------------------------------


def test_a_revoked_certificate_is_inactive_as_sender_and_recipient(
    made: CoalitionDocuments,
) -> None:
    doc = revocation_doc(made, "USA-GW2")
    bundle = with_docs(made, {doc.name: doc})
    usa1, usa2, gbr = (bundle.nodes[n] for n in ("USA-GW1", "USA-GW2", "GBR-GW1"))
    assert bundle.revocation_of(usa2) is not None and bundle.revocation_of(usa1) is None
    assert decide(LABEL, usa1, usa2, "t", NOW, bundle).reasons == ("node_inactive",)
    assert decide(LABEL, usa2, gbr, "t", NOW, bundle).reasons == ("node_inactive",)
    assert decide(LABEL, usa1, gbr, "t", NOW, bundle).permit
    assert [c.node for c in bundle.usable_certs()] == ["GBR-GW1", "USA-GW1"]


def test_a_revocation_names_a_key_so_a_new_certificate_is_not_revoked(
    made: CoalitionDocuments,
) -> None:
    doc = revocation_doc(made, "USA-GW2")
    bundle = with_docs(made, {doc.name: doc,
                              "nodes/USA-GW2.toml": rotated_doc(made, "USA-GW2", serial=2)})
    assert bundle.revocation_of(bundle.nodes["USA-GW2"]) is None


# --- succession -----------------------------------------------------------------------------


def test_succession_accepts_a_higher_serial_and_refuses_a_step_back(
    made: CoalitionDocuments,
) -> None:
    old = made.bundle()
    new = with_docs(made, {"nodes/USA-GW1.toml": rotated_doc(made, "USA-GW1", serial=2)})
    check_succession(old, new)
    with pytest.raises(PolicyDocumentError, match="serial 1 is lower than 2") as refused:
        check_succession(new, old)
    assert refused.value.code == "rollback"
    same_serial = with_docs(made, {"nodes/USA-GW1.toml": rotated_doc(made, "USA-GW1",
                                                                      serial=None)})
    with pytest.raises(PolicyDocumentError, match="must raise its serial"):
        check_succession(old, same_serial)


def test_succession_keeps_revocations_and_agreement_versions(made: CoalitionDocuments) -> None:
    doc = revocation_doc(made, "USA-GW2")
    revoked = with_docs(made, {doc.name: doc})
    check_succession(made.bundle(), revoked)
    with pytest.raises(PolicyDocumentError, match="was dropped"):
        check_succession(revoked, made.bundle())
    agreement = made.bundle().agreements[0]
    newer = dataclasses.replace(agreement, version=agreement.version + 1)
    path = f"agreements/{agreement.id}.toml"
    bumped = with_docs(made, {path: made.signed(path, authoring.agreement_toml(newer),
                                                list(agreement.parties))})
    check_succession(made.bundle(), bumped)
    with pytest.raises(PolicyDocumentError, match="rolled-back agreement"):
        check_succession(bumped, made.bundle())
    narrowed = dataclasses.replace(newer, purpose="narrowed, same version")
    amended = with_docs(made, {path: made.signed(path, authoring.agreement_toml(narrowed),
                                                 list(agreement.parties))})
    with pytest.raises(PolicyDocumentError, match=f"agreement {agreement.id} changed: it must "
                       "raise its version"):
        check_succession(bumped, amended)


def scheme_doc(made: CoalitionDocuments, nation: str, **changes: object) -> SignedDocument:
    scheme = dataclasses.replace(made.bundle().schemes[nation], **changes)  # type: ignore[arg-type]
    path = f"schemes/{nation}.toml"
    return made.signed(path, authoring.scheme_toml(scheme), [nation])


def test_a_scheme_never_goes_back_and_a_changed_one_raises_its_version(
        made: CoalitionDocuments) -> None:
    """An operator holding an older signed copy of a nation's scheme (say, one that still
    mapped a national level to a higher common one) must not be able to bring it back."""
    old = made.bundle()
    gbr = old.schemes["GBR"]
    assert gbr.version == 1  # a document without `version`
    narrower = {level: common for level, common in gbr.level_map.items()
                if level != gbr.levels[-1]}
    same_version = with_docs(made, {"schemes/GBR.toml": scheme_doc(made, "GBR",
                                                                   level_map=narrower)})
    with pytest.raises(PolicyDocumentError, match="scheme GBR changed: it must raise its "
                       "version") as refused:
        check_succession(old, same_version)
    assert refused.value.code == "rollback"
    raised = with_docs(made, {"schemes/GBR.toml": scheme_doc(made, "GBR", level_map=narrower,
                                                             version=2)})
    assert raised.schemes["GBR"].version == 2
    check_succession(old, raised)
    with pytest.raises(PolicyDocumentError, match="scheme GBR: version 1 is lower than 2"):
        check_succession(raised, old)
    check_succession(raised, raised)  # the same document again: no step
    check_succession(old, made.bundle())


def test_the_common_scheme_is_versioned_too(made: CoalitionDocuments) -> None:
    old = made.bundle()
    common = old.schemes["NATO"]
    path = "schemes/NATO.toml"

    def signed(**changes: object) -> Bundle:
        scheme = dataclasses.replace(common, **changes)  # type: ignore[arg-type]
        data = authoring.scheme_toml(scheme) + b"# amended by the threshold\n"
        return with_docs(made, {path: made.signed(path, data, list(NATIONS))})

    with pytest.raises(PolicyDocumentError, match="scheme NATO changed: it must raise"):
        check_succession(old, signed())
    raised = signed(version=3)
    check_succession(old, raised)
    with pytest.raises(PolicyDocumentError, match="scheme NATO: version 1 is lower than 3"):
        check_succession(raised, old)


@pytest.mark.parametrize("version", ["0", "-1", "true", '"2"', "9007199254740992"])
def test_a_scheme_version_must_be_a_positive_integer(made: CoalitionDocuments,
                                                     version: str) -> None:
    data = authoring.scheme_toml(made.bundle().schemes["GBR"]).replace(
        b'scheme = "GBR"', f'scheme = "GBR"\nversion = {version}'.encode())
    doc = made.signed("schemes/GBR.toml", data, ["GBR"])
    with pytest.raises(PolicyDocumentError, match="'version' must be"):
        with_docs(made, {doc.name: doc})


def test_removing_a_node_is_not_a_rollback(made: CoalitionDocuments) -> None:
    fewer = {k: v for k, v in made.documents.items() if k != "nodes/USA-GW2.toml"}
    check_succession(made.bundle(), build_bundle(fewer, pinned_root_sha256=made.root_sha256))


# --- the recipient's certificate book -------------------------------------------------------


def _cert(node: str, serial: int, not_before: int) -> NodeCert:
    key = KeyFile.generate("node", node)
    data = authoring.node_cert_toml(node=node, nation="USA", sign_key=key.sign_public,
                                    enc_key=key.enc_public, not_before_ms=not_before,
                                    not_after_ms=not_before + DAY_MS, max_level="SECRET",
                                    serial=serial)
    return parse_node_cert(SignedDocument(f"nodes/{node}.toml", data, b""))


def test_cert_book_keeps_a_replaced_certificate_only_for_older_envelopes() -> None:
    book = CertBook()
    old, new = _cert("N", 1, NOW - DAY_MS), _cert("N", 2, NOW)
    book.update({"N": old})
    book.update({"N": new})
    assert list(book.for_envelope("N", NOW - 1)) == [new, old]
    assert list(book.for_envelope("N", NOW)) == [new]  # signed after the switch: new key only
    book.update({})  # revoked or removed: nothing of it is trusted any more
    assert list(book.for_envelope("N", NOW - 1)) == []


def test_cert_book_refuses_a_rolled_back_certificate_and_keeps_the_one_it_holds() -> None:
    """A broker serving an older certificate (validly signed, since replaced) gets nowhere."""
    book = CertBook()
    high, low = _cert("N", 3, NOW), _cert("N", 2, NOW + 1)
    assert book.update({"N": high}) == []
    refused = book.update({"N": low})
    assert refused == ["node N: certificate serial 2 is lower than 3 in force "
                       "(a rolled-back certificate)"]
    assert book.get("N") == high
    assert list(book.for_envelope("N", 0)) == [high]


def test_cert_book_refuses_a_changed_certificate_under_the_same_serial() -> None:
    book = CertBook()
    held, other = _cert("N", 2, NOW), _cert("N", 2, NOW)  # another key, same serial
    book.update({"N": held})
    assert book.update({"N": other}) == [
        "node N: a changed certificate must raise its serial (still 2)"]
    assert book.get("N") == held


def test_cert_book_refuses_a_certificate_of_another_nation() -> None:
    book = CertBook()
    usa = _cert("N", 1, NOW - DAY_MS)
    gbr = dataclasses.replace(_cert("N", 2, NOW), nation="GBR")
    book.update({"N": usa})
    assert book.update({"N": gbr}) == [
        "node N: certified by GBR, but by USA in force (a node id does not change nation)"]
    assert list(book.for_envelope("N", NOW - 1)) == [usa]


def test_cert_book_keeps_nothing_of_a_node_left_out_even_after_a_refusal() -> None:
    book = CertBook()
    book.update({"N": _cert("N", 3, NOW)})
    book.update({"N": _cert("N", 2, NOW)})
    book.update({})
    assert book.get("N") is None and list(book.for_envelope("N", 0)) == []


def test_cert_book_floor_outlives_a_removal_and_refuses_a_rollback_on_return() -> None:
    book = CertBook()
    book.update({"N": _cert("N", 3, NOW)})
    book.update({})  # left out of one directory (a broker may omit it)
    assert book.update({"N": _cert("N", 2, NOW)}) != []
    assert book.get("N") is None and book.floor["N"].serial == 3


def test_cert_book_starting_from_a_floor_refuses_what_steps_back_from_it() -> None:
    high = _cert("N", 3, NOW)
    book = CertBook(floor=[high])
    assert book.update({"N": _cert("N", 2, NOW)}) != [] and book.get("N") is None
    higher = _cert("N", 4, NOW)
    assert book.update({"N": higher}) == [] and book.get("N") == higher
    assert book.floor["N"] == higher


def test_cert_floor_file_keeps_the_verified_certificates(made: CoalitionDocuments,
                                                         tmp_path: Path) -> None:
    bundle = made.bundle()
    floor_file = CertFloorFile(tmp_path)
    assert floor_file.load(bundle.trust_root) == []  # no file yet
    floor_file.save(bundle.nodes)
    assert {c.node: c for c in floor_file.load(bundle.trust_root)} == dict(bundle.nodes)


def test_cert_floor_file_drops_a_certificate_that_no_longer_verifies(
        made: CoalitionDocuments, tmp_path: Path) -> None:
    bundle = made.bundle()
    forged = dataclasses.replace(bundle.nodes["USA-GW1"],
                                 signed=bundle.nodes["GBR-GW1"].signed[:-1] + b"x")
    floor_file = CertFloorFile(tmp_path)
    floor_file.save({"USA-GW1": forged, "GBR-GW1": bundle.nodes["GBR-GW1"]})
    with capture_logs() as logs:
        kept = floor_file.load(bundle.trust_root)
    assert [c.node for c in kept] == ["GBR-GW1"]
    assert [e["event"] for e in logs] == ["cert_floor_entry_dropped"]


def test_cert_floor_file_is_written_when_the_signed_bytes_change_and_only_then(
        made: CoalitionDocuments, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = made.bundle()
    floor_file = CertFloorFile(tmp_path)
    writes: list[bytes] = []
    real_write = certs_module.write_atomically
    monkeypatch.setattr(certs_module, "write_atomically",
                        lambda path, data: (writes.append(data), real_write(path, data)))
    floor_file.save_if_changed(bundle.nodes)
    floor_file.save_if_changed(dict(bundle.nodes))
    assert len(writes) == 1  # unchanged: not written again
    # Re-signed, every field the same (equal as certificates): the new signature is kept.
    resigned = dataclasses.replace(bundle.nodes["GBR-GW1"], signed=b"re-signed")
    assert resigned == bundle.nodes["GBR-GW1"]
    floor_file.save_if_changed({**bundle.nodes, "GBR-GW1": resigned})
    assert len(writes) == 2 and b"re-signed" in writes[-1]


def test_a_failed_cert_floor_save_is_tried_again(made: CoalitionDocuments, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = made.bundle()
    floor_file = CertFloorFile(tmp_path)

    def full_disk(path: Path, data: bytes) -> None:
        raise StorageError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(certs_module, "write_atomically", full_disk)
    with pytest.raises(StateWriteFailed, match="No space left"):
        floor_file.save_if_changed(bundle.nodes)
    monkeypatch.undo()
    floor_file.save_if_changed(bundle.nodes)  # the same floor: still owed to the file
    assert {c.node for c in floor_file.load(bundle.trust_root)} == set(bundle.nodes)


@pytest.mark.parametrize("content", [b"\xc1", b"\x91\x01", b"\x80"])
def test_a_damaged_cert_floor_file_is_refused(made: CoalitionDocuments, tmp_path: Path,
                                              content: bytes) -> None:
    (tmp_path / FLOOR_FILE).write_bytes(content)
    with pytest.raises(StateReadFailed, match=r"cert-floor\.msgpack"):
        CertFloorFile(tmp_path).load(made.bundle().trust_root)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_rotates_and_revokes_a_certificate(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from broker.coalition import build_coalition

    c = build_coalition(tmp_path / "c", nations=NATIONS, nodes=NODES, now_ms=NOW)
    original = c.bundle()
    authority = c.keys_dir / "authority-USA.key"
    revocations = c.policy_dir / "revocations/USA.toml"
    assert main(["keys", "revoke", str(c.policy_dir / "nodes/USA-GW2.toml"),
                 "--reason", "decommissioned\nline two", "--out", str(revocations)]) == 0
    assert main(["keys", "sign", str(revocations), "--key", str(authority)]) == 0
    assert main(["keys", "revoke", str(c.policy_dir / "nodes/USA-GW2.toml"),
                 "--reason", "again", "--out", str(revocations)]) == 2
    assert "already revoked" in capsys.readouterr().err
    assert main(["keys", "sign", str(revocations),
                 "--key", str(c.keys_dir / "authority-GBR.key")]) == 2
    new_key = tmp_path / "USA-GW1.new.key"
    cert = c.policy_dir / "nodes/USA-GW1.toml"
    assert main(["keys", "gen", "--kind", "node", "--name", "USA-GW1", "--out",
                 str(new_key)]) == 0
    assert main(["keys", "cert", "--node-key", str(new_key), "--nation", "USA", "--max",
                 "SECRET", "--serial", "2", "--out", str(cert)]) == 0
    assert main(["keys", "sign", str(cert), "--key", str(authority)]) == 0
    bundle = load_bundle(c.policy_dir, pinned_root_sha256=c.root_sha256)
    assert bundle.nodes["USA-GW1"].serial == 2
    assert bundle.nodes["USA-GW1"].sign_key == KeyFile.read(new_key).sign_public
    revoked = bundle.revocation_of(bundle.nodes["USA-GW2"])
    assert revoked is not None and revoked.reason == "decommissioned\nline two"
    check_succession(original, bundle)  # what a running broker checks when reloading


def test_the_auditor_does_not_take_a_revoked_key_as_a_witness(made: CoalitionDocuments) -> None:
    """Revocations are permanent: a stolen, revoked key must not cosign a forked log, even
    under a bundle from before the revocation."""
    from clients.auditor import _node_certs

    doc = revocation_doc(made, "USA-GW2")
    before, after = made.bundle(), with_docs(made, {doc.name: doc})
    witnesses = _node_certs({before.hash: before, after.hash: after})
    assert "USA-GW2" not in witnesses or witnesses["USA-GW2"] == []
    assert witnesses["USA-GW1"] == [before.nodes["USA-GW1"]]
