"""``coalition broker serve``: one broker process from its configuration, until stopped.

The node listener (:class:`broker.server.BrokerServer`), the admin API on its own listener,
the PID file the CLI's ``stop`` and the benchmark read, and policy reloads on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from broker.config import Config
from broker.errors import BrokerError
from broker.server import BrokerServer
from policies.bundle import Bundle

log = structlog.get_logger("broker.server")

PID_FILE = "broker.pid"


def read_pid(data_dir: Path) -> int | None:
    """The process id in the PID file of a broker serving ``data_dir``; ``None`` without one.
    Raises ``ValueError`` (the reason) if the file cannot be read or holds no positive process
    id: ``os.kill`` of 0 or a negative id would signal a whole process group."""
    pid_file = data_dir / PID_FILE
    try:
        text = pid_file.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot read {pid_file}: {exc.strerror}") from exc
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise ValueError(f"{pid_file} holds no process id")
    return pid


@contextlib.asynccontextmanager
async def _admin_listener(server: BrokerServer, config: Config) -> AsyncIterator[None]:
    """The admin API on its own listener, unless ``admin.port`` is -1."""
    from broker.admin.app import AdminContext, AdminServer
    from broker.admin.auth import TokenTable

    if config.admin.port < 0:
        yield
        return
    if not config.admin.tokens:
        log.warning("admin_without_tokens", detail="only /healthz, /readyz and /v1/openapi.json "
                    "answer; add [[admin.tokens]] (coalition admin token)")

    async def reload() -> Bundle:
        return await server.reload(config.policy.dir,
                                   pinned_root_sha256=config.policy.trust_root_sha256)

    async with AdminServer(AdminContext(server, reload), TokenTable(config.admin.tokens),
                           host=config.admin.host, port=config.admin.port,
                           request_timeout_s=server.limits.request_timeout_s,
                           write_stall_timeout_s=server.limits.write_stall_timeout_s):
        yield


async def serve(config: Config, *, stop: asyncio.Event | None = None,
                reload: asyncio.Event | None = None) -> None:
    """Run a broker from configuration until ``stop`` is set (or forever); each time
    ``reload`` is set, load the policy directory again (see :meth:`BrokerServer.reload`)."""
    server = BrokerServer.from_config(config)
    server.settle_heap_before_listening = True  # a process of its own (not a test's)
    stop = stop or asyncio.Event()
    reload = reload or asyncio.Event()
    pid_file = config.broker.data_dir / PID_FILE
    async with server, _admin_listener(server, config):
        pid_file.write_text(f"{os.getpid()}\n")
        try:
            while not stop.is_set():
                waiters = [asyncio.ensure_future(e.wait()) for e in (stop, reload)]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                if reload.is_set() and not stop.is_set():
                    reload.clear()
                    with contextlib.suppress(BrokerError):
                        await server.reload(config.policy.dir,
                                            pinned_root_sha256=config.policy.trust_root_sha256)
        finally:
            pid_file.unlink(missing_ok=True)
