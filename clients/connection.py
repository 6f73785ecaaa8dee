"""The transport under a gateway client: one authenticated WebSocket at a time, re-established
with backoff when it drops for a reason a new connection can cure.

:func:`clients.link.authenticate` opens a WebSocket and runs the handshake (challenge, signed
hello, welcome). :class:`Connection` keeps one :class:`~clients.link.Link` up: it matches
answers to requests (:mod:`clients.control`), hands every other frame to its owner and, when
the link ends, fails the requests in flight, then either reconnects with
:class:`~clients.link.Backoff` or ends for good. It ends for good after
:meth:`Connection.close`, when the broker closes with a reason in
:data:`~clients.link.FINAL_CLOSE_REASONS`, when a reconnection is refused for a reason not in
:data:`~clients.link.RETRYABLE_REFUSALS`, when the owner's frame handler fails, when control
answers are out of step without reconnection, or at the first drop if reconnection is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import structlog

from broker import wire
from clients.control import CONTROL_ANSWERS
from clients.link import (
    FINAL_CLOSE_REASONS,
    RETRYABLE_REFUSALS,
    AuthenticationError,
    Backoff,
    ConnectionClosed,
    Endpoint,
    GatewayError,
    Link,
    RequestRejected,
    RequestTimeout,
    authenticate,
)

log = structlog.get_logger("clients.connection")

class Connection:
    """Keeps one :class:`Link` up for its owner (see the module docstring) and matches the
    broker's answers to requests.

    ``on_link`` runs for every new link before requests may use it (the owner checks the
    welcome and re-sends its subscriptions); ``on_frame`` gets every frame that is not an
    answer; ``on_end`` runs once, when the connection ends for good.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        reconnect: Backoff | None,
        on_frame: Callable[[wire.Frame], None],
        on_link: Callable[[Link], Awaitable[None]],
        on_end: Callable[[GatewayError], None],
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.reconnect = reconnect
        self._on_frame = on_frame
        self._on_link = on_link
        self._on_end = on_end
        self._rng = rng or random.Random()
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.link: Link | None = None
        #: Why the connection is not usable for good; ``None`` while it is up or reconnecting.
        self.failure: GatewayError | None = ConnectionClosed("not connected")
        #: Set while a link is up or the connection ended for good: what :meth:`ready` waits for.
        self._settled = asyncio.Event()
        self.reconnections = 0
        self.generation = 0
        # Who waits for an answer: a message id for a receipt, ``None`` for the control channel.
        self._waiters: dict[bytes | None, asyncio.Future[wire.Frame]] = {}
        #: One control request at a time (answers come in order, without an id); taken
        #: within the request's deadline.
        self._control = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        #: The frame :meth:`confirm_soon` will send next (the latest replaces one not sent).
        self._soon: wire.Frame | None = None
        self._soon_task: asyncio.Task[None] | None = None

    async def open(self) -> Link:
        """The first connection; its errors propagate (it is not retried)."""
        if self._http is not None:
            raise RuntimeError("already connected")
        self.failure = None
        self._http = aiohttp.ClientSession()
        try:
            link = await authenticate(self._http, self.endpoint)
            await self._on_link(link)
        except BaseException as exc:
            self._end(exc if isinstance(exc, GatewayError)
                      else ConnectionClosed(f"connection failed: {exc!r}"))
            await self._http.close()
            self._http = None
            raise
        self._up(link)
        self._task = asyncio.create_task(self._supervise(link),
                                         name=f"gateway-{self.endpoint.identity.name}")
        return link

    async def ready(self) -> Link:
        """The current link; while reconnecting, wait for the next one (the caller bounds the
        wait). :class:`ConnectionClosed` once the connection ended for good."""
        while True:
            if self.link is not None:
                return self.link
            if self.failure is not None:
                raise self.closed_error()
            await self._settled.wait()

    def closed_error(self) -> ConnectionClosed:
        """A fresh :class:`ConnectionClosed` saying why the connection ended for good."""
        failure = self.failure or ConnectionClosed("connection closed")
        error = ConnectionClosed(failure.reason, code=failure.code)
        error.__cause__ = failure
        return error

    async def close(self) -> None:
        """End for good and release everything (idempotent)."""
        self._end(ConnectionClosed("client closed"))
        if self.link is not None:
            await self.link.ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Sends and confirmations still going, on a link now closed: nothing left to do.
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- requests -----------------------------------------------------------------------

    async def request(self, *frames: wire.Frame, key: bytes | None = None) -> wire.Frame:
        """Send ``frames`` on one link and await the answer for ``key`` (a message id for a
        receipt, ``None`` for a control answer: see :meth:`control`). One deadline, the
        endpoint's ``timeout``, covers waiting for a (re)connection, sending and the answer:
        :class:`RequestTimeout`. :class:`ConnectionClosed` if the link drops meanwhile (the
        request was in flight), :class:`RequestRejected` for an ``error`` answer."""
        return _answer(await self._ask(frames, key))

    async def _ask(self, frames: Sequence[wire.Frame], key: bytes | None) -> _Asked:
        """:meth:`request`, returning the ``error`` answer too, with the link it came on. A
        control request (``key`` ``None``) takes the control lock first, within its
        deadline, and holds it until its answer is settled."""
        future: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        sent_on: Link | None = None
        locked = False
        pongs = 0
        try:
            async with asyncio.timeout(self.endpoint.timeout):
                if key is None:
                    await self._control.acquire()
                    locked = True
                link = await self.ready()
                # No await between taking the link and registering: if it drops from now on,
                # _fail_waiters fails the future.
                self._waiters[key] = future
                pongs = link.answers.pongs
                if frames:
                    # All of them or none: given up halfway (a sub written, its ping not),
                    # nobody could tell which answers are still to come. The broker may
                    # answer from the first write on.
                    after = link.control_sending if key is None else None
                    sending = asyncio.ensure_future(self._send_all(link, frames, after))
                    self._background.add(sending)
                    sending.add_done_callback(self._background_done)
                    if key is None:
                        link.control_sending = sending
                    sent_on = link
                    await asyncio.shield(sending)
                answer = await future
        except TimeoutError as exc:
            raise RequestTimeout(f"no answer within {self.endpoint.timeout} s") from exc
        finally:
            if self._waiters.get(key) is future:
                del self._waiters[key]
            answered = future.done() and not future.cancelled()
            if answered:
                future.exception()  # retrieved: failing a waiter nobody awaits is not an error
            elif key is None and sent_on is not None and sent_on is self.link:
                self._abandon(sent_on, through_pong=isinstance(frames[-1], wire.Ping))
            if locked:
                self._control.release()
        return _Asked(link, answer, pongs)

    @staticmethod
    async def _send_all(link: Link, frames: Sequence[wire.Frame],
                        after: asyncio.Future[None] | None) -> None:
        if after is not None and not after.done():
            await asyncio.wait([after])  # its failure is its own request's
        for frame in frames:
            await link.send(frame)

    def _abandon(self, link: Link, *, through_pong: bool) -> None:
        """A control request on ``link`` was given up after it was sent: its answer, still to
        come, is dropped when it does. If an earlier given-up one's is still owed too, the
        broker is not answering in the time allowed, or an answer the count expected will
        not come: the count cannot be trusted (:meth:`_out_of_step`)."""
        if link.answers.given_up:
            self._out_of_step(link, "a second control request was given up while an answer "
                                    "to an earlier one is still owed")
            return
        link.answers.owe(through_pong=through_pong, given_up=True)

    def _out_of_step(self, link: Link, reason: str) -> None:
        """Which control answer is whose cannot be told any more on ``link``: a new link
        starts in step (the broker sends again what it had in flight on this one). Without
        reconnection the connection ends (``out_of_step``): no later answer on this link
        could be trusted to be its request's own. Nothing to do once ``link`` is not the
        current one."""
        if link is not self.link:
            return
        log.warning("gateway_control_out_of_step", node=self.endpoint.identity.name,
                    reason=reason)
        link.answers.clear()
        if self.reconnect is None:
            self._end(ConnectionClosed(f"control answers out of step: {reason}",
                                       code="out_of_step"))
        self._retire(link)
        task = asyncio.ensure_future(self._close_link(link))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    @staticmethod
    async def _close_link(link: Link) -> None:
        await link.ws.close()

    def _retire(self, link: Link) -> None:
        """No request may use ``link`` from now on (it is being closed): :meth:`ready` waits
        for the next one."""
        if self.link is link:
            self.link = None
            if self.failure is None:
                self._settled.clear()

    async def control(self, *frames: wire.Frame,
                      expect: type[wire.Frame] | None = None) -> wire.Frame:
        """A control request: its answer carries no id and answers come in request order, so
        one at a time. An answer that is not an ``expect`` frame means the order was lost (an
        answer went to the wrong request): ``RequestRejected`` (``bad_frame``) and a new link
        (:meth:`_out_of_step`)."""
        asked = await self._ask(frames, None)
        answer = _answer(asked)
        if expect is not None and not isinstance(answer, expect):
            self._out_of_step(asked.link, f"'{answer.T}' answered '{frames[-1].T}'")
            raise RequestRejected(f"unexpected answer '{answer.T}' to '{frames[-1].T}'",
                                  code="bad_frame")
        return answer

    async def confirmed(self, frame: wire.Frame) -> None:
        """Send a frame that has no answer, then a ping: the pong confirms it was processed."""
        asked = await self._ask((frame, wire.Ping()), None)
        if isinstance(asked.answer, wire.Error) and asked.link.answers.pongs == asked.pongs:
            # The broker still answers the ping: come already (with the error, and thrown away
            # by _resolve), or still to come on that link — then dropped when it does, or the
            # next control request would take it for its own. (Waiting for it here waited out
            # the whole timeout when it had come with the error.)
            asked.link.answers.owe(through_pong=True)
        answer = _answer(asked)
        if not isinstance(answer, wire.Pong):
            self._out_of_step(asked.link, f"'{answer.T}' answered '{frame.T}' and 'ping'")
            raise RequestRejected(f"unexpected answer '{answer.T}'", code="bad_frame")

    def confirm_soon(self, frame: wire.Frame) -> None:
        """:meth:`confirmed` in the background (from a frame handler, which must not block):
        the broker's refusal is its answer, not the next request's; a refusal or failure is
        logged. One at a time, and only the latest waits (it replaces one not yet sent: for
        a cosignature, the latest checkpoint is the one that counts); nothing while no link
        is up (the broker offers its latest checkpoint to every new link)."""
        if self.link is None:
            log.info("background_request_dropped", node=self.endpoint.identity.name,
                     frame=frame.T, reason="not connected")
            return
        self._soon = frame
        if self._soon_task is None or self._soon_task.done():
            self._soon_task = asyncio.ensure_future(self._confirm_latest())
            self._background.add(self._soon_task)
            self._soon_task.add_done_callback(self._background_done)

    async def _confirm_latest(self) -> None:
        while self._soon is not None:
            frame, self._soon = self._soon, None
            try:
                await self.confirmed(frame)
            except GatewayError as exc:
                log.warning("background_request_failed", node=self.endpoint.identity.name,
                            frame=frame.T, code=exc.code, reason=exc.reason)

    async def recycle(self, reason: str) -> None:
        """Drop the current link so that a new one is made (the broker takes back what it had
        in flight on it and sends it again); nothing happens without reconnection."""
        link = self.link
        if link is not None and self.reconnect is not None:
            log.warning("gateway_recycling_link", node=self.endpoint.identity.name,
                        reason=reason)
            self._retire(link)
            await link.ws.close()

    async def send_now(self, frame: wire.Frame) -> None:
        """Send on the current link, without waiting for a reconnection."""
        if self.link is None:
            raise self.closed_error() if self.failure is not None \
                else ConnectionClosed("not connected right now")
        await self.link.send(frame)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_send_failed", reason=str(task.exception()))

    def _received(self, link: Link, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Receipt):
            self._resolve(frame.id, frame)
        elif isinstance(frame, wire.Error) and frame.ref is not None:
            if frame.ref in self._waiters:
                self._resolve(frame.ref, frame)
            else:  # for a publish given up (timed out): never a control answer
                log.info("late_error_dropped", code=frame.code, ref=frame.ref.hex())
        elif isinstance(frame, CONTROL_ANSWERS):
            if link.answers.arrived(frame):  # owed to nobody: a request given up, say
                if isinstance(frame, wire.Error):
                    log.warning("late_error_dropped", code=frame.code, reason=frame.reason)
                else:
                    log.info("late_answer_dropped", frame=frame.T)
                return
            if isinstance(frame, wire.Error) and None not in self._waiters:
                log.error("broker_error", code=frame.code, reason=frame.reason)
            self._resolve(None, frame)
        else:
            self._on_frame(frame)

    def _resolve(self, key: bytes | None, frame: wire.Frame) -> None:
        future = self._waiters.get(key)
        if future is not None and not future.done():
            future.set_result(frame)

    def _fail_waiters(self, reason: str) -> None:
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(ConnectionClosed(reason))

    # --- the link's life ----------------------------------------------------------------

    def _up(self, link: Link) -> None:
        self.link = link
        #: Which link frames came on: deliveries of an earlier link are stale (the broker
        #: took them back when it ended and sends them again on this one).
        self.generation += 1
        self._settled.set()

    def _down(self, link: Link) -> None:
        self.link = None
        if self.failure is None:
            self._settled.clear()
        log.info("gateway_disconnected", node=self.endpoint.identity.name,
                 code=link.ws.close_code, reason=link.close_reason)
        self._fail_waiters(link.describe())

    def _end(self, failure: GatewayError) -> None:
        if self.failure is not None:
            return
        self.failure = failure
        self._settled.set()
        self._fail_waiters(failure.reason)
        self._on_end(failure)

    async def _supervise(self, first: Link) -> None:
        link: Link | None = first
        while link is not None:
            try:
                await link.pump(functools.partial(self._received, link))
            except Exception as exc:
                # A failure in the owner's handler (say, its witness state cannot be written):
                # stop rather than go on half-working.
                log.exception("gateway_failed", node=self.endpoint.identity.name)
                await link.ws.close()
                self._down(link)
                self._end(ConnectionClosed(f"the client failed: {exc}",
                                           code=getattr(exc, "code", "internal")))
                return
            self._down(link)
            final = self._final(link)
            if final is not None:
                if final is not self.failure:  # not the owner's own close()
                    log.error("gateway_ended", node=self.endpoint.identity.name,
                              code=final.code, reason=final.reason)
                self._end(final)
                return
            link = await self._reconnect()

    def _final(self, link: Link) -> GatewayError | None:
        """The error that ends the connection after ``link`` ended, or ``None`` to reconnect."""
        if self.failure is not None:
            return self.failure
        if link.close_reason in FINAL_CLOSE_REASONS:
            return ConnectionClosed(f"{link.describe()}: a newer connection of this node took "
                                    "over", code=link.close_reason)
        if self.reconnect is None:
            return ConnectionClosed(link.describe())
        return None

    async def _reconnect(self) -> Link | None:
        """A new authenticated link, trying until one comes up; ``None`` if refused."""
        assert self.reconnect is not None and self._http is not None
        node = self.endpoint.identity.name
        for attempt, delay in enumerate(self.reconnect.delays(self._rng), start=1):
            await asyncio.sleep(delay)
            try:
                link = await authenticate(self._http, self.endpoint)
            except AuthenticationError as exc:
                if exc.code not in RETRYABLE_REFUSALS:
                    log.error("gateway_refused", node=node, code=exc.code, reason=exc.reason,
                              attempt=attempt)
                    self._end(exc)
                    return None
                log.warning("gateway_reconnect_failed", node=node, attempt=attempt,
                            reason=str(exc))
                continue
            except (OSError, aiohttp.ClientError, TimeoutError, GatewayError) as exc:
                log.warning("gateway_reconnect_failed", node=node, attempt=attempt,
                            reason=str(exc) or type(exc).__name__)
                continue
            try:
                await self._on_link(link)
            except GatewayError as exc:  # the link dropped while subscriptions were re-sent
                log.warning("gateway_reconnect_failed", node=node, attempt=attempt,
                            reason=str(exc))
                await link.ws.close()
                continue
            except Exception as exc:  # the owner's handler failed (say, its witness state)
                log.exception("gateway_failed", node=node)
                await link.ws.close()
                self._end(ConnectionClosed(f"the client failed: {exc}",
                                           code=getattr(exc, "code", "internal")))
                return None
            self._up(link)
            self.reconnections += 1
            log.info("gateway_reconnected", node=node, attempt=attempt)
            return link
        raise AssertionError("unreachable: the backoff is endless")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class _Asked:
    """A request's answer, the link it came on, and that link's count of pongs taken as
    answers when the request was sent."""

    link: Link
    answer: wire.Frame
    pongs: int


def _answer(asked: _Asked) -> wire.Frame:
    """The answer, or :class:`RequestRejected` for an ``error``."""
    if isinstance(asked.answer, wire.Error):
        raise RequestRejected(asked.answer.reason, code=asked.answer.code, ref=asked.answer.ref)
    return asked.answer
