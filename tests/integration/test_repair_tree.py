"""``coalition broker repair-tree`` end to end: a real broker's store, damaged by hand, refused at
start, repaired by the command, started again with proofs that verify against its signed
checkpoint; refusals (a damaged entry, a running broker) change nothing. Loopback only."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.audit import merkle
from broker.audit.commit_policy import CommitPolicy
from broker.audit.leaves import DeliverEntry
from broker.audit.log import LogDamaged
from broker.audit.note import Checkpoint, verify_note
from broker.cli import main
from broker.coalition import Coalition
from broker.server import BrokerServer
from tests.integration.test_cli import write_config
from tests.unit.test_audit_repair import dump

FAST = CommitPolicy(max_batch=256, max_delay_s=0.001, checkpoint_interval_s=0.05)
ZERO = bytes(32)
#: Deliver entries appended after the broker's own policy entry: groups of 16 and one of 256.
APPENDED = 300


def _broker(coalition: Coalition, data_dir: Path) -> BrokerServer:
    return BrokerServer(name=coalition.broker_name, bundle=coalition.bundle(),
                        key=coalition.broker_key, data_dir=data_dir, commit=FAST)


@pytest.fixture
async def config(coalition: Coalition, tmp_path: Path) -> Path:
    """A broker configuration whose store holds a log the broker wrote and signed at stop."""
    path = write_config(tmp_path / "broker.toml", coalition)
    async with _broker(coalition, tmp_path / "data") as server:
        await server.audit.append_all([
            DeliverEntry(ts=1_700_000_000_000 + i, id=i.to_bytes(16, "big"), to="GBR-GW1", seq=i)
            for i in range(APPENDED)])
    return path


def _store(config: Path) -> Path:
    return config.parent / "data" / "broker.sqlite"


def _damage(config: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(_store(config)) as conn:
        for sql, args in statements:
            conn.execute(sql, args)
    conn.close()


def _repair(*args: str, config: Path) -> int:
    return main(["broker", "repair-tree", "--config", str(config), *args])


async def _refused_at_start(coalition: Coalition, config: Path) -> None:
    with pytest.raises(LogDamaged):
        async with _broker(coalition, config.parent / "data"):
            pass


async def _starts_and_proves(coalition: Coalition, config: Path) -> None:
    """The broker starts on the store; its proofs verify against its signed checkpoint."""
    async with _broker(coalition, config.parent / "data") as server:
        audit = server.audit
        assert audit.latest is not None
        size = audit.latest.size  # the repaired log's (the start has appended to it since)
        assert APPENDED < size <= audit.size
        checkpoint = Checkpoint.from_text(verify_note(audit.latest.note, [audit.verifier]).text)
        leaves = [merkle.leaf_hash(e) for e in audit.store.entries(0, size)]
        for index in (0, 5, 17, 255, 256, size - 1):
            merkle.verify_inclusion(index, size, leaves[index],
                                    audit.inclusion_proof(index, size), checkpoint.root)
        for old in (1, 16, 100, 256):
            merkle.verify_consistency(old, size, merkle.root_hash(leaves[:old]),
                                      checkpoint.root, audit.consistency_proof(old, size))


async def test_repair_tree_mends_damaged_leaves_and_nodes_and_the_broker_starts_again(
        coalition: Coalition, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _damage(config, ("UPDATE nodes SET hash = ? WHERE level = 4 AND idx = 3", (ZERO,)),
            ("UPDATE entries SET leaf = ? WHERE idx = 7", (ZERO,)),
            ("DELETE FROM nodes WHERE level = 8", ()),
            ("INSERT INTO nodes VALUES (12, 0, ?)", (ZERO,)))
    await _refused_at_start(coalition, config)
    capsys.readouterr()
    assert _repair(config=config) == 0
    out = capsys.readouterr().out
    assert "leaf hashes: 1 wrong (7)" in out
    assert "1 wrong ((4, 3)), 1 missing ((8, 0)), 1 superfluous ((12, 0))" in out
    assert "repaired:" in out
    await _starts_and_proves(coalition, config)
    assert _repair("--json", config=config) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "clean"


async def test_a_dry_run_reports_and_changes_nothing(
        coalition: Coalition, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _damage(config, ("UPDATE entries SET leaf = ? WHERE idx BETWEEN 20 AND 29", (ZERO,)))
    before = dump(_store(config))
    capsys.readouterr()
    assert _repair("--dry-run", "--json", config=config) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "damaged"
    assert report["wrong_leaves"] == {"count": 10, "first": [20, 21, 22, 23, 24]}
    assert dump(_store(config)) == before
    await _refused_at_start(coalition, config)


async def test_a_damaged_entry_is_refused_with_status_1_and_nothing_changes(
        coalition: Coalition, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An entry's bytes changed: its recomputed leaf hash would make the rest consistent again,
    but the entries no longer hash to the signed root."""
    _damage(config, ("UPDATE entries SET data = x'00' WHERE idx = 40", ()),
            ("UPDATE nodes SET hash = ? WHERE level = 4 AND idx = 0", (ZERO,)))
    before = dump(_store(config))
    capsys.readouterr()
    assert _repair(config=config) == 1
    assert "refused: the stored entries do not hash to the root" in capsys.readouterr().err
    assert _repair("--json", config=config) == 1
    refused = json.loads(capsys.readouterr().out)
    assert (refused["status"], refused["code"]) == ("refused", "log_damaged")
    assert refused["reason"].endswith("nothing was written")
    assert dump(_store(config)) == before
    await _refused_at_start(coalition, config)


async def test_a_running_broker_is_refused_and_a_stale_pid_file_is_not(
        coalition: Coalition, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _damage(config, ("UPDATE nodes SET hash = ? WHERE level = 4 AND idx = 1", (ZERO,)))
    before = dump(_store(config))
    pid_file = config.parent / "data" / "broker.pid"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file.write_text(f"{process.pid}\n")
        capsys.readouterr()
        assert _repair(config=config) == 1
        assert f"broker process {process.pid} runs on" in capsys.readouterr().err
        assert dump(_store(config)) == before
    finally:
        process.kill()
        process.wait(timeout=30)
    # The same file, its process gone (a broker killed before it could remove it).
    assert _repair(config=config) == 0
    assert "repaired" in capsys.readouterr().out
    pid_file.unlink()
    await _starts_and_proves(coalition, config)


_DIES_BEFORE_COMMIT = """
import os, sys
from broker.cli import main
from broker.store import sqlite_repair

real = sqlite_repair.TreeRows.write_nodes

def write_then_die(self, nodes):
    real(self, nodes)
    os._exit(9)  # every row rewritten, the transaction not committed

sqlite_repair.TreeRows.write_nodes = write_then_die
sys.exit(main(sys.argv[1:]))
"""


async def test_a_crash_during_the_rewrite_leaves_the_store_as_it_was(
        coalition: Coalition, config: Path) -> None:
    _damage(config, ("UPDATE entries SET leaf = ? WHERE idx = 3", (ZERO,)),
            ("UPDATE nodes SET hash = ? WHERE level = 4 AND idx = 2", (ZERO,)))
    before = dump(_store(config))
    crashed = subprocess.run(
        [sys.executable, "-c", _DIES_BEFORE_COMMIT, "broker", "repair-tree", "--config",
         str(config)], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert crashed.returncode == 9, crashed.stderr
    assert dump(_store(config)) == before
    await _refused_at_start(coalition, config)
    assert _repair(config=config) == 0
    await _starts_and_proves(coalition, config)
