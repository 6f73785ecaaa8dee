"""The admin listener: an aiohttp application on its own port, around the broker it steers.

Three middlewares, outermost first: a request id (bound into every log line of the request and
echoed as ``X-Request-Id``), authentication and role check (each route declares the permission
it needs), and the mapping of every failure to a JSON ``{error, detail}`` body with the right
status — 401 with ``WWW-Authenticate`` for a missing or unknown token, 403 for a wrong role,
503 when storage refuses, 500 (logged, detail withheld) for a bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from broker.admin.auth import TokenTable
from broker.config import AdminToken
from broker.errors import BrokerError, StorageError
from broker.listener import StallWatchdog, close_listener, http_server_kwargs
from policies.bundle import Bundle

if TYPE_CHECKING:
    from broker.server import BrokerServer

log = structlog.get_logger("broker.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclasses.dataclass
class AdminContext:
    """What the handlers reach: the broker, and how to reload its policy from disk."""

    broker: BrokerServer
    reload: Callable[[], Awaitable[Bundle]] | None
    started: float = dataclasses.field(default_factory=time.monotonic)


CONTEXT = web.AppKey("context", AdminContext)
TOKEN = web.RequestKey("admin_token", AdminToken)
REQUEST_ID = web.RequestKey("request_id", str)


class ApiError(Exception):
    """An error answer: HTTP ``status``, machine ``error`` code, human ``detail``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def requires(permission: str | None) -> Callable[[Handler], Handler]:
    """Declare the permission a route needs (``None``: public, e.g. health checks)."""
    def mark(handler: Handler) -> Handler:
        handler.permission = permission  # type: ignore[attr-defined]
        return handler
    return mark


def json_error(status: int, error: str, detail: str) -> web.Response:
    response = web.json_response({"error": error, "detail": detail}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="coalition-admin"'
    return response


def token_of(request: web.Request) -> AdminToken:
    """The authenticated token of a request (routes that need a permission have one)."""
    return request[TOKEN]


@web.middleware
async def _request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = given if _REQUEST_ID.match(given) else "req-" + secrets.token_hex(6)
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(request_id=request[REQUEST_ID]):
        response = await handler(request)
        token = request.get(TOKEN)
        log.info("admin_request", method=request.method, path=request.path,
                 status=response.status, token=token.name if token else None,
                 ms=round((time.perf_counter() - started) * 1000, 1))
    return response


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Set ``X-Request-Id`` as the headers go out: a streamed answer (the export) has sent
    them before the middleware sees it return."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


_UNDECLARED = object()


def _auth(tokens: TokenTable) -> Middleware:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)  # no route: the 404/405 aiohttp answers itself
        # Fail closed: a route whose handler declares no permission is refused, not public.
        permission = getattr(request.match_info.handler, "permission", _UNDECLARED)
        if permission is _UNDECLARED:
            log.error("admin_route_without_permission", path=request.path)
            raise ApiError(403, "forbidden", "this route declares no permission")
        if permission is None:
            return await handler(request)  # public by declaration (health, OpenAPI)
        assert isinstance(permission, str)
        token = tokens.identify(request.headers.get("Authorization"))
        if token is None:
            raise ApiError(401, "unauthorized", "a valid bearer token is required")
        request[TOKEN] = token  # known from here: a refused attempt is logged with its name
        if not tokens.allows(token, permission):
            raise ApiError(403, "forbidden", f"role {token.role} may not {permission}")
        return await handler(request)
    return authenticate


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.error, exc.detail)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = json_error(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110 §15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except StorageError as exc:
        return json_error(503, exc.code, exc.reason)
    except BrokerError as exc:
        return json_error(400, exc.code, exc.reason)
    except Exception:
        log.exception("admin_request_failed", path=request.path)
        return json_error(500, "internal", "the broker failed on this request (logged)")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large",
               400: "bad_request"}


def _body_deadline(timeout: float) -> Middleware:
    """Read a request's body (at most ``client_max_size``) within ``timeout`` seconds, before
    the handler runs: aiohttp bounds the head (``keepalive_timeout``) but not the body, so a
    client could otherwise hold a handler by sending its body one byte at a time. On time-out:
    408, and the connection is closed."""
    @web.middleware
    async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(timeout):
                    await request.read()  # kept by aiohttp for request.json() and friends
            except TimeoutError:
                log.warning("admin_body_timeout", path=request.path, remote=request.remote,
                            timeout=timeout)
                response = json_error(408, "request_timeout",
                                      f"the request body did not arrive within {timeout:g} s")
                response.force_close()
                return response
        return await handler(request)
    return body_deadline


def make_app(context: AdminContext, tokens: TokenTable, *,
             request_timeout_s: float = 10.0) -> web.Application:
    """The admin application, every route registered. ``request_timeout_s`` bounds the time a
    request body may take to arrive."""
    from broker.admin import audit_views, openapi, views  # the views import this module

    app = web.Application(middlewares=[_request_ids, _errors, _body_deadline(request_timeout_s),
                                       _auth(tokens)],
                          client_max_size=64 * 1024)
    app[CONTEXT] = context
    app.on_response_prepare.append(_echo_request_id)
    views.register(app.router)
    audit_views.register(app.router)
    openapi.register(app.router)
    return app


class AdminServer:
    """The admin listener of one broker: ``start`` returns once it accepts connections."""

    def __init__(self, context: AdminContext, tokens: TokenTable, *, host: str = "127.0.0.1",
                 port: int = 8471, request_timeout_s: float = 10.0,
                 write_stall_timeout_s: float = 30.0) -> None:
        """``request_timeout_s``: time to send a request head, then its body, and the idle time
        of a keep-alive connection; ``write_stall_timeout_s``: how long a client may leave its
        answer unread before the connection is aborted (see :mod:`broker.listener`)."""
        self.app = make_app(context, tokens, request_timeout_s=request_timeout_s)
        self.host, self.port = host, port
        self.request_timeout_s = request_timeout_s
        self.write_stall_timeout_s = write_stall_timeout_s
        self._runner: web.AppRunner | None = None
        self._watchdog: StallWatchdog | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        # A client that stops reading (a stalled export) must not hold up the broker's
        # shutdown past the service manager's stop timeout.
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     shutdown_timeout=2.0,
                                     **http_server_kwargs(self.request_timeout_s))
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except BaseException:
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]
        self._watchdog = StallWatchdog(self._runner, self.write_stall_timeout_s,
                                       listener="admin")
        self._watchdog.start()
        log.info("admin_ready", url=self.url)

    async def stop(self) -> None:
        await close_listener(self._watchdog, self._runner)
        self._watchdog = self._runner = None

    async def __aenter__(self) -> AdminServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
