"""``coalition policy check | decide | catalogue`` run in-process against coalitions on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from broker.cli import main
from broker.cli_policy import REASON_EXPLANATIONS, format_ms
from broker.coalition import DAY_MS, Coalition, NodeSpec, build_coalition
from policies.decide import REASON_CODES
from policies.loader import load_bundle
from policies.model import Agreement, Tier

CaptureFixture = pytest.CaptureFixture[str]


def run(capsys: CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = main(["policy", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def doc_line(out: str, name: str) -> str:
    """The line of ``check`` output that reports on document ``name``."""
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(name + " ")]
    return line


def label(cls: str, rel: list[str], orig: str = "USA", **cats: list[str]) -> str:
    return json.dumps({"policy": "NATO", "class": cls, "cats": cats, "rel": rel, "orig": orig})


# --- check ---------------------------------------------------------------------------------


def test_check_lists_every_document_with_its_signers(coalition: Coalition,
                                                     capsys: CaptureFixture) -> None:
    status, out, err = run(capsys, "check", str(coalition.policy_dir), "--pin",
                           coalition.root_sha256.hex())
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == f"policy {coalition.policy_dir}: loads"
    assert f"policy version {coalition.bundle().hash.hex()}" in out
    assert "trust root version 1, common scheme NATO, threshold 2 of 3: FRA, GBR, USA" in out
    assert doc_line(out, "nodes/GBR-GW1.toml").endswith("signed by GBR (needs GBR)")
    assert doc_line(out, "agreements/COALITION-DEFAULT.toml").endswith(
        "signed by FRA, GBR, USA (needs all of FRA, GBR, USA)")
    assert doc_line(out, "trust-root.toml").endswith(
        "signed by FRA, GBR (needs 2 of FRA, GBR, USA)")
    documents = [ln for ln in out.splitlines() if ln.startswith("  ") and ".toml" in ln]
    assert len(documents) == len(coalition.bundle().documents)


def test_check_refuses_a_tampered_byte_naming_the_document(coalition: Coalition,
                                                           capsys: CaptureFixture) -> None:
    path = coalition.policy_dir / "nodes" / "GBR-GW1.toml"
    data = bytearray(path.read_bytes())
    data[data.index(b"Node certificate")] ^= 0x20  # "N" -> "n": still valid TOML
    path.write_bytes(bytes(data))
    status, out, err = run(capsys, "check", str(coalition.policy_dir))
    assert status == 2
    assert out.splitlines()[0].endswith(": REFUSED")
    assert "  unsigned: nodes/GBR-GW1.toml: missing or invalid signature by GBR" in out
    assert err.strip() == "error: unsigned: nodes/GBR-GW1.toml: missing or invalid signature by GBR"
    line = doc_line(out, "nodes/GBR-GW1.toml")
    assert "MISSING GBR" in line and "does not verify: GBR" in line
    assert "MISSING" not in doc_line(out, "nodes/USA-GW1.toml")


def test_check_names_the_party_whose_signature_is_missing(coalition: Coalition,
                                                          capsys: CaptureFixture) -> None:
    sig = coalition.policy_dir / "agreements" / "COALITION-DEFAULT.toml.sig"
    sig.write_text("".join(ln for ln in sig.read_text().splitlines(keepends=True)
                           if not ln.startswith("GBR ")))
    status, out, err = run(capsys, "check", str(coalition.policy_dir))
    assert status == 2
    assert ("unsigned: agreements/COALITION-DEFAULT.toml: missing or invalid signature by GBR"
            in err)
    assert doc_line(out, "agreements/COALITION-DEFAULT.toml").endswith(
        "signed by FRA, USA (needs all of FRA, GBR, USA); MISSING GBR")


def test_check_refuses_a_trust_root_other_than_the_pinned_one(coalition: Coalition,
                                                              capsys: CaptureFixture) -> None:
    status, _out, err = run(capsys, "check", str(coalition.policy_dir), "--pin", "00" * 32)
    assert status == 2
    assert err.startswith("error: unpinned: trust-root.toml: SHA-256 ")


def add_node(policy_dir: Path, keys_dir: Path, node: str, nation: str,
             capsys: CaptureFixture) -> None:
    """What an authority does: a key, a certificate, its signature (through the CLI)."""
    key = keys_dir / f"{node}.key"
    cert = policy_dir / "nodes" / f"{node}.toml"
    assert main(["keys", "gen", "--kind", "node", "--name", node, "--out", str(key)]) == 0
    assert main(["keys", "cert", "--node-key", str(key), "--nation", nation, "--max",
                 "SECRET", "--out", str(cert)]) == 0
    assert main(["policy", "sign", str(cert), "--key",
                 str(keys_dir / f"authority-{nation}.key")]) == 0
    capsys.readouterr()


def test_check_against_the_active_policy_shows_an_added_node(
    coalition: Coalition, tmp_path: Path, capsys: CaptureFixture
) -> None:
    active = tmp_path / "active"
    shutil.copytree(coalition.policy_dir, active)
    add_node(coalition.policy_dir, coalition.keys_dir, "USA-GW9", "USA", capsys)
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active))
    assert status == 0
    changes = out[out.index(f"changes against {active}:"):]
    old = load_bundle(active, pinned_root_sha256=coalition.root_sha256).hash.hex()
    assert f"  policy version {old} -> {coalition.bundle().hash.hex()}" in changes
    assert "  documents added: nodes/USA-GW9.toml" in changes
    assert "  nodes added: USA-GW9" in changes
    assert "removed" not in changes and "changed" not in changes

    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active),
                            "--json")
    report = json.loads(out)
    assert report["changes"]["nodes"] == {"added": ["USA-GW9"], "removed": [], "changed": [],
                                          "details": {}}
    assert report["changes"]["policy"] == {"old": old, "new": coalition.bundle().hash.hex()}


def test_an_amended_agreement_is_refused_until_every_party_signs_then_shows_the_change(
    coalition: Coalition, tmp_path: Path, capsys: CaptureFixture
) -> None:
    active = tmp_path / "active"
    shutil.copytree(coalition.policy_dir, active)
    path = coalition.policy_dir / "agreements" / "COALITION-DEFAULT.toml"
    path.write_bytes(path.read_bytes().replace(b'ceiling = "TOP SECRET"', b'ceiling = "SECRET"')
                     .replace(b"version = 1\n", b"version = 2\n", 1))
    for nation in ("FRA", "USA"):
        assert main(["policy", "sign", str(path), "--key",
                     str(coalition.keys_dir / f"authority-{nation}.key")]) == 0
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active))
    assert status == 2
    assert doc_line(out, "agreements/COALITION-DEFAULT.toml").endswith(
        "MISSING GBR; signature that does not verify: GBR")
    assert "(the new policy does not load; only documents compared)" in out
    assert main(["policy", "sign", str(path), "--key",
                 str(coalition.keys_dir / "authority-GBR.key")]) == 0
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active))
    assert status == 0
    assert "  tiers changed: COALITION-DEFAULT/all\n" in out
    assert "    COALITION-DEFAULT/all: ceiling TOP SECRET -> SECRET\n" in out
    assert "  agreements changed: COALITION-DEFAULT\n" in out
    assert "    COALITION-DEFAULT: version 1 -> 2\n" in out


def amend(coalition: Coalition, capsys: CaptureFixture, document: str, data: bytes,
          signers: tuple[str, ...]) -> None:
    """Write ``data`` as ``document`` of the policy directory, signed by ``signers``."""
    path = coalition.policy_dir / document
    path.write_bytes(data)
    for nation in signers:
        assert main(["policy", "sign", str(path), "--key",
                     str(coalition.keys_dir / f"authority-{nation}.key")]) == 0
    capsys.readouterr()


def test_an_agreement_amended_at_the_same_version_does_not_follow(
    coalition: Coalition, tmp_path: Path, capsys: CaptureFixture
) -> None:
    """Every party signed, but `COALITION-DEFAULT@1` would then name two texts in decisions."""
    active = tmp_path / "active"
    shutil.copytree(coalition.policy_dir, active)
    document = "agreements/COALITION-DEFAULT.toml"
    amend(coalition, capsys, document, (coalition.policy_dir / document).read_bytes().replace(
        b'ceiling = "TOP SECRET"', b'ceiling = "SECRET"'), ("FRA", "GBR", "USA"))
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active))
    assert status == 2
    assert "agreement COALITION-DEFAULT changed: it must raise its version (still 1)" in out


def test_a_scheme_changed_without_a_new_version_does_not_follow_the_active_policy(
    coalition: Coalition, tmp_path: Path, capsys: CaptureFixture
) -> None:
    active = tmp_path / "active"
    shutil.copytree(coalition.policy_dir, active)
    original = (coalition.policy_dir / "schemes/GBR.toml").read_bytes()
    amend(coalition, capsys, "schemes/GBR.toml", original + b"# amended by GBR\n", ("GBR",))
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active))
    assert status == 2
    assert (f"policy {coalition.policy_dir}: loads, but REFUSED as a successor of {active}\n"
            in out)
    assert "  rollback: " in out and "scheme GBR changed: it must raise its version" in out
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active),
                            "--json")
    assert status == 2 and json.loads(out)["follows"] is False

    amend(coalition, capsys, "schemes/GBR.toml",
          original.replace(b'scheme = "GBR"\n', b'scheme = "GBR"\nversion = 2\n', 1)
          + b"# amended by GBR\n", ("GBR",))
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against", str(active),
                            "--json")
    assert status == 0 and json.loads(out)["follows"] is True


def test_check_against_itself_changes_nothing(coalition: Coalition,
                                              capsys: CaptureFixture) -> None:
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--against",
                            str(coalition.policy_dir))
    assert status == 0
    assert out.rstrip().endswith("  no document changes")


def test_check_json_reports_the_refusal(coalition: Coalition, capsys: CaptureFixture) -> None:
    sig = coalition.policy_dir / "nodes" / "FRA-GW1.toml.sig"
    sig.write_text("")
    status, out, _err = run(capsys, "check", str(coalition.policy_dir), "--json")
    report = json.loads(out)
    assert status == 2 and report["loads"] is False
    assert report["error"] == {"code": "unsigned", "document": "nodes/FRA-GW1.toml",
                               "reason": "nodes/FRA-GW1.toml: missing or invalid signature by FRA"}
    (fra,) = [d for d in report["documents"] if d["name"] == "nodes/FRA-GW1.toml"]
    assert (fra["signed_by"], fra["missing"], fra["requirement"], fra["problem"]) == (
        [], ["FRA"], {"signers": ["FRA"], "count": 1}, None)


# --- decide --------------------------------------------------------------------------------


def test_decide_permit_names_the_agreement_and_tier(coalition: Coalition,
                                                    capsys: CaptureFixture) -> None:
    status, out, err = run(capsys, "decide", "--policy", str(coalition.policy_dir),
                           "--from", "USA-GW1", "--to", "GBR-GW1", "--topic", "ops.tracks",
                           "--label", label("SECRET", ["FVEY"]))
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == "PERMIT via COALITION-DEFAULT@1/all"
    assert "USA-GW1 (USA) -> GBR-GW1 (GBR) on ops.tracks" in out


def test_decide_deny_lists_every_reason_with_its_explanation(
    coalition: Coalition, tmp_path: Path, capsys: CaptureFixture
) -> None:
    label_file = tmp_path / "label.json"
    label_file.write_text(label("TOP SECRET", ["GBR"]))
    status, out, _err = run(capsys, "decide", "--policy", str(coalition.policy_dir),
                            "--from", "USA-GW1", "--to", "FRA-OLD", "--topic", "ops.tracks",
                            "--label", f"@{label_file}")
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == "DENY"
    expected = ("node_inactive", "not_in_audience", "recipient_not_accredited")
    reasons = [ln.split()[0] for ln in lines[1:1 + len(expected)]]
    assert tuple(reasons) == expected
    for code in expected:
        assert REASON_EXPLANATIONS[code] in out


def test_decide_json_and_the_time_it_is_asked_about(coalition: Coalition,
                                                    capsys: CaptureFixture) -> None:
    cert = coalition.bundle().nodes["GBR-GW1"]
    argv = ["decide", "--policy", str(coalition.policy_dir), "--from", "USA-GW1", "--to",
            "GBR-GW1", "--topic", "t.x", "--label", label("SECRET", ["GBR"]), "--json"]
    status, out, _err = run(capsys, *argv, "--at-ms", str(cert.not_after))
    report = json.loads(out)
    assert status == 1 and report["decision"] == "deny" and "via" not in report
    # The default agreement and the certificate end together.
    assert report["reasons"] == [{"code": code, "explanation": REASON_EXPLANATIONS[code]}
                                 for code in ("agreement_inactive", "node_inactive")]
    status, out, _err = run(capsys, *argv, "--at", format_ms(cert.not_after - DAY_MS))
    report = json.loads(out)
    assert (status, report["decision"], report["via"]) == (0, "permit", "COALITION-DEFAULT@1/all")
    assert report["at_ms"] == cert.not_after - DAY_MS


@pytest.mark.parametrize(("argv", "message"), [
    (["--from", "USA-GW7", "--to", "GBR-GW1"], "--from USA-GW7: no certificate"),
    (["--from", "USA-GW1", "--to", "GBR-GW1", "--at", "2027-01-01T00:00:00"],
     "needs a UTC offset"),
])
def test_decide_refuses_unknown_nodes_and_local_times(
    coalition: Coalition, capsys: CaptureFixture, argv: list[str], message: str
) -> None:
    status, _out, err = run(capsys, "decide", "--policy", str(coalition.policy_dir), "--topic",
                            "t.x", "--label", label("SECRET", ["GBR"]), *argv)
    assert status == 2 and message in err


def test_decide_refuses_a_malformed_label(coalition: Coalition, capsys: CaptureFixture) -> None:
    status, _out, err = run(capsys, "decide", "--policy", str(coalition.policy_dir), "--from",
                            "USA-GW1", "--to", "GBR-GW1", "--topic", "t.x",
                            "--label", label("SECRET", ["USA", "GBR"]))
    assert status == 2
    assert err.strip() == "error: invalid_label: label.rel must be sorted and unique"


def test_every_reason_code_has_one_explanation() -> None:
    assert set(REASON_EXPLANATIONS) == set(REASON_CODES)
    assert all(text and "\n" not in text for text in REASON_EXPLANATIONS.values())


# --- catalogue -----------------------------------------------------------------------------


@pytest.fixture
def tiered(tmp_path: Path, coalition: Coalition) -> Coalition:
    """USA, GBR, FRA: an inner tier up to SECRET on maritime topics, a partner tier (FRA) up
    to RESTRICTED without need-to-know values, and an expired agreement."""
    now = coalition.bundle().nodes["USA-GW1"].not_before + DAY_MS
    shield = Agreement(
        id="SHIELD", version=2, purpose="maritime", parties=("FRA", "GBR", "USA"),
        not_before=now - DAY_MS, not_after=now + 30 * DAY_MS,
        tiers=(Tier("core", ("GBR", "USA"), "SECRET", topics=("maritime.>",)),
               Tier("partners", ("FRA",), "RESTRICTED", categories={"NTK": ()})))
    old = Agreement(id="OLD", version=1, purpose="expired", parties=("FRA", "USA"),
                    not_before=now - 9 * DAY_MS, not_after=now - DAY_MS,
                    tiers=(Tier("all", ("FRA", "USA"), "TOP SECRET"),))
    nodes = [NodeSpec("USA-GW1", "USA"), NodeSpec("GBR-GW1", "GBR"), NodeSpec("FRA-GW1", "FRA")]
    return build_coalition(tmp_path / "tiered", nations=("FRA", "GBR", "USA"), nodes=nodes,
                           now_ms=now, agreements=[shield, old])


def test_catalogue_lists_tiers_and_the_best(tiered: Coalition, capsys: CaptureFixture) -> None:
    status, out, _err = run(capsys, "catalogue", "--policy", str(tiered.policy_dir),
                            "--from", "USA", "--to", "FRA")
    assert status == 0
    assert "SHIELD@2/partners  (any topic; until " in out
    assert "not active now: OLD@1" in out
    best = out[out.index("best on any topic:"):].splitlines()
    assert best[1].split() == ["NATO", "up", "to", "RESTRICTED;", "NTK:", "none"]
    assert best[2].split() == ["USA", "up", "to", "RESTRICTED;", "NTK:", "none"]


def test_catalogue_json_on_a_topic(tiered: Coalition, capsys: CaptureFixture) -> None:
    argv = ["catalogue", "--policy", str(tiered.policy_dir), "--from", "USA", "--to", "GBR",
            "--json"]
    _status, out, _err = run(capsys, *argv, "--topic", "maritime.tracks")
    report: dict[str, Any] = json.loads(out)
    assert [e["via"] for e in report["entries"]] == ["SHIELD@2/core"]
    assert report["best"]["level"] == "SECRET"
    assert report["best"]["categories"] == {"NTK": ["ALPHA", "BRAVO", "CHARLIE"]}
    _status, out, _err = run(capsys, *argv, "--topic", "air.tracks")
    assert "best" not in json.loads(out) and json.loads(out)["entries"] == []


def test_catalogue_refuses_an_unknown_nation(tiered: Coalition, capsys: CaptureFixture) -> None:
    status, _out, err = run(capsys, "catalogue", "--policy", str(tiered.policy_dir),
                            "--from", "USA", "--to", "XYZ")
    assert status == 2 and "--to XYZ: not a nation of the trust root" in err
