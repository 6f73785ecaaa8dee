"""The limits the broker runs against, measured in the same run on the same machine.

- **Ed25519 verify** (PyNaCl, one core): a cached ``VerifyKey`` verifying the signature of a
  1 KiB envelope body (what the broker does once per envelope);
- **unpack + verify + hash**: :meth:`Envelope.from_bytes` (canonical decode and structural
  checks), :meth:`Envelope.verify` and the envelope digest the audit entry records — the
  envelope work of one publish without policy, storage or network;
- **aiohttp WebSocket echo** on loopback: an aiohttp server process echoing 1 KiB binary
  messages to a client process that keeps ``window`` messages in flight (the framework's
  message rate, one process each side, both on uvloop);
- **relay**: the throughput plan (the same load generators, frames and message count) through
  :mod:`broker.bench.relay`, a server that only relays: the message rate with frame I/O and
  routing the only costs (``relay_per_s``), the relay's CPU and the load generators' CPU per
  message;
- **durable audit**: the production audit log's CPU per message of the plan's entries
  (:func:`broker.bench_audit.audit_cpu_per_message`).

The first three are counted for ``limit_seconds`` of wall time, as operations per second. The
CPU figures make the machine's budget (:mod:`broker.bench.budget`): the highest rate a broker
doing those parts could reach on this machine's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import nacl.signing
from aiohttp import web

from broker import bench_audit, crypto
from broker.audit.leaves import envelope_digest
from broker.bench import throughput
from broker.bench.budget import budget
from broker.bench.childserver import ChildServer
from broker.bench.context import Run
from broker.bench.load import LoadResult, run_load
from broker.bench.relay import Relay
from broker.bench.workers import fit_payload
from broker.envelope import Envelope, build_envelope
from clients.gateway import label
from clients.identity import KeyFile

ECHO_WINDOW = 64
#: Messages whose audit entries are written to measure the audit log's CPU per message.
AUDIT_MESSAGES = 4000


def _rate(body: Callable[[], object], seconds: float) -> tuple[float, int]:
    """Calls of ``body`` per second over about ``seconds`` (checked every 64 calls)."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(64):
            body()
        count += 64
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start), count


def sample_envelope(size: int) -> tuple[bytes, bytes]:
    """A signed envelope of about ``size`` bytes to two recipients, and the sender's key."""
    sender = KeyFile.generate("node", "USA-P1")
    recipients = {f"{n}-S1": KeyFile.generate("node", f"{n}-S1").enc_public
                  for n in ("FRA", "GBR")}
    lab = label("NATO", "SECRET", "USA", ["FRA", "GBR"])
    now = time.time_ns() // 1_000_000

    def envelope(payload: bytes) -> bytes:
        return build_envelope(signing_key=sender.signing_key, sender="USA-P1",
                              topic="bench.tput", payload=payload, label=lab, prec=0, ttl=3600,
                              recipient_keys=recipients, now_ms=now)

    return envelope(os.urandom(fit_payload(envelope, size))), sender.sign_public


def verify_rate(raw: bytes, public: bytes, seconds: float) -> tuple[float, int]:
    """PyNaCl Ed25519 verifications per second of the envelope's signature."""
    env = Envelope.from_bytes(raw)
    key = nacl.signing.VerifyKey(public)
    signed = crypto.DOMAIN_ENVELOPE + env.body
    return _rate(lambda: key.verify(signed, env.sig), seconds)


def unpack_verify_hash_rate(raw: bytes, public: bytes, seconds: float) -> tuple[float, int]:
    """Envelopes per second through parse, signature check and digest."""
    def once() -> None:
        env = Envelope.from_bytes(raw)
        env.verify(public)
        envelope_digest(env.raw)
    return _rate(once, seconds)


def echo_app() -> web.Application:
    """An aiohttp WebSocket echo server (``/echo``), for :class:`ChildServer`."""
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        # The client closes with echoes still in flight: the writes after that are not errors.
        with contextlib.suppress(ConnectionResetError):
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/echo", echo)
    return app


async def _echo_client(port: int, size: int, seconds: float) -> tuple[float, int]:
    payload = os.urandom(size)
    window = asyncio.Semaphore(ECHO_WINDOW)
    echoed = 0
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"http://127.0.0.1:{port}/echo") as ws:
        async def read() -> None:
            nonlocal echoed
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    echoed += 1
                    window.release()

        reader = asyncio.create_task(read())
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await window.acquire()
            await ws.send_bytes(payload)
        elapsed = time.perf_counter() - start
        count = echoed
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return count / elapsed, count


def ws_echo_rate(size: int, seconds: float) -> tuple[float, int, float]:
    """Echoed messages per second, the count, and the server's CPU share."""
    with ChildServer(echo_app) as server:
        cpu_before = server.cpu_seconds()
        started = time.perf_counter()
        rate, count = _run_async(_echo_client(server.port, size, seconds))
        share = (server.cpu_seconds() - cpu_before) / (time.perf_counter() - started)
    return rate, count, share


def _run_async(coro: Any) -> Any:
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)  # pragma: no cover - uvloop is a dependency on Linux


def relay_rate(bench: Run) -> LoadResult:
    """The throughput plan, ``messages`` of it, through a fresh relay."""
    with Relay() as relay:
        return run_load(throughput.plan(bench, relay.url, bench.options.messages), relay)


def run(bench: Run) -> dict[str, Any]:
    """Measure the four limits."""
    seconds, size = bench.options.limit_seconds, bench.options.size
    raw, public = sample_envelope(size)
    verify, verified = verify_rate(raw, public, seconds)
    unpack, unpacked = unpack_verify_hash_rate(raw, public, seconds)
    echo, echoed, echo_cpu = ws_echo_rate(size, seconds)
    relay = relay_rate(bench)
    audit_base = bench.workdir / "limits-audit"
    audit_base.mkdir()
    audit_us = bench_audit.audit_cpu_per_message(
        audit_base, min(AUDIT_MESSAGES, max(bench.options.messages, 100)))
    if relay.errors or relay.copies != relay.expected_copies:
        raise RuntimeError(f"the relay lost messages: {relay.copies} of "
                           f"{relay.expected_copies} copies, errors {relay.errors}")
    result = {
        "status": "ok", "count": verified + unpacked + echoed + relay.messages,
        "envelope_bytes": len(raw), "seconds_each": seconds,
        "ed25519_verify_per_s": round(verify, 1),
        "unpack_verify_hash_per_s": round(unpack, 1),
        "ws_echo_per_s": round(echo, 1), "ws_echo_server_cpu_share": round(echo_cpu, 3),
        "ws_echo_window": ECHO_WINDOW, "ws_echo_bytes": size,
        "relay_per_s": round(relay.messages_per_s, 1), "relay_messages": relay.messages,
        "relay_cpu_us_per_message": round(relay.cpu_us_per(relay.messages), 1),
        "relay_cpu_share": round(relay.broker_cpu_share, 3),
        "relay_load_cpu_us_per_message": round(relay.load_cpu_us_per_message, 1),
        "audit_cpu_us_per_message": round(audit_us, 1),
    }
    result["budget"] = budget(result, os.cpu_count() or 1)
    return result
