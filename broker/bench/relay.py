"""The floor under the broker: the same load generators and frames, through a relay that does
nothing but relay.

The relay is an aiohttp WebSocket server process on uvloop, as the broker is, that speaks just
enough of the node protocol for the load generators of :mod:`broker.bench.workers`: a
``challenge``, a ``welcome`` for any ``hello`` (no signature checked), ``sub``, ``ping`` →
``pong``, and for each ``pub`` a ``deliver`` to every subscriber of the topic whose nation is in
the label's audience, then the ``receipt`` (``denied:not_in_audience`` for the others, as the
broker would say). No canonical check, no signature, no policy, no audit log, no disk; ``ack``
frames are read and dropped.

What it measures, in the same run and on the same machine as the broker: the message rate of
the throughput plan when nothing but frame I/O and routing costs anything (``relay_per_s``, a
limit), and the publish→deliver latency of the same plan at the latency scenario's rates (the
**floor**: two WebSocket hops and eight processes taking turns on the machine's cores). The
broker's latency above the floor is what its checks, decisions and durable commit add; the
floor itself is what the machine gives anything at that rate.

:class:`RelayCore` is the protocol, pure (frames in, frames out); the process around it is
:func:`relay_main`, and :class:`Relay` starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from broker import wire
from broker.bench.harness import nation_of, process_cpu_seconds, process_rss_bytes
from broker.bench.workers import mp_context

NOT_IN_AUDIENCE = "denied:not_in_audience"


@dataclasses.dataclass
class _Link:
    node: str | None = None
    seq: int = 0


class RelayCore:
    """The relay's protocol for numbered connections: :meth:`connected` gives the frames to
    send a new connection, :meth:`received` the frames (connection number, encoded frame)
    that one received frame causes. Pure; a frame it does not understand is dropped."""

    def __init__(self) -> None:
        self._links: dict[int, _Link] = {}
        #: Subscribed connections per topic, in subscription order.
        self._topics: dict[str, list[int]] = {}

    def connected(self, conn: int) -> list[bytes]:
        self._links[conn] = _Link()
        return [wire.encode_frame(wire.Challenge(v=wire.PROTOCOL_VERSION, broker="relay",
                                                 nonce=os.urandom(32)))]

    def disconnected(self, conn: int) -> None:
        self._links.pop(conn, None)
        for subscribers in self._topics.values():
            with contextlib.suppress(ValueError):
                subscribers.remove(conn)

    def received(self, conn: int, data: bytes) -> list[tuple[int, bytes]]:
        link = self._links.get(conn)
        try:
            frame = msgpack.unpackb(data, raw=False)
            kind = frame["t"]
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            return []
        if link is None:
            return []
        if kind == "pub" and link.node is not None:
            return list(self._publish(conn, frame["env"]))
        if kind == "hello":
            link.node = str(frame["node"])
            return [(conn, wire.encode_frame(wire.Welcome(node=link.node)))]
        if kind == "sub" and link.node is not None:
            self._topics.setdefault(str(frame["topic"]), []).append(conn)
        elif kind == "ping":
            return [(conn, wire.encode_frame(wire.Pong()))]
        return []

    def _publish(self, sender: int, env: bytes) -> Iterator[tuple[int, bytes]]:
        body = msgpack.unpackb(msgpack.unpackb(env, raw=False)[0], raw=False)
        audience = set(body["label"]["rel"])
        statuses: dict[str, str] = {}
        for conn in self._topics.get(body["topic"], ()):
            link = self._links[conn]
            assert link.node is not None
            if nation_of(link.node) not in audience:
                statuses[link.node] = NOT_IN_AUDIENCE
                continue
            link.seq += 1
            statuses[link.node] = "delivered"
            yield conn, wire.encode_frame(wire.Deliver(env=env, seq=link.seq))
        yield sender, wire.encode_frame(wire.Receipt(id=body["id"], audit=0,
                                                     recipients=statuses))


def relay_main(conn: Connection) -> None:
    """Process target: serve the relay on a free loopback port, send the port through ``conn``,
    stop when ``conn`` says anything (or closes)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(conn))


async def _serve(control: Connection) -> None:
    core = RelayCore()
    sockets: dict[int, web.WebSocketResponse] = {}
    numbers = iter(range(1, 1 << 62))

    async def node(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=8 << 20, compress=False)
        await ws.prepare(request)
        conn = next(numbers)
        sockets[conn] = ws
        try:
            for frame in core.connected(conn):
                await ws.send_bytes(frame)
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                for to, frame in core.received(conn, msg.data):
                    target = sockets.get(to)
                    if target is not None and not target.closed:
                        # A subscriber that has left while its copy was on the way: not ours
                        # to report (the load generator counts what arrived).
                        with contextlib.suppress(ConnectionResetError):
                            await target.send_bytes(frame)
        finally:
            core.disconnected(conn)
            sockets.pop(conn, None)
        return ws

    app = web.Application()
    app.router.add_get("/v1/node", node)
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


class Relay:
    """``with Relay() as relay``: a relay process on a free loopback port (``relay.url``), its
    CPU time and memory read as the broker's are."""

    def __init__(self) -> None:
        self._context: Any = mp_context()
        self._conn: Connection | None = None
        self._process: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/node"

    def start(self, timeout: float = 60.0) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=relay_main, args=(child,), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout):
            self.stop()
            raise RuntimeError("the relay did not start")
        self.port = int(parent.recv())

    def rss_bytes(self) -> int:
        return process_rss_bytes(self._process.pid)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self._process.pid)

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send("stop")
        if self._process is not None:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
