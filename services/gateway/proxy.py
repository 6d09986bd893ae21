"""The route table and the forwarding of one request to its upstream service."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote_from_bytes

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway import metrics
from services.gateway.scopes import ACTIONS_ADMIN, EVENTS_WRITE, MODELS_ADMIN, SCORES_READ
from services.gateway.query_key import without_query_key
from shared.http_pool import Answer, UpstreamBroken, UpstreamPool, UpstreamUnavailable
from shared.app import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER, TENANT_HEADER

log = logging.getLogger(__name__)

Upstream = Literal["ingest", "scoring", "actions"]
ANY_METHOD = ("GET", "POST", "PUT", "PATCH", "DELETE")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


AUDITED_PATHS = frozenset({"/v1/customers/{customer_id}", "/v1/sources/{source}/secret"})  # erasure, secrets


@dataclass(frozen=True)
class ProxyRoute:
    """`path` is a route template; with `prefix`, everything below it goes to the same upstream.
    `scope`: what the caller's key must hold (services/gateway/scopes.py)."""

    path: str
    upstream: Upstream
    methods: tuple[str, ...]
    scope: str
    prefix: bool = False
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]+\}", self.path))
        below = "(/.*)?" if self.prefix else ""
        object.__setattr__(self, "_pattern", re.compile(f"^{regex}{below}$"))

    def audited(self, method: str) -> bool:
        """Writes that change a tenant's configuration or data (not the event stream itself)."""
        if method in ("GET", "HEAD", "OPTIONS"):
            return False
        return self.scope in (ACTIONS_ADMIN, MODELS_ADMIN) or self.path in AUDITED_PATHS

    def templates(self) -> tuple[str, ...]:
        """The paths registered with the router (their templates are the metrics' route label)."""
        return (self.path, f"{self.path}/{{subpath:path}}") if self.prefix else (self.path,)

    def matches(self, method: str, path: str) -> bool:
        """Also true for an upstream's own path template, e.g. `/v1/customers/{id}/score`."""
        return method.upper() in self.methods and bool(self._pattern.match(path))


# The one place that says what the public API is and who serves it.
ROUTE_TABLE: tuple[ProxyRoute, ...] = (
    ProxyRoute("/v1/events", "ingest", ("POST",), EVENTS_WRITE),
    ProxyRoute("/v1/events/batch", "ingest", ("POST",), EVENTS_WRITE),
    ProxyRoute("/v1/schema", "ingest", ("GET",), EVENTS_WRITE),
    ProxyRoute("/v1/sources/shopify/orders", "ingest", ("POST",), EVENTS_WRITE),
    ProxyRoute("/v1/sources/{source}/secret", "ingest", ("PUT", "DELETE"), EVENTS_WRITE),
    ProxyRoute("/v1/customers/{customer_id}", "ingest", ("DELETE",), EVENTS_WRITE),
    ProxyRoute("/v1/customers/{customer_id}/erasure", "ingest", ("GET",), SCORES_READ),
    ProxyRoute("/v1/erasures/{erasure_id}", "ingest", ("GET",), SCORES_READ),
    ProxyRoute("/v1/customers/{customer_id}/score", "scoring", ("GET",), SCORES_READ),
    ProxyRoute("/v1/models", "scoring", ("GET",), SCORES_READ, prefix=True),
    ProxyRoute("/v1/models", "scoring", WRITE_METHODS, MODELS_ADMIN, prefix=True),
    ProxyRoute("/v1/webhooks", "actions", ANY_METHOD, ACTIONS_ADMIN, prefix=True),
    ProxyRoute("/v1/customers/{customer_id}/offers", "actions", ("GET",), SCORES_READ),
    ProxyRoute("/v1/customers/{customer_id}/decisions", "actions", ("GET",), SCORES_READ),
    ProxyRoute("/v1/deliveries", "actions", ANY_METHOD, ACTIONS_ADMIN, prefix=True),
    ProxyRoute("/v1/customers/{customer_id}/state", "actions", ("GET",), SCORES_READ),
    ProxyRoute("/v1/policies", "actions", ("GET", "PUT", "DELETE"), ACTIONS_ADMIN, prefix=True),
    ProxyRoute("/v1/reports/uplift", "actions", ("GET",), SCORES_READ),
)


def route_for(
    method: str, path: str, table: tuple[ProxyRoute, ...] = ROUTE_TABLE
) -> ProxyRoute | None:
    return next((r for r in table if r.matches(method, path)), None)


