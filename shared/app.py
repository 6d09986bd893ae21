"""App scaffolding every service uses: request ids, metrics, health, internal trust."""

from __future__ import annotations

import ctypes
import gc
import hashlib
import hmac
import inspect
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.health import health_router
from shared.logs import bind_tenant, request_id_var
from shared.metrics import instrument

REQUEST_ID_HEADER = "X-Request-ID"
INTERNAL_TOKEN_HEADER = "X-Churnguard-Internal-Token"
TENANT_HEADER = "X-Churnguard-Tenant"

log = logging.getLogger(__name__)
# Metrics are Prometheus (shared.metrics); FastAPI's native OpenTelemetry support (newer FastAPI
# versions) would otherwise look up the global providers on every request.
_NO_OPENTELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {}
)
# A caller's request id travels to every service and into logs: accept only a plain token.
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}\Z")
_REQUEST_ID_RAW = REQUEST_ID_HEADER.lower().encode("latin-1")


def create_service_app(
    service: str,
    *,
    title: str,
    description: str,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]],
    internal_token: str,
    api_docs: bool = True,
) -> FastAPI:
    """`api_docs=False` drops FastAPI's own /openapi.json, /docs and /redoc (the gateway serves
    a merged description instead; production may turn docs off altogether)."""
    docs = {} if api_docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title=title, description=description, version="0.1.0", lifespan=lifespan, **docs,
                  **_NO_OPENTELEMETRY)
    app.state.internal_token = internal_token
    app.state.readiness = {}
    app.add_middleware(_HotRoutes)  # first added: innermost, inside the metrics and request ids
    instrument(app, service)
    app.include_router(health_router())

    app.add_middleware(_RequestIdMiddleware)
    return app


YOUNG_GC_THRESHOLD = 10_000
FULL_GC_THRESHOLD = 100
"""Middle-generation collections between two full ones (CPython's default is 10)."""


def freeze_heap() -> None:
    """Take what is alive now (imports, the app, clients, a model just loaded) out of the cyclic
    collector's sight: full collections walk every tracked object, and serving allocates enough
    to set them off often. Cyclic garbage is collected first, since frozen cycles would never
    be; objects freed by reference counting (an old model, evicted caches) go as before."""
    gc.collect()
    gc.freeze()


@contextmanager
def settled_heap(
    young_threshold: int | None = YOUNG_GC_THRESHOLD, full_threshold: int | None = FULL_GC_THRESHOLD,
) -> Iterator[None]:
    """For a serving process's lifetime (wrap a lifespan's `yield`): what startup built
    (modules, the app, clients) is frozen out of the cyclic collector's sight, its youngest
    generation is collected after `young_threshold` net allocations instead of 700, and a full
    collection waits for `full_threshold` middle-generation ones instead of 10.

    Under load the requests in flight alone hold more than 700 container objects, so the default
    kept collecting live requests, aging them into older generations and into full collections
    of the whole heap: measured in the gateway at 64 connections, ~27 us of CPU per request
    (a tenth of it) and pauses of the whole loop. Requests leave next to no cyclic garbage, so
    the larger threshold holds back little memory. Undone on exit (tests start many apps in
    one process; a frozen app would never be collected).

    Why full collections wait longer: CPython also holds one back until the objects promoted
    since the last exceed a quarter of the long-lived ones, but freezing leaves few long-lived
    objects, so batches alive across two collections (scoring: a 1,000-event poll's records,
    histories and scores) set one off every few hundred ms, each walking everything alive (10-30
    ms with the history cache). Measured in scoring's bench: time in the collector over a run
    722 -> 174 ms, peak RSS unchanged (236 -> 237 MB). None keeps CPython's value, for either."""
    previous = gc.get_threshold()
    freeze_heap()
    gc.set_threshold(
        previous[0] if young_threshold is None else young_threshold,
        previous[1],
        previous[2] if full_threshold is None else full_threshold,
    )
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


