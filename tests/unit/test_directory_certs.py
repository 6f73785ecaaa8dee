"""What a gateway takes from the broker's directory and whose keys it encrypts to
(clients/certs.py): the broker is not trusted, so certificates must verify against the trust
root and be valid now, two different ones for one node are both refused, and a message is
sealed only to permitted recipients whose verified certificate is in the label's audience."""

from __future__ import annotations

import time

from structlog.testing import capture_logs

from broker.coalition import NodeSpec, coalition_documents
from clients.certs import CertBook, certs_from_directory, recipient_keys
from clients.values import RoutePlan, label

NOW = int(time.time() * 1000)
YEAR = 365 * 24 * 3600 * 1000
MADE = coalition_documents(nations=["FRA", "GBR", "USA"], now_ms=NOW, nodes=[
    NodeSpec("GBR-GW1", "GBR"), NodeSpec("FRA-GW1", "FRA"), NodeSpec("USA-GW1", "USA")])
ROOT = MADE.bundle().trust_root


def _raw(node: str) -> bytes:
    return MADE.documents[f"nodes/{node}.toml"].to_bytes()


def test_only_certificates_that_verify_and_are_valid_now_are_taken() -> None:
    forged = MADE.signed("nodes/GBR-GW1.toml", MADE.documents["nodes/GBR-GW1.toml"].data,
                         ["FRA"]).to_bytes()  # signed by another nation
    with capture_logs() as logs:
        certs = certs_from_directory([_raw("GBR-GW1"), _raw("FRA-GW1"), forged, b"\x93junk"],
                                     ROOT, NOW)
    assert sorted(certs) == ["FRA-GW1", "GBR-GW1"]
    assert [e["event"] for e in logs] == ["directory_cert_rejected"] * 2
    assert certs_from_directory([_raw("GBR-GW1")], ROOT, NOW + 2 * YEAR) == {}  # expired


def test_two_different_certificates_for_one_node_are_both_refused() -> None:
    data = MADE.documents["nodes/GBR-GW1.toml"].data
    other = MADE.signed("nodes/GBR-GW1.toml", data.replace(b'max = "SECRET"',
                                                           b'max = "CONFIDENTIAL"'), ["GBR"])
    with capture_logs() as logs:
        certs = certs_from_directory([_raw("GBR-GW1"), other.to_bytes(), _raw("FRA-GW1")],
                                     ROOT, NOW)
    assert sorted(certs) == ["FRA-GW1"]
    assert [e["node"] for e in logs if e["event"] == "directory_conflicting_certs"] == [
        "GBR-GW1"]
    # The same certificate twice is one certificate.
    assert sorted(certs_from_directory([_raw("GBR-GW1")] * 2, ROOT, NOW)) == ["GBR-GW1"]


def test_keys_only_for_verified_recipients_in_the_labels_audience() -> None:
    book = CertBook()
    book.update(certs_from_directory([_raw(n) for n in ("GBR-GW1", "FRA-GW1", "USA-GW1")],
                                     ROOT, NOW))
    gbr, fra = book.get("GBR-GW1"), book.get("FRA-GW1")
    assert gbr is not None and fra is not None
    plan = RoutePlan(
        recipients={"GBR-GW1": "permit", "FRA-GW1": "permit", "DEU-GW1": "permit"},
        keys={"GBR-GW1": b"\x01" * 32, "FRA-GW1": fra.enc_key, "DEU-GW1": b"\x02" * 32})
    with capture_logs() as logs:
        keys = recipient_keys(plan, label("NATO", "SECRET", "USA", ["GBR"]), book, ROOT, NOW)
    # GBR: the certificate's key, not the broker's; FRA: outside REL GBR, whatever the broker
    # says; DEU: no verified certificate.
    assert keys == {"GBR-GW1": gbr.enc_key}
    assert sorted(e["event"] for e in logs) == [
        "broker_key_mismatch", "broker_permitted_outside_audience",
        "recipient_without_certificate"]
    assert recipient_keys(plan, label("NATO", "SECRET", "USA", ["GBR", "FRA"]), book, ROOT,
                          NOW) == {"GBR-GW1": gbr.enc_key, "FRA-GW1": fra.enc_key}
