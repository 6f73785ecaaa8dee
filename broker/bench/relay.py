"""The floor under the broker: the same load generators and frames, through a relay that does
nothing but relay.

The relay is an aiohttp WebSocket server process on uvloop, as the broker is, that speaks just
enough of the node protocol for the load generators of :mod:`broker.bench.workers`: a
``challenge``, a ``welcome`` for any ``hello`` (no signature checked), ``sub``, ``ping`` →
``pong``, and for each ``pub`` a ``deliver`` to every subscriber of the topic whose nation is in
the label's audience, then the ``receipt`` (``denied:not_in_audience`` for the others, as the
broker would say). A connection's frames of one turn of the loop leave in one write, as the
broker's do. No canonical check, no signature, no policy, no audit log, no disk, no delivery
window (``ack`` frames are read and dropped, so a subscriber's acks never hold a copy back).

The **durable relay** (``Relay(journal=PATH)``) adds the one cost the design's contract puts
before every delivery (DESIGN: no message is delivered before its ``route`` entry is durable):
the envelopes received are written to a journal and ``fdatasync``-ed, grouped (one sync in
flight, in a thread; what arrives meanwhile goes in the next), before any frame they caused
leaves. The cheapest durable write there is: a preallocated file overwritten in a ring (as
SQLite reuses its WAL), so that a sync carries data, not the file's size; no index, no
checksum, no entry.

What it measures, in the same run and on the same machine as the broker: the message rate of
the throughput plan when frame I/O and routing in one Python process are the only costs
(``relay_per_s``, a limit), and the publish→deliver latency of the same plan at the latency
scenario's rates (the **floor**: the load generators, two WebSocket hops and the processes
taking turns on the machine's cores; the **durable floor**: the same with the disk's sync
before each delivery). The broker's latency above the floor is what everything
it does beyond relaying adds, and its exposure to the machine's pauses (it is busier: a pause
delays more work); the floor alone is what the machine gives a server that only relays.

:class:`RelayCore` is the protocol, pure (frames in, frames out); :func:`relay_app` the
server around it, run in a child process by :class:`Relay`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from broker import wire, wsframe
from broker.bench.childserver import ChildServer
from broker.bench.harness import nation_of
from broker.server import NODE_PATH

NOT_IN_AUDIENCE = "denied:not_in_audience"


@dataclasses.dataclass
class _Link:
    node: str | None = None
    seq: int = 0


class RelayCore:
    """The relay's protocol for numbered connections: :meth:`connected` gives the frames to
    send a new connection, :meth:`received` the frames (connection number, encoded frame)
    that one received frame causes. Pure; a frame it cannot read or does not act on (``ack``,
    anything before ``hello``, a ``pub`` whose envelope it cannot read) is dropped."""

    def __init__(self) -> None:
        self._links: dict[int, _Link] = {}
        #: Subscribed connections per topic, in subscription order (a dict: each once).
        self._topics: dict[str, dict[int, None]] = {}
        #: Envelopes relayed since :meth:`take_relayed` last took them (the durable relay
        #: writes them before the frames they caused leave).
        self._relayed: list[bytes] = []

    def take_relayed(self) -> list[bytes]:
        """The envelopes relayed since the last call, in order."""
        relayed, self._relayed = self._relayed, []
        return relayed

    def connected(self, conn: int) -> list[bytes]:
        self._links[conn] = _Link()
        return [wire.encode_frame(wire.Challenge(v=wire.PROTOCOL_VERSION, broker="relay",
                                                 nonce=os.urandom(32)))]

    def disconnected(self, conn: int) -> None:
        self._links.pop(conn, None)
        for subscribers in self._topics.values():
            subscribers.pop(conn, None)

    def received(self, conn: int, data: bytes) -> list[tuple[int, bytes]]:
        link = self._links.get(conn)
        if link is None:
            return []
        try:
            return self._act(conn, link, msgpack.unpackb(data, raw=False))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                msgpack.UnpackException):
            return []

    def _act(self, conn: int, link: _Link, frame: Any) -> list[tuple[int, bytes]]:
        kind = frame["t"]
        if kind == "pub" and link.node is not None:
            return list(self._publish(conn, frame["env"]))
        if kind == "hello":
            link.node = str(frame["node"])
            return [(conn, wire.encode_frame(wire.Welcome(node=link.node)))]
        if kind == "sub" and link.node is not None:
            self._topics.setdefault(str(frame["topic"]), {})[conn] = None
        elif kind == "ping":
            return [(conn, wire.encode_frame(wire.Pong()))]
        return []

    def _publish(self, sender: int, env: bytes) -> Iterator[tuple[int, bytes]]:
        body = msgpack.unpackb(msgpack.unpackb(env, raw=False)[0], raw=False)
        audience, message_id = set(body["label"]["rel"]), bytes(body["id"])
        self._relayed.append(env)
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
        yield sender, wire.encode_frame(wire.Receipt(id=message_id, audit=0,
                                                     recipients=statuses))


def relay_app(journal: Path | None = None) -> web.Application:
    """The relay as an aiohttp application (one node endpoint, :data:`NODE_PATH`); with a
    ``journal``, the durable relay (module docstring)."""
    core = RelayCore()
    outputs: dict[int, _Output] = {}
    numbers = itertools.count(1)
    durable = _Journal(journal, outputs) if journal is not None else None

    async def node(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=8 << 20, compress=False)
        await ws.prepare(request)
        conn = next(numbers)
        output = outputs[conn] = _Output(request.transport)
        try:
            for frame in core.connected(conn):
                output.put(frame)
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    frames = core.received(conn, msg.data)
                    relayed = core.take_relayed()
                    if durable is not None and relayed:
                        durable.hold(relayed, frames)
                        continue
                    put_all(outputs, frames)
        finally:
            core.disconnected(conn)
            del outputs[conn]
            output.closed = True
        return ws

    app = web.Application()
    app.router.add_get(NODE_PATH, node)
    if durable is not None:
        async def close_journal(_: web.Application) -> None:
            durable.close()

        app.on_cleanup.append(close_journal)
    return app


class _Journal:
    """The durable relay's group commit: the envelopes held since the last sync in one
    ``pwrite`` and one ``fdatasync`` in a thread, one sync in flight at a time (what arrives
    meanwhile goes in the next), then the frames they caused are put out. In a thread, not
    on the loop: measured, it gave the lower tail at 50 % of the maximum (p99 8–10 ms
    against 13–21) and no worse at 10–25 % (docs/performance.md, session 18)."""

    #: The ring's size: written out (and synced) once at the start.
    SIZE = 64 << 20

    def __init__(self, path: Path, outputs: dict[int, _Output]) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        zeros = bytes(1 << 20)
        for _ in range(self.SIZE // len(zeros)):
            os.write(self._fd, zeros)
        os.fsync(self._fd)
        self._offset = 0
        self._outputs = outputs
        self._envelopes: list[bytes] = []
        self._frames: list[tuple[int, bytes]] = []
        self._scheduled = False
        self._syncing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1)

    def hold(self, envelopes: list[bytes], frames: list[tuple[int, bytes]]) -> None:
        self._envelopes.extend(envelopes)
        self._frames.extend(frames)
        if not self._scheduled and not self._syncing:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self) -> None:
        self._scheduled = False
        if not self._envelopes:
            return
        data, frames = b"".join(self._envelopes), self._frames
        self._envelopes, self._frames = [], []
        self._syncing = True
        done = asyncio.get_running_loop().run_in_executor(self._executor, self._write, data)
        done.add_done_callback(lambda written: self._synced(written, frames))

    def _synced(self, written: asyncio.Future[None], frames: list[tuple[int, bytes]]) -> None:
        if written.exception() is not None:
            # Not durable: nothing it caused leaves, and nothing more is relayed (the load
            # generators see the missing receipts and fail the run, naming the relay).
            self._syncing = True
            return
        self._syncing = False
        put_all(self._outputs, frames)
        self._commit()

    def _write(self, data: bytes) -> None:
        data = data[:self.SIZE]  # a turn larger than the ring: its head stands for it
        if self._offset + len(data) > self.SIZE:
            self._offset = 0
        os.pwrite(self._fd, data, self._offset)
        self._offset += len(data)
        os.fdatasync(self._fd)


    def close(self) -> None:
        self._executor.shutdown()
        os.close(self._fd)


def put_all(outputs: dict[int, _Output], frames: list[tuple[int, bytes]]) -> None:
    """Each ``(connection, frame)`` to its connection's output (a connection gone: dropped)."""
    for to, frame in frames:
        target = outputs.get(to)
        if target is not None:
            target.put(frame)


class _Output:
    """A connection's frames, written together once per turn of the loop (one transport
    write for all the frames the turn produced, as the broker's :class:`broker.peer.WsPeer`
    writes what a group commit releases)."""

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self._transport = transport
        self._frames: list[bytes] = []
        self.closed = False

    def put(self, frame: bytes) -> None:
        if not self._frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self._frames.append(frame)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        transport = self._transport
        if not self.closed and transport is not None and not transport.is_closing():
            transport.write(wsframe.binary_frames(frames))


class Relay(ChildServer):
    """``with Relay() as relay``: the relay in a child process (``relay.url``); with a
    ``journal`` (a file path), the durable relay."""

    def __init__(self, journal: Path | None = None) -> None:
        super().__init__(functools.partial(relay_app, journal) if journal is not None
                         else relay_app)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{NODE_PATH}"