# Never forwarded: hop-by-hop headers, the caller's credentials, anything claiming to be
# internal (the tenant comes from the key, never from the caller), and what we set ourselves.
_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "expect",
}
_DROPPED = _HOP_BY_HOP | {
    "authorization", "x-api-key", "cookie", "accept-encoding", REQUEST_ID_HEADER.lower(),
}
_INTERNAL_PREFIX = "x-churnguard-"
# Passed back to the caller from the upstream's answer (the body as received: its
# content-encoding, if any, goes with it; X-Request-ID is set by the request-id middleware).
_RESPONSE_HEADERS = (
    "content-type", "content-encoding", "retry-after", "location", "etag", "last-modified",
    "cache-control", "link", "www-authenticate", "allow",
)


KEY_ID_HEADER = "X-Churnguard-Key-Id"  # who asked, for records such as an erasure request


def forward_headers(
    request: Request, tenant_id: str, request_id: str, internal_token: str, key_id: str | None = None
) -> list[tuple[bytes, bytes]]:
    """The caller's headers less the dropped ones, plus ours, as raw (lower-case) bytes: the
    names and values as uvicorn parsed them, so none can hold a line break."""
    headers = [
        (name, value)
        for raw_name, value in request.scope["headers"]
        if (name := raw_name.lower()) not in _DROPPED_RAW and not name.startswith(_INTERNAL_PREFIX_RAW)
    ]
    return headers + service_headers(tenant_id, request_id, internal_token, key_id)


def service_headers(
    tenant_id: str, request_id: str, internal_token: str, key_id: str | None = None
) -> list[tuple[bytes, bytes]]:
    """What every request to a service carries from the gateway, as raw (lower-case) bytes."""
    headers = [
        (_INTERNAL_TOKEN_RAW, internal_token.encode("latin-1")),
        (_TENANT_RAW, tenant_id.encode("latin-1")),
        (_REQUEST_ID_RAW, request_id.encode("latin-1")),
    ]
    if key_id:
        headers.append((_KEY_ID_RAW, key_id.encode("latin-1")))
    return headers


_DROPPED_RAW = frozenset(name.encode("latin-1") for name in _DROPPED)
_INTERNAL_PREFIX_RAW = _INTERNAL_PREFIX.encode("latin-1")
_INTERNAL_TOKEN_RAW, _TENANT_RAW, _REQUEST_ID_RAW, _KEY_ID_RAW = (
    name.lower().encode("latin-1")
    for name in (INTERNAL_TOKEN_HEADER, TENANT_HEADER, REQUEST_ID_HEADER, KEY_ID_HEADER)
)


def upstream_target(request: Request) -> str:
    """The path exactly as the caller encoded it + the query string. Built from strings: the
    path is already encoded (uvicorn hands it on as received)."""
    scope = request.scope
    raw_path: bytes = scope.get("raw_path") or request.url.path.encode()
    query = without_query_key(scope.get("query_string", b""))  # a credential, never forwarded
    target = _ascii(raw_path)
    if query:
        target += "?" + _ascii(query)
    return target


# Printable ASCII stays as the caller sent it (existing %-escapes included); other bytes are
# %-escaped, so a raw UTF-8 byte in a request target reaches the upstream as the same byte.
_KEEP = "".join(chr(c) for c in range(0x21, 0x7F))
_NOT_PRINTABLE_ASCII = re.compile(rb"[^\x21-\x7e]")


def _ascii(raw: bytes) -> str:
    if _NOT_PRINTABLE_ASCII.search(raw) is None:
        return raw.decode("ascii")
    return quote_from_bytes(raw, safe=_KEEP)


def public_location(location: str, base_url: str) -> str:
    """An upstream's absolute Location names its internal address: make it a path on ours."""
    base = base_url.rstrip("/")
    if location == base or location.startswith(base + "/"):
        return location[len(base):] or "/"
    return location


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class UpstreamClient(httpx.AsyncClient):
    """The gateway's connections to its upstream services.

    Proxied requests, the hot path, go through `pool` (shared/http_pool.py: keep-alive connections
    on asyncio protocols, httptools parsing): httpx's AsyncClient costs several times the CPU
    per request under concurrency (encode/httpx#3215), aiohttp's ClientSession still about as
    much as the rest of the gateway (figures in docs/benchmarks.md). The occasional calls
    (merged OpenAPI, upstream probes, exports) use the httpx API this class inherits. Create it
    inside the running event loop (the app's lifespan); `aclose()` closes both pools."""

    def __init__(self, timeout_s: float, max_connections: int = 200) -> None:
        super().__init__(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=5),
            follow_redirects=False,
            trust_env=False,  # service-to-service calls never go through an environment proxy
        )
        # The connect timeout bounds getting a connection (a free one or a new one): past it
        # the upstream counts as unavailable (503), like httpx's connect and pool timeouts.
        # No cookies are kept: what an upstream sets never travels with later calls.
        self.pool = UpstreamPool(max_connections, connect_timeout_s=timeout_s)

    async def aclose(self) -> None:
        try:
            await self.pool.close()
        finally:
            await super().aclose()