class FreeMemoryReturner:
    """Hands the C allocator's free memory back to the operating system (glibc's `malloc_trim`),
    at most once per `interval_s`, from the thread that just finished a batch.

    glibc keeps what a batch freed for the next one. In scoring's bench (100,000 events of
    10,000 customers, most histories read from the database) that left 22-25 MB more resident at
    the end of the backlog and its peak 2-6 MB higher; with 2,000 customers 5 MB. No CPU cost
    per event the bench could tell (a call takes 0.2-0.8 ms, outside the interpreter lock; at
    most ten a second). Python's own small-object arenas go back by themselves once empty.
    Without glibc (musl, macOS) it does nothing."""

    def __init__(self, interval_s: float = 0.1, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._monotonic = monotonic
        self._last: float | None = None
        self._trim = _malloc_trim()

    def __call__(self) -> bool:
        """True when it asked the allocator to give memory back."""
        now = self._monotonic()
        if self._trim is None or (self._last is not None and now - self._last < self.interval_s):
            return False
        self._last = now
        self._trim(0)
        return True


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def hot_route(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Marks an endpoint of the form `async def endpoint(request) -> Response` (no dependencies,
    no parameters but the request, no path parameters) as a hot path: once FastAPI has routed one
    request to it, later requests to the same method and path are handed to it directly (see
    _HotRoutes)."""
    endpoint.__churnguard_hot_route__ = True  # type: ignore[attr-defined]
    return endpoint


class _HotRoutes:
    """Direct dispatch for endpoints marked with `hot_route`.

    FastAPI's routing (matching every route in turn), its exception and exit-stack middlewares
    and its per-request handler cost more CPU than ingesting one event did; for an endpoint that
    takes only the request they add nothing. The route is learned from a request FastAPI routed
    itself (so the route table alone decides what is served where), then reused for that
    method and path: the same endpoint, the same route object in `scope["route"]` (the metrics'
    route label), HTTPException answered by the app's own handler, anything else left to the
    server-error middleware outside, as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._known: dict[tuple[str, str], APIRoute] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope["path"])
        route = self._known.get(key)
        if route is not None and not scope.get("root_path"):
            await self._dispatch(route, scope, receive, send)
            return
        await self.app(scope, receive, send)
        route = scope.get("route")
        if (isinstance(route, APIRoute) and getattr(route.endpoint, "__churnguard_hot_route__", False)
                and route.path == scope["path"] and scope["method"] in route.methods
                and not scope.get("root_path")):
            self._known[key] = route

    @staticmethod
    async def _dispatch(route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, {}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except StarletteHTTPException as exc:
            handler = scope["app"].exception_handlers.get(StarletteHTTPException, http_exception_handler)
            response = await handler(request, exc)
        await response(scope, receive, send)


class _RequestIdMiddleware:
    """Accepts a plain caller request id or makes one; it is in `request.state.request_id` and
    in the response. Plain ASGI: BaseHTTPMiddleware costs a task and a stream per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for name, value in scope["headers"] if name.lower() == _REQUEST_ID_RAW), b"")
        # 128 random bits as 32 hex digits, as uuid4().hex gave, at a fifth of its cost
        request_id = incoming.decode("latin-1") if _REQUEST_ID.match(incoming) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        bound = request_id_var.set(request_id)  # every log line of this request carries it
        header = (_REQUEST_ID_RAW, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Ours replaces any the app set (as MutableHeaders would, at a fraction of the cost).
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != _REQUEST_ID_RAW), header
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(bound)


async def internal_tenant(
    request: Request,
    tenant: Annotated[str | None, Header(alias=TENANT_HEADER, include_in_schema=False)] = None,
    token: Annotated[str | None, Header(alias=INTERNAL_TOKEN_HEADER, include_in_schema=False)] = None,
) -> str:
    """Services trust only the gateway: it proves itself with the internal token and says
    which tenant the caller's API key belongs to."""
    return _trusted(request, tenant, token)


def trusted_tenant(request: Request) -> str:
    """`internal_tenant` as a plain call, for hot routes that skip FastAPI's dependency
    resolution (it cost more per request than the check itself)."""
    headers = request.headers
    return _trusted(request, headers.get(TENANT_HEADER), headers.get(INTERNAL_TOKEN_HEADER))


def _trusted(request: Request, tenant: str | None, token: str | None) -> str:
    expected: str = request.app.state.internal_token
    # Digests of equal length, compared in constant time: not even the token's length leaks
    # (compare_digest returns early on a length mismatch).
    if token is None or not hmac.compare_digest(_digest(token), _digest(expected)):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "this service only accepts requests from the gateway")
    if not tenant:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"missing {TENANT_HEADER} header")
    bind_tenant(tenant)
    return tenant


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


TenantId = Annotated[str, Depends(internal_tenant)]


def is_json_media_type(content_type: str) -> bool:
    """application/json or any application/...+json, parameters (charset) aside."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


async def read_body_limited(request: Request, limit: int) -> bytes:
    """Read the body as it streams in and stop past `limit`: a chunked body with no
    Content-Length is never held in memory beyond the limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)
