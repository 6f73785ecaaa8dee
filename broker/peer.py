"""One node connection of the listener: a non-blocking ``send`` backed by its own writer task.

The hub and the witnesses call :meth:`WsPeer.send` from the event loop and never wait: frames go
into a bounded queue that one task per connection writes out, all frames queued by then with
one transport write (:mod:`broker.wsframe`), waiting while the transport's buffer is full. A
peer that stops reading while it keeps the broker busy fills that queue and is cut off
(``rate_limited``) instead of growing the broker's memory; one whose socket stays unwritable
is aborted by the listener's stall watchdog (:mod:`broker.listener`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import structlog
from aiohttp import WSCloseCode, web

from broker import wire, wsframe
from broker.guard import Ticket

log = structlog.get_logger("broker.server")

#: WebSocket close codes by the reason the broker gives (the close message is the reason).
CLOSE_CODES = {"too_large": WSCloseCode.MESSAGE_TOO_BIG, "unavailable": WSCloseCode.GOING_AWAY,
               "idle_timeout": WSCloseCode.GOING_AWAY, "replaced": WSCloseCode.POLICY_VIOLATION,
               "internal": WSCloseCode.INTERNAL_ERROR, "normal": WSCloseCode.OK}

#: Frames are joined into one transport write until their payloads reach this many bytes (so
#: a write is at most this plus one frame; the rest waits for the next write, after the buffer
#: has drained if it is full): a long queue is not copied into one huge buffer.
MAX_WRITE_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class _Pong:
    """A WebSocket-level pong owed to the peer (its ping went through the rate limit)."""

    data: bytes


@dataclasses.dataclass(frozen=True)
class _Close:
    code: str
    reason: str


class WsPeer:
    """One WebSocket connection, authenticated (``node`` set) or still in its handshake."""

    def __init__(self, ws: web.WebSocketResponse, request: web.BaseRequest, conn_id: str,
                 max_outbound: int, ticket: Ticket) -> None:
        self.ws = ws
        # Frames are written to the request's transport; its writer's drain is the transport's
        # flow control (aiohttp's WebSocket writer uses the same protocol).
        self._transport = request.transport
        self._drain = request.writer.drain
        self.conn_id = conn_id
        self.node = ""
        #: The connection guard's record of this connection (see :mod:`broker.guard`).
        self.ticket = ticket
        self._out: asyncio.Queue[bytes | _Pong | _Close] = asyncio.Queue()
        self._max_outbound = max_outbound
        self.closing = False
        self._task = asyncio.create_task(self._write_loop(), name=f"ws-writer-{conn_id}")
        #: The close of a peer cut off for not reading (:meth:`_put`), once started.
        self._closer: asyncio.Task[None] | None = None

    def send(self, frame: wire.Frame) -> None:
        """Queue a frame (dropped once the connection is closing)."""
        self._put(wire.encode_frame(frame))

    def pong(self, data: bytes) -> None:
        """Queue the answer to a WebSocket ping."""
        self._put(_Pong(data))

    def _put(self, item: bytes | _Pong) -> None:
        if self.closing:
            return
        if self._out.qsize() >= self._max_outbound:
            # The peer does not read what it asks for: cut it off rather than buffer without
            # bound. The close bypasses the full queue.
            log.warning("peer_not_reading", conn=self.conn_id, node=self.node,
                        queued=self._out.qsize())
            self.closing = True
            # The writer is not cancelled: it may be waiting for the transport to drain, and
            # cancelling that wait cancels the protocol's one drain waiter, which the close
            # would then await. It stops by itself once the WebSocket is closed.
            self._closer = asyncio.create_task(self._abort())
            return
        self._out.put_nowait(item)

    def close(self, code: str, reason: str) -> None:
        """Close after everything already queued has been written."""
        if not self.closing:
            self.closing = True
            self._out.put_nowait(_Close(code, reason))

    async def aclose(self) -> None:
        """Close normally and wait (briefly) for the writer, and a cut-off's close, to end."""
        self.close("normal", "connection ended")
        for task in (self._task, self._closer):
            if task is None:
                continue
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(asyncio.shield(task), timeout=2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task

    async def _abort(self) -> None:
        # Without waiting for the buffer to drain: this peer does not read it.
        await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"rate_limited",
                            drain=False)

    async def _write_loop(self) -> None:
        while True:
            taken = await self._out.get()
            control: _Pong | _Close | None = None
            try:
                if isinstance(taken, bytes):
                    payloads, control = self._take_frames(taken)
                    self._write_frames(payloads)
                    await self._drain()
                else:
                    control = taken
                if isinstance(control, _Pong):
                    await self.ws.pong(control.data)
            except (ConnectionError, RuntimeError):
                self.closing = True
                return
            if isinstance(control, _Close):
                await self.ws.close(code=CLOSE_CODES.get(control.code,
                                                         WSCloseCode.POLICY_VIOLATION),
                                    message=control.code.encode())
                return

    def _take_frames(self, first: bytes) -> tuple[list[bytes], _Pong | _Close | None]:
        """``first`` and the frames queued behind it, up to :data:`MAX_WRITE_BYTES`; and the
        control item that stopped the run, if one did (it goes out after these frames)."""
        payloads, size = [first], len(first)
        while size < MAX_WRITE_BYTES and not self._out.empty():
            item = self._out.get_nowait()
            if not isinstance(item, bytes):
                return payloads, item
            payloads.append(item)
            size += len(item)
        return payloads, None

    def _write_frames(self, payloads: list[bytes]) -> None:
        transport = self._transport
        # No data frame after the close frame (RFC 6455 §5.5.1), whoever started the close.
        if self.ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("the connection is closing")
        transport.write(wsframe.binary_frames(payloads))
