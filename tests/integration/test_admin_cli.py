"""`coalition broker serve` starts the admin listener from its configuration, and the operator
CLI (`coalition admin …`, `coalition broker backup`) drives it end to end."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from broker.admin.auth import hash_token, new_token
from broker.coalition import Coalition
from tests.integration.process import BrokerProcess, running_broker, write_broker_config


async def _admin_url(broker: BrokerProcess) -> str:
    async with asyncio.timeout(10):
        while True:
            for event in broker.events:
                if event.get("event") == "admin_ready":
                    return str(event["url"])
            await asyncio.sleep(0.02)


async def _cli(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COALITION_ADMIN_TOKEN"}
    if token is not None:
        env["COALITION_ADMIN_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_operator_cli_against_a_served_broker(coalition: Coalition, tmp_path: Path) -> None:
    operator, viewer = new_token(), new_token()
    tokens = "".join(f'[[admin.tokens]]\nname = "{name}"\nrole = "{role}"\n'
                     f'sha256 = "{hash_token(token).hex()}"\n'
                     for name, role, token in (("alice", "operator", operator),
                                               ("victor", "viewer", viewer)))
    config = write_broker_config(tmp_path, coalition, admin=tokens)
    async with running_broker(config) as broker:
        url = await _admin_url(broker)
        code, out, _ = await _cli("admin", "status", "--url", url, token=viewer)
        assert code == 0 and "ready" in out and coalition.broker_name in out
        code, _, err = await _cli("admin", "suspend", "GBR-GW1", "--url", url, token=viewer)
        assert code == 2 and "forbidden" in err  # a viewer may not
        code, _, err = await _cli("admin", "status", "--url", url)
        assert code == 2 and "COALITION_ADMIN_TOKEN" in err  # no token at all
        code, out, _ = await _cli("admin", "suspend", "GBR-GW1", "--url", url, "--json",
                                  token=operator)
        assert code == 0 and '"status": "suspended"' in out
        code, out, _ = await _cli("admin", "nodes", "--url", url, token=operator)
        assert any(line.startswith("GBR-GW1") and "suspended" in line
                   for line in out.splitlines())
        code, out, _ = await _cli(
            "admin", "decide", "--url", url, "--sender", "USA-GW1", "--recipient", "GBR-GW1",
            "--topic", "reports.daily", "--label",
            '{"policy":"NATO","class":"SECRET","orig":"USA","rel":["GBR"],"cats":{}}',
            token=operator)
        assert (code, out.strip()) == (0, "deny:node_inactive")
        backup = tmp_path / "backup.sqlite"
        code, out, _ = await _cli("broker", "backup", "--config", str(config), "--out",
                                  str(backup))
        assert code == 0 and "integrity ok" in out
        code, _, err = await _cli("broker", "backup", "--config", str(config), "--out",
                                  str(backup))
        assert code == 2 and "never overwrites" in err
    with sqlite3.connect(backup) as copy:  # the copy holds the suspension and its entry
        assert copy.execute("SELECT status FROM node_status WHERE node = 'GBR-GW1'"
                            ).fetchone() == ("suspended",)
        assert copy.execute("SELECT count(*) FROM entries").fetchone()[0] >= 2


def test_backup_is_private_complete_or_absent(coalition: Coalition, tmp_path: Path) -> None:
    from broker.errors import StorageError
    from broker.store.sqlite import SqliteStore, backup_store

    data = tmp_path / "data?odd#name"  # characters that would cut a file: URI short
    SqliteStore.in_dir(data).close()
    backup_store(data, tmp_path / "copy.sqlite")
    assert (tmp_path / "copy.sqlite").stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*partial"))
    with sqlite3.connect(tmp_path / "copy.sqlite") as copy:
        assert copy.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    with pytest.raises(StorageError, match="no store"):
        backup_store(tmp_path / "nowhere", tmp_path / "other.sqlite")
    assert not (tmp_path / "other.sqlite").exists()


def test_a_store_of_another_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    from broker.errors import StorageError
    from broker.store.sqlite import SqliteStore

    path = tmp_path / "broker.sqlite"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        old.execute("INSERT INTO meta VALUES ('schema', '1')")
    with pytest.raises(StorageError, match="schema version 1"):
        SqliteStore(path)
    with sqlite3.connect(path) as old:
        tables = {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta"}