class UpstreamFailed(Exception):
    """No usable answer from the upstream; `response()` is what a caller gets instead."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers

    def response(self) -> JSONResponse:
        return _problem(self.status, self.detail, self.headers)


def timed_out(upstream: str, timeout_s: float) -> UpstreamFailed:
    return UpstreamFailed(504, f"upstream service {upstream} did not answer within {timeout_s:g} s")


async def exchange(
    client: UpstreamClient,
    *,
    upstream: str,
    base_url: str,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    timeout_s: float,
) -> Answer:
    """One request to an upstream (`target`: the path and query below the base URL's prefix).
    Raises UpstreamFailed for upstream trouble: refused or unreachable -> 503 + Retry-After
    (nothing was delivered, retrying is safe), too slow -> 504, anything else on the wire ->
    502, a refusal of our internal token -> 502."""
    started = time.perf_counter()
    outcome = "error"
    try:
        origin, prefix = client.pool.origin(base_url)
        try:
            # This bounds the whole exchange, connect to last byte, so an upstream dripping
            # bytes slowly cannot hold the caller past timeout_s.
            async with asyncio.timeout(timeout_s):
                answer = await client.pool.request(origin, method, prefix + target, headers, body)
        except UpstreamUnavailable as exc:
            outcome = "unavailable"
            log.warning("upstream %s unavailable: %s", upstream, exc)
            raise UpstreamFailed(
                503, f"upstream service {upstream} is unavailable; retry later", {"Retry-After": "1"}
            ) from exc
        except TimeoutError as exc:
            outcome = "timeout"
            log.warning("upstream %s did not answer within %ss", upstream, timeout_s)
            raise timed_out(upstream, timeout_s) from exc
        except UpstreamBroken as exc:
            log.warning("upstream %s failed: %s", upstream, exc)
            raise UpstreamFailed(502, f"upstream service {upstream} failed: {type(exc).__name__}") from exc
        outcome = _OUTCOMES.get(answer.status // 100, "error")
        if answer.status == 401 and "www-authenticate" not in answer.headers:
            # Callers are authenticated here, so an upstream 401 means it refused *our* internal
            # token: a deployment error, not the caller's. Do not let it look like a bad API key.
            # (A 401 with a challenge is the upstream checking the caller's own proof, e.g. a
            # source's webhook signature: that one is passed on.)
            log.error("upstream %s rejected the internal token; check CHURNGUARD_INTERNAL_TOKEN",
                      upstream)
            raise UpstreamFailed(
                502, f"upstream service {upstream} refused the gateway (internal token mismatch)"
            )
        return answer
    finally:
        _upstream_requests(upstream, outcome).inc()
        _upstream_duration(upstream).observe(time.perf_counter() - started)


async def forward(
    client: UpstreamClient,
    *,
    upstream: str,
    base_url: str,
    request: Request,
    body: bytes,
    tenant_id: str,
    request_id: str,
    internal_token: str,
    timeout_s: float,
    key_id: str | None = None,
) -> Response:
    """Send the request upstream and hand back its answer. Never raises for upstream trouble
    (see `exchange`)."""
    try:
        answer = await exchange(
            client,
            upstream=upstream,
            base_url=base_url,
            method=request.method,
            target=upstream_target(request),  # the path exactly as the caller encoded it
            headers=forward_headers(request, tenant_id, request_id, internal_token, key_id),
            body=body,
            timeout_s=timeout_s,
        )
    except UpstreamFailed as failed:
        return failed.response()
    headers = {h: answer.headers[h] for h in _RESPONSE_HEADERS if h in answer.headers}
    if "location" in headers:
        headers["location"] = public_location(headers["location"], base_url)
    return Response(content=answer.content, status_code=answer.status, headers=headers)


_OUTCOMES = {n: f"{n}xx" for n in range(1, 6)}


# The labelled children, looked up once: `labels()` takes a lock and checks its arguments.
@functools.cache
def _upstream_requests(upstream: str, outcome: str) -> Any:
    return metrics.UPSTREAM_REQUESTS.labels(upstream, outcome)


@functools.cache
def _upstream_duration(upstream: str) -> Any:
    return metrics.UPSTREAM_DURATION.labels(upstream)
