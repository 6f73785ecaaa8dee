"""An aiohttp application served by a child process on a free loopback port, for the limits
that need a server beside the broker's (the WebSocket echo, the relay floor).

``with ChildServer(make_app) as server``: the child (started with the benchmark's
``forkserver`` context, on uvloop) builds the app with ``make_app()`` (a module-level function:
it is pickled to the child), serves it on ``127.0.0.1:0``, sends its port back over a pipe, and
stops when the pipe says anything or closes. ``server.port``, ``server.pid``, and the child's
CPU time and memory as :class:`broker.bench.load.Measured` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from broker.bench.harness import process_cpu_seconds, process_rss_bytes
from broker.bench.workers import mp_context, use_uvloop

AppFactory = Callable[[], web.Application]


def child_main(make_app: AppFactory, control: Connection) -> None:
    """Process target: serve ``make_app()`` until ``control`` says anything or closes."""
    use_uvloop()
    asyncio.run(_serve(make_app(), control))


async def _serve(app: web.Application, control: Connection) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        control.send(runner.addresses[0][1])
        with contextlib.suppress(EOFError, OSError):
            await asyncio.get_running_loop().run_in_executor(None, control.recv)
    finally:
        await runner.cleanup()


class ChildServer:
    """A child process serving ``make_app()``; see the module docstring."""

    def __init__(self, make_app: AppFactory) -> None:
        self._make_app = make_app
        self._conn: Connection | None = None
        self._process: Any = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self._process is not None and self._process.pid is not None
        return int(self._process.pid)

    def start(self, timeout: float = 60.0) -> None:
        """Start the child and wait for its port (``RuntimeError`` if none comes in time; the
        child is stopped then)."""
        context = mp_context()
        parent, child = context.Pipe()
        self._conn = parent
        self._process = context.Process(target=child_main, args=(self._make_app, child),
                                        daemon=True)
        try:
            self._process.start()
            child.close()
            if not parent.poll(timeout):
                raise RuntimeError("the server process did not start in time")
            self.port = int(parent.recv())
        except (EOFError, OSError, ValueError) as exc:
            self.stop()
            raise RuntimeError(f"the server process did not start: {exc!r}") from exc
        except BaseException:
            self.stop()
            raise

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        """Tell the child to stop and wait for it (terminate it after 10 s)."""
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send("stop")
        if self._process is not None and self._process.pid is not None:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
