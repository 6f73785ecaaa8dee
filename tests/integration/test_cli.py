"""The `coalition` command, run as real processes where it matters."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli import main
from broker.coalition import Coalition
from clients.gateway import GatewayClient
from clients.identity import KeyFile
from policies.documents import SignedDocument, verify_node_cert
from policies.loader import read_document


def write_config(path: Path, coalition: Coalition, **listen: object) -> Path:
    port = listen.get("port", 0)
    path.write_text(
        "[broker]\n"
        f'name = "{coalition.broker_name}"\n'
        f'data_dir = "{path.parent / "data"}"\n'
        f'key = "{coalition.keys_dir / "broker.key"}"\n'
        "[listen]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        "[policy]\n"
        f'dir = "{coalition.policy_dir}"\n'
        f'trust_root_sha256 = "{coalition.root_sha256.hex()}"\n'
    )
    return path


def test_keys_gen_cert_and_sign_make_a_certificate_that_verifies(
    coalition: Coalition, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node_key = tmp_path / "USA-GW7.key"
    cert = coalition.policy_dir / "nodes" / "USA-GW7.toml"
    assert main(["keys", "gen", "--kind", "node", "--name", "USA-GW7", "--out",
                 str(node_key)]) == 0
    assert os.stat(node_key).st_mode & 0o777 == 0o600
    assert main(["keys", "cert", "--node-key", str(node_key), "--nation", "USA", "--max",
                 "SECRET", "--out", str(cert)]) == 0
    authority = coalition.keys_dir / "authority-USA.key"
    assert main(["keys", "sign", str(cert), "--key", str(authority)]) == 0
    loaded = verify_node_cert(read_document(coalition.policy_dir, "nodes/USA-GW7.toml"),
                              coalition.trust_root)
    assert loaded.sign_key == KeyFile.read(node_key).sign_public
    # The secret never reaches the terminal.
    seed = KeyFile.read(node_key).to_toml().split('ed25519_seed = "')[1].split('"')[0]
    assert seed not in capsys.readouterr().out


def test_a_nation_cannot_sign_another_nations_node_certificate(
    coalition: Coalition, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = coalition.policy_dir / "nodes" / "GBR-GW1.toml"
    status = main(["keys", "sign", str(cert), "--key",
                   str(coalition.keys_dir / "authority-USA.key")])
    assert status == 2
    assert "certifies a GBR node; USA cannot sign it" in capsys.readouterr().err


def test_keys_gen_refuses_to_overwrite_a_key(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a.key"
    assert main(["keys", "gen", "--kind", "authority", "--name", "USA", "--out",
                 str(target)]) == 0
    before = target.read_bytes()
    assert main(["keys", "gen", "--kind", "authority", "--name", "USA", "--out",
                 str(target)]) == 2
    assert target.read_bytes() == before
    assert "refusing to overwrite" in capsys.readouterr().err


def test_check_config_names_the_bad_field(coalition: Coalition, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "broker.toml", coalition, port=99999)
    assert main(["broker", "check-config", "--config", str(config)]) == 2
    assert "listen.port must be between 0 and 65535" in capsys.readouterr().err


async def test_broker_serve_process_accepts_gateways_and_stops_on_sigterm(
    coalition: Coalition, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "broker.toml", coalition)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "broker", "serve", "--config", str(config),
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    try:
        assert process.stderr is not None
        url = None
        while url is None:
            line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
            assert line, "broker exited before it was ready"
            event = json.loads(line)
            if event.get("event") == "broker_ready":
                url = event["url"]
        async with GatewayClient(url, coalition.nodes["USA-GW1"], coalition.trust_root,
                                 broker_name=coalition.broker_name,
                                 timeout=5) as gw:
            certs = await gw.directory()
            assert "GBR-GW1" in certs
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_signed_document_round_trips_through_directory_encoding(coalition: Coalition) -> None:
    doc = read_document(coalition.policy_dir, "nodes/GBR-GW1.toml")
    assert SignedDocument.from_bytes(doc.to_bytes()) == doc


def test_output_to_a_reader_gone_ends_quietly_with_status_141(coalition: Coalition) -> None:
    """``coalition ... | head -1``: the reader closes the pipe early; the command stops with
    128 + SIGPIPE and no traceback (the reader here is closed before anything is written)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "policy", "check", str(coalition.policy_dir),
             "--json"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_broken_pipe_other_than_stdout_is_not_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a reader of stdout gone ends the command quietly; a broken pipe elsewhere (stdout
    still writable) is the error it is."""
    def broken(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("broker.cli._keys_show", broken)
    with pytest.raises(BrokenPipeError):
        main(["keys", "show", str(tmp_path / "any.key")])
