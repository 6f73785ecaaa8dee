"""The load generators: publisher and subscriber processes speaking raw node-protocol frames.

A publisher builds its envelopes first (:func:`broker.envelope.build_envelope`, its own node
key, the recipients' X25519 keys), connects, says ``ready`` and waits for ``go``; then it sends
``pub`` frames, pipelined with at most ``window`` receipts outstanding (and, with a ``rate``,
paced to it), and reports receipts, their statuses, errors and send times. A subscriber process
hosts one or more nodes: each subscribes, confirms it with a ``ping``, counts ``deliver``
frames (unique by ``seq``) and acks them in batches of ``ack_batch`` (and every 5 ms).

Both read incoming frames with plain :func:`msgpack.unpackb`, not the broker's strict decoder:
the load generators should cost as little CPU as possible on a machine they share with the
broker. Times are ``time.monotonic_ns()`` (``CLOCK_MONOTONIC``, one clock for every process on
Linux), so the parent can subtract a publisher's send time from a subscriber's receive time.
The parent talks to a worker over a pipe: the worker sends ``("ready", build_seconds)``, then
``("done", results)`` or ``("failed", reason)``; it accepts ``go``, ``report`` and ``exit``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

from broker import wire
from broker.bench.harness import TTL_S, nation_of
from broker.envelope import build_envelope, new_message_id
from broker.session import make_hello
from clients.gateway import label
from clients.identity import KeyFile

MAX_FRAME = 8 << 20


@dataclasses.dataclass(frozen=True)
class PublisherSpec:
    """One publisher process: ``count`` envelopes of about ``size`` bytes from ``node``."""

    url: str
    keys_dir: str
    node: str
    topic: str
    #: Nations the label releases to (the audience), and the nodes the content key is sealed to.
    rel: tuple[str, ...]
    recipients: tuple[str, ...]
    count: int
    #: Envelope bytes to aim for; ``payload`` (bytes), when set, fixes the payload instead.
    size: int = 1024
    payload: int | None = None
    window: int = 256
    #: Messages per second for this publisher; ``None``: as fast as the window allows.
    rate: float | None = None
    #: Return each message's id and send time (for latencies).
    record: bool = False


@dataclasses.dataclass(frozen=True)
class SubscriberSpec:
    """One subscriber process hosting ``nodes``, each subscribed to ``topic`` and expecting
    ``expected[i]`` deliveries."""

    url: str
    keys_dir: str
    nodes: tuple[str, ...]
    topic: str
    expected: tuple[int, ...]
    ack_batch: int = 16
    #: Return each delivery's message id and receive time (for latencies).
    record: bool = False


@dataclasses.dataclass
class PublisherResult:
    node: str
    envelope_bytes: int
    build_s: float
    sent: int = 0
    receipts: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    first_send_ns: int = 0
    last_receipt_ns: int = 0
    #: Largest lag behind the pacing schedule (ms), with a ``rate``.
    max_lag_ms: float = 0.0
    sends: list[tuple[bytes, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SubscriberResult:
    node: str
    expected: int
    received: int = 0
    duplicates: int = 0
    first_ns: int = 0
    last_ns: int = 0
    arrivals: list[tuple[bytes, int]] = dataclasses.field(default_factory=list)


def fit_payload(envelope: Callable[[bytes], bytes], size: int) -> int:
    """The payload length that makes ``envelope(payload)`` about ``size`` bytes long (0 when
    even an empty payload makes it longer)."""
    length = max(0, size - len(envelope(b"")))
    for _ in range(2):  # the length prefixes grow with the payload: settle on the target
        length = max(0, length + size - len(envelope(bytes(length))))
    return length


def _maker(spec: PublisherSpec, now: int) -> Callable[[bytes, bytes | None], bytes]:
    keys = Path(spec.keys_dir)
    key = KeyFile.read(keys / f"{spec.node}.key")
    sealed_to = {node: KeyFile.read(keys / f"{node}.key").enc_public for node in spec.recipients}
    lab = label("NATO", "SECRET", nation_of(spec.node), list(spec.rel))

    def envelope(payload: bytes, message_id: bytes | None = None) -> bytes:
        return build_envelope(signing_key=key.signing_key, sender=spec.node, topic=spec.topic,
                              payload=payload, label=lab, prec=0, ttl=TTL_S,
                              recipient_keys=sealed_to, now_ms=now, message_id=message_id)
    return envelope


def payload_length(spec: PublisherSpec) -> int:
    """The payload length of ``spec``'s envelopes."""
    if spec.payload is not None:
        return spec.payload
    envelope = _maker(spec, time.time_ns() // 1_000_000)
    return fit_payload(lambda payload: envelope(payload, None), spec.size)


def build_frames(spec: PublisherSpec) -> tuple[list[bytes], list[bytes], int]:
    """The ``pub`` frames (encoded), their message ids, and the envelope size."""
    now = time.time_ns() // 1_000_000
    envelope = _maker(spec, now)
    payload = os.urandom(payload_length(spec))
    ids = [new_message_id(now) for _ in range(spec.count)]
    envelopes = [envelope(payload, message_id) for message_id in ids]
    frames = [wire.encode_frame(wire.Pub(env=env)) for env in envelopes]
    return frames, ids, len(envelopes[0]) if envelopes else 0


async def login(http: aiohttp.ClientSession, url: str, keys_dir: str,
                node: str) -> aiohttp.ClientWebSocketResponse:
    """Connect and authenticate as ``node``; returns the socket after ``welcome``."""
    key = KeyFile.read(Path(keys_dir) / f"{node}.key")
    ws = await http.ws_connect(url, max_msg_size=MAX_FRAME)
    challenge = wire.decode_frame((await ws.receive(timeout=30)).data, max_bytes=MAX_FRAME)
    if not isinstance(challenge, wire.Challenge):
        raise RuntimeError(f"{node}: expected a challenge, got {challenge.T}")
    await ws.send_bytes(wire.encode_frame(
        make_hello(challenge, node, key.signing_key, time.time_ns() // 1_000_000)))
    answer = wire.decode_frame((await ws.receive(timeout=30)).data, max_bytes=MAX_FRAME)
    if not isinstance(answer, wire.Welcome):
        raise RuntimeError(f"{node}: handshake refused: {answer}")
    return ws


class Control:
    """The worker's end of the pipe to the parent, read from the event loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inbox: asyncio.Queue[str] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            self.inbox.put_nowait(str(self.conn.recv()))
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            self.inbox.put_nowait("exit")

    async def wait(self, *commands: str) -> str:
        while True:
            command = await self.inbox.get()
            if command in commands or command == "exit":
                return command

    def send(self, kind: str, payload: Any) -> None:
        self.conn.send((kind, payload))


def mp_context() -> Any:
    """The ``forkserver`` multiprocessing context, its server preloaded with this module (and
    what it imports), so that a worker starts in milliseconds. Every process the benchmark
    starts through :mod:`multiprocessing` must use it: the preload takes effect only if it is
    set before the server's first use. (As with any non-fork method, a script that starts
    workers needs the ``if __name__ == "__main__"`` guard.)"""
    context = multiprocessing.get_context("forkserver")
    # Not the main module (``broker.cli``): each child runs it again as ``__mp_main__``, and
    # runpy warns when it is already imported.
    context.set_forkserver_preload(["broker.bench.workers", "broker.bench.mqtt",
                                    "broker.bench.relay"])
    return context


def use_uvloop() -> None:
    """Run this process's event loops on uvloop, where it is installed (as the broker does)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(main: Callable[[Any, Control], Any], spec: Any, conn: Connection) -> None:
    """Process entry: run ``main`` on uvloop; report an exception as ``failed``."""
    use_uvloop()

    async def run() -> None:
        control = Control(conn)
        try:
            await main(spec, control)
        except Exception:
            control.send("failed", traceback.format_exc(limit=8))
            await control.wait()

    asyncio.run(run())


def publisher_main(spec: PublisherSpec, conn: Connection) -> None:
    """Process target of a publisher."""
    run_worker(_publisher, spec, conn)


def subscriber_main(spec: SubscriberSpec, conn: Connection) -> None:
    """Process target of a subscriber group."""
    run_worker(_subscribers, spec, conn)


async def _publisher(spec: PublisherSpec, control: Control) -> None:
    started = time.perf_counter()
    frames, ids, size = build_frames(spec)
    result = PublisherResult(spec.node, size, time.perf_counter() - started)
    async with aiohttp.ClientSession() as http:
        ws = await login(http, spec.url, spec.keys_dir, spec.node)
        control.send("ready", result.build_s)
        if await control.wait("go") == "go":
            await _send_all(ws, frames, ids, spec, result)
            control.send("done", [result])
            await control.wait()
        await ws.close()


async def _send_all(ws: aiohttp.ClientWebSocketResponse, frames: list[bytes], ids: list[bytes],
                    spec: PublisherSpec, result: PublisherResult) -> None:
    window = asyncio.Semaphore(spec.window)
    finished = asyncio.Event()
    statuses: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()

    async def read() -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            frame = msgpack.unpackb(msg.data, raw=False)
            kind = frame.get("t")
            if kind == "receipt":
                result.receipts += 1
                statuses.update(s.split(",", 1)[0] for s in frame["recipients"].values())
            elif kind == "error":
                errors[str(frame.get("code"))] += 1
                if "ref" not in frame:
                    break
            else:
                continue  # checkpoints offered to witnesses, expiry notices
            window.release()
            if result.receipts + sum(errors.values()) >= len(frames):
                result.last_receipt_ns = time.monotonic_ns()
                break
        finished.set()

    reader = asyncio.create_task(read())
    interval = 1e9 / spec.rate if spec.rate else 0.0
    start = time.monotonic_ns()
    result.first_send_ns = start
    sends = []
    for index, frame in enumerate(frames):
        if interval:
            lag = time.monotonic_ns() - (start + int(index * interval))
            if lag < 0:
                await asyncio.sleep(-lag / 1e9)
            else:
                result.max_lag_ms = max(result.max_lag_ms, lag / 1e6)
        await window.acquire()
        if finished.is_set():
            break
        sends.append(time.monotonic_ns())
        await ws.send_bytes(frame)
    result.sent = len(sends)
    await finished.wait()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    if not result.last_receipt_ns:
        result.last_receipt_ns = time.monotonic_ns()
    result.statuses, result.errors = dict(statuses), dict(errors)
    if spec.record:
        result.sends = list(zip(ids, sends, strict=False))


class _Receiver:
    """One subscribed node: counts and acks deliveries."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, result: SubscriberResult,
                 spec: SubscriberSpec) -> None:
        self.ws = ws
        self.result = result
        self.spec = spec
        self.seen: set[int] = set()
        self.pending: list[int] = []
        self.pong = asyncio.Event()
        self.complete = asyncio.Event()
        if result.expected <= 0:
            self.complete.set()

    async def flush(self) -> None:
        if self.pending:
            seqs, self.pending = tuple(self.pending), []
            await self.ws.send_bytes(wire.encode_frame(wire.Ack(seqs=seqs)))

    async def run(self) -> None:
        result, record = self.result, self.spec.record
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            frame = msgpack.unpackb(msg.data, raw=False)
            kind = frame.get("t")
            if kind == "deliver":
                now = time.monotonic_ns()
                seq = frame["seq"]
                self.pending.append(seq)
                if seq in self.seen:
                    result.duplicates += 1
                else:
                    self.seen.add(seq)
                    result.received += 1
                    result.first_ns = result.first_ns or now
                    result.last_ns = now
                    if record:
                        body = msgpack.unpackb(frame["env"], raw=False)[0]
                        result.arrivals.append((msgpack.unpackb(body, raw=False)["id"], now))
                if len(self.pending) >= self.spec.ack_batch:
                    await self.flush()
                if result.received >= result.expected:
                    await self.flush()
                    self.complete.set()
            elif kind == "pong":
                self.pong.set()

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            await self.flush()


async def _subscribers(spec: SubscriberSpec, control: Control) -> None:
    async with aiohttp.ClientSession() as http:
        receivers: list[_Receiver] = []
        tasks: list[asyncio.Task[None]] = []
        for node, expected in zip(spec.nodes, spec.expected, strict=True):
            ws = await login(http, spec.url, spec.keys_dir, node)
            receiver = _Receiver(ws, SubscriberResult(node, expected), spec)
            receivers.append(receiver)
            tasks += [asyncio.create_task(receiver.run()), asyncio.create_task(receiver.flusher())]
            await ws.send_bytes(wire.encode_frame(wire.Sub(topic=spec.topic)))
            await ws.send_bytes(wire.encode_frame(wire.Ping()))
        await asyncio.wait_for(asyncio.gather(*(r.pong.wait() for r in receivers)), 30)
        control.send("ready", 0.0)
        complete = asyncio.gather(*(r.complete.wait() for r in receivers))
        asked = asyncio.create_task(control.wait("report"))
        waiters: list[asyncio.Future[Any]] = [complete, asked]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for receiver in receivers:
            await receiver.flush()
        control.send("done", [r.result for r in receivers])
        if not asked.done():
            await asked
        if asked.result() != "exit":
            await control.wait()
        complete.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, complete, return_exceptions=True)
        for receiver in receivers:
            await receiver.ws.close()
