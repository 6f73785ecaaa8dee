"""A minimal MQTT 3.1.1 client over asyncio streams, for the peer comparison only.

Just what a QoS 1 benchmark needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH with QoS 1 and
its PUBACK, in both directions, and DISCONNECT (MQTT 3.1.1, OASIS standard, sections 2 and 3).
No will, no authentication, no QoS 2, no retained messages, no reconnect. Hand-written so that
the benchmark adds no dependency (``docs/performance.md`` says why). The worker processes mirror
:mod:`broker.bench.workers`: same pipe protocol, same result types, same clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import time
from multiprocessing.connection import Connection
from typing import Any

from broker.bench.workers import Control, PublisherResult, SubscriberResult, run_worker

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 4, 8, 9, 14
QOS1 = 0b0010  # the QoS bits of a PUBLISH fixed header


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """A control packet: fixed header (type, flags, remaining length) and the rest."""
    return bytes([kind << 4 | flags]) + _remaining_length(len(body)) + body


def connect(client_id: str, *, keepalive: int = 600, clean: bool = True) -> bytes:
    return packet(CONNECT, 0, _string("MQTT") + bytes([4, 0x02 if clean else 0])
                  + struct.pack("!H", keepalive) + _string(client_id))


def subscribe(packet_id: int, topic: str) -> bytes:
    return packet(SUBSCRIBE, 0b0010, struct.pack("!H", packet_id) + _string(topic) + b"\x01")


def publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    return packet(PUBLISH, QOS1, _string(topic) + struct.pack("!H", packet_id) + payload)


def puback(packet_id: int) -> bytes:
    return packet(PUBACK, 0, struct.pack("!H", packet_id))


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """The next packet: (type, flags, the bytes after the fixed header)."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if shift > 21:
            raise ValueError("malformed remaining length")
    return first >> 4, first & 0x0F, await reader.readexactly(length)


def parse_publish(flags: int, body: bytes) -> tuple[str, int | None, bytes]:
    """Topic, packet id (QoS > 0) and payload of a PUBLISH."""
    (size,) = struct.unpack_from("!H", body)
    topic = body[2:2 + size].decode()
    offset = 2 + size
    if flags & 0b0110:
        (packet_id,) = struct.unpack_from("!H", body, offset)
        return topic, packet_id, body[offset + 2:]
    return topic, None, body[offset:]


async def open_session(host: str, port: int, client_id: str, *,
                       clean: bool = True) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and wait for a successful CONNACK (``clean=False``: a durable session)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect(client_id, clean=clean))
    kind, _, body = await read_packet(reader)
    if kind != CONNACK or len(body) != 2 or body[1] != 0:
        raise RuntimeError(f"{client_id}: connection refused ({kind}, {body!r})")
    return reader, writer


@dataclasses.dataclass(frozen=True)
class MqttPublisherSpec:
    host: str
    port: int
    client_id: str
    topic: str
    count: int
    size: int
    window: int = 256


@dataclasses.dataclass(frozen=True)
class MqttSubscriberSpec:
    host: str
    port: int
    client_ids: tuple[str, ...]
    topics: tuple[str, ...]
    expected: tuple[int, ...]


async def _publisher(spec: MqttPublisherSpec, control: Control) -> None:
    started = time.perf_counter()
    payload = os.urandom(spec.size)
    ids = [i % 65535 + 1 for i in range(spec.count)]
    frames = [publish(spec.topic, packet_id, payload) for packet_id in ids]
    result = PublisherResult(spec.client_id, spec.size, time.perf_counter() - started)
    reader, writer = await open_session(spec.host, spec.port, spec.client_id)
    control.send("ready", result.build_s)
    if await control.wait("go") != "go":
        writer.close()
        return
    window = asyncio.Semaphore(min(spec.window, 65535))

    async def acks() -> None:
        while result.receipts < spec.count:
            kind, _, _ = await read_packet(reader)
            if kind == PUBACK:
                result.receipts += 1
                window.release()
        result.last_receipt_ns = time.monotonic_ns()

    reading = asyncio.create_task(acks())
    result.first_send_ns = time.monotonic_ns()
    for frame in frames:
        await window.acquire()
        writer.write(frame)
        result.sent += 1
        if writer.transport.get_write_buffer_size() > 1 << 20:
            await writer.drain()
    await reading
    result.statuses = {"puback": result.receipts}
    writer.write(packet(DISCONNECT, 0, b""))
    await writer.drain()
    writer.close()
    control.send("done", [result])
    await control.wait()


async def _subscriber(spec: MqttSubscriberSpec, control: Control) -> None:
    results: list[SubscriberResult] = []
    tasks = []
    done = [asyncio.Event() for _ in spec.client_ids]
    for index, (client_id, topic, expected) in enumerate(
            zip(spec.client_ids, spec.topics, spec.expected, strict=True)):
        # Durable sessions, as the broker's subscriptions and queues are: Mosquitto persists
        # the messages in flight to clients without a clean session.
        reader, writer = await open_session(spec.host, spec.port, client_id, clean=False)
        writer.write(subscribe(1, topic))
        kind, _, body = await read_packet(reader)
        if kind != SUBACK or body[-1] > 1:
            raise RuntimeError(f"{client_id}: subscription refused")
        result = SubscriberResult(client_id, expected)
        results.append(result)
        if expected <= 0:
            done[index].set()
        tasks.append(asyncio.create_task(_receive(reader, writer, result, done[index])))
    control.send("ready", 0.0)
    complete = asyncio.gather(*(d.wait() for d in done))
    asked = asyncio.create_task(control.wait("report"))
    waiters: list[asyncio.Future[Any]] = [complete, asked]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    control.send("done", results)
    if not asked.done():
        await asked
    if asked.result() != "exit":
        await control.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, complete, return_exceptions=True)


async def _receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   result: SubscriberResult, done: asyncio.Event) -> None:
    while True:
        kind, flags, body = await read_packet(reader)
        if kind != PUBLISH:
            continue
        now = time.monotonic_ns()
        _, packet_id, _ = parse_publish(flags, body)
        if packet_id is not None:
            writer.write(puback(packet_id))
        if flags & 0b1000:  # DUP: a redelivery
            result.duplicates += 1
            continue
        result.received += 1
        result.first_ns = result.first_ns or now
        result.last_ns = now
        if result.received >= result.expected:
            done.set()


def publisher_main(spec: MqttPublisherSpec, conn: Connection) -> None:
    """Process target of an MQTT publisher."""
    run_worker(_publisher, spec, conn)


def subscriber_main(spec: MqttSubscriberSpec, conn: Connection) -> None:
    """Process target of an MQTT subscriber group."""
    run_worker(_subscriber, spec, conn)
