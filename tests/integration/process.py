"""A real ``coalition broker serve`` process for tests about processes and crashes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from broker.coalition import Coalition


class BrokerProcess:
    """A running broker process; its JSON log lines are drained so it never blocks on them."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.events: list[dict[str, object]] = []
        self._drain = asyncio.create_task(self._read_logs())

    async def _read_logs(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def kill9(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed."""
        self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout=20)
        await self._drain
        return code


async def start_broker(config: Path, *, max_file_bytes: int | None = None) -> BrokerProcess:
    """Start ``coalition broker serve`` and return once it logged ``broker_ready``.

    ``max_file_bytes`` sets RLIMIT_FSIZE on the process: a write that would make any file
    larger fails with EFBIG (Python ignores SIGXFSZ), a real disk-full for that process.
    """
    def limit_file_size() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.cli", "broker", "serve", "--config", str(config),
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, preexec_fn=limit_file_size,
    )
    assert process.stderr is not None
    lines = []
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
        if not line:
            await process.wait()
            raise AssertionError(f"broker exited ({process.returncode}) before it was ready: "
                                 + b"".join(lines[-5:]).decode(errors="replace"))
        lines.append(line)
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "broker_ready":
                return BrokerProcess(process, str(event["url"]))


def free_port() -> int:
    """A loopback port free right now (for a broker that must come back on the same port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_broker_config(tmp_path: Path, coalition: Coalition, *, port: int = 0,
                        limits: str = "", admin: str = "", audit: str = "") -> Path:
    """A config for ``coalition`` (on ``port``, 0: any free one), data in ``tmp_path/data``,
    fast checkpoints, the admin API on a free port; ``limits``, ``admin`` and ``audit`` are
    extra TOML for those sections."""
    path = tmp_path / "broker.toml"
    path.write_text(
        "[broker]\n"
        f'name = "{coalition.broker_name}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        f'key = "{coalition.keys_dir / "broker.key"}"\n'
        f'[listen]\nhost = "127.0.0.1"\nport = {port}\n'
        "[policy]\n"
        f'dir = "{coalition.policy_dir}"\n'
        f'trust_root_sha256 = "{coalition.root_sha256.hex()}"\n'
        f"[audit]\nmax_batch = 64\nmax_delay_ms = 1\ncheckpoint_interval_ms = 50\n{audit}\n"
        f"[limits]\n{limits}\n"
        f"[admin]\nport = 0\n{admin}\n"
    )
    return path


@contextlib.asynccontextmanager
async def running_broker(config: Path, *,
                         max_file_bytes: int | None = None) -> AsyncIterator[BrokerProcess]:
    """A broker process killed (if still running) when the block ends."""
    broker = await start_broker(config, max_file_bytes=max_file_bytes)
    try:
        yield broker
    finally:
        if broker.process.returncode is None:
            broker.process.kill()
        await broker.wait()
