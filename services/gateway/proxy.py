"""The route table and the forwarding of one request to its upstream service."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.gateway import metrics
from shared.app import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER, TENANT_HEADER

log = logging.getLogger(__name__)

Upstream = Literal["ingest", "scoring", "actions"]
ANY_METHOD = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class ProxyRoute:
    """`path` is a route template; with `prefix`, everything below it goes to the same upstream."""

    path: str
    upstream: Upstream
    methods: tuple[str, ...]
    prefix: bool = False
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = "[^/]+".join(re.escape(part) for part in re.split(r"\{[^}]+\}", self.path))
        below = "(/.*)?" if self.prefix else ""
        object.__setattr__(self, "_pattern", re.compile(f"^{regex}{below}$"))

    def templates(self) -> tuple[str, ...]:
        """The paths registered with the router (their templates are the metrics' route label)."""
        return (self.path, f"{self.path}/{{subpath:path}}") if self.prefix else (self.path,)

    def matches(self, method: str, path: str) -> bool:
        """Also true for an upstream's own path template, e.g. `/v1/customers/{id}/score`."""
        return method.upper() in self.methods and bool(self._pattern.match(path))


# The one place that says what the public API is and who serves it.
ROUTE_TABLE: tuple[ProxyRoute, ...] = (
    ProxyRoute("/v1/events", "ingest", ("POST",)),
    ProxyRoute("/v1/events/batch", "ingest", ("POST",)),
    ProxyRoute("/v1/schema", "ingest", ("GET",)),
    ProxyRoute("/v1/customers/{customer_id}/score", "scoring", ("GET",)),
    ProxyRoute("/v1/models", "scoring", ANY_METHOD, prefix=True),
    ProxyRoute("/v1/webhooks", "actions", ANY_METHOD, prefix=True),
    ProxyRoute("/v1/customers/{customer_id}/offers", "actions", ("GET",)),
    ProxyRoute("/v1/customers/{customer_id}/decisions", "actions", ("GET",)),
    ProxyRoute("/v1/deliveries", "actions", ANY_METHOD, prefix=True),
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
# Passed back to the caller from the upstream's answer (the body is already decoded, so no
# content-encoding/length; X-Request-ID is set by the request-id middleware).
_RESPONSE_HEADERS = (
    "content-type", "retry-after", "location", "etag", "last-modified", "cache-control", "link",
)


def forward_headers(
    request: Request, tenant_id: str, request_id: str, internal_token: str
) -> list[tuple[str, str]]:
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if name not in _DROPPED and not name.startswith(_INTERNAL_PREFIX)
    ]
    headers += [
        (INTERNAL_TOKEN_HEADER, internal_token),
        (TENANT_HEADER, tenant_id),
        (REQUEST_ID_HEADER, request_id),
    ]
    return headers


def upstream_url(base_url: str, request: Request) -> httpx.URL:
    """Base URL + the path exactly as the caller encoded it + the query string."""
    base = httpx.URL(base_url)
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    target = base.raw_path.split(b"?", 1)[0].rstrip(b"/") + raw_path
    return base.copy_with(raw_path=target + (b"?" + query if query else b""))


def public_location(location: str, base_url: str) -> str:
    """An upstream's absolute Location names its internal address: make it a path on ours."""
    base = base_url.rstrip("/")
    if location == base or location.startswith(base + "/"):
        return location[len(base):] or "/"
    return location


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def forward(
    client: httpx.AsyncClient,
    *,
    upstream: str,
    base_url: str,
    request: Request,
    body: bytes,
    tenant_id: str,
    request_id: str,
    internal_token: str,
    timeout_s: float,
) -> Response:
    """Send the request upstream and hand back its answer. Never raises for upstream trouble:
    refused or unreachable -> 503 + Retry-After (nothing was delivered, retrying is safe),
    too slow -> 504, anything else on the wire -> 502."""
    outgoing = client.build_request(
        request.method,
        upstream_url(base_url, request),
        headers=forward_headers(request, tenant_id, request_id, internal_token),
        content=body,
    )
    started = time.perf_counter()
    outcome = "error"
    try:
        try:
            answer = await _send_within(client, outgoing, timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            outcome = "unavailable"
            log.warning("upstream %s unavailable: %s", upstream, type(exc).__name__)
            return _problem(
                503, f"upstream service {upstream} is unavailable; retry later", {"Retry-After": "1"}
            )
        except (httpx.TimeoutException, TimeoutError):
            outcome = "timeout"
            log.warning("upstream %s did not answer within %ss", upstream, timeout_s)
            return _problem(
                504, f"upstream service {upstream} did not answer within {timeout_s:g} s"
            )
        except httpx.TransportError as exc:
            log.warning("upstream %s failed: %s: %s", upstream, type(exc).__name__, exc)
            return _problem(502, f"upstream service {upstream} failed: {type(exc).__name__}")
        outcome = f"{answer.status_code // 100}xx"
        if answer.status_code == 401:
            # Callers are authenticated here, so an upstream 401 means it refused *our* internal
            # token: a deployment error, not the caller's. Do not let it look like a bad API key.
            log.error("upstream %s rejected the internal token; check CHURNGUARD_INTERNAL_TOKEN",
                      upstream)
            return _problem(
                502, f"upstream service {upstream} refused the gateway (internal token mismatch)"
            )
        headers = {h: answer.headers[h] for h in _RESPONSE_HEADERS if h in answer.headers}
        if "location" in headers:
            headers["location"] = public_location(headers["location"], base_url)
        return Response(content=answer.content, status_code=answer.status_code, headers=headers)
    finally:
        metrics.UPSTREAM_REQUESTS.labels(upstream, outcome).inc()
        metrics.UPSTREAM_DURATION.labels(upstream).observe(time.perf_counter() - started)


async def _send_within(
    client: httpx.AsyncClient, outgoing: httpx.Request, timeout_s: float
) -> httpx.Response:
    # The client's own timeouts bound each phase (connect, each read); this bounds the whole
    # exchange, so an upstream dripping bytes slowly cannot hold the caller past timeout_s.
    async with asyncio.timeout(timeout_s):
        answer = await client.send(outgoing, stream=True)
        try:
            await answer.aread()
        finally:
            await answer.aclose()
    return answer
