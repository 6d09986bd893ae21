"""Thin HTTP layer: one route per route-table template (so metrics label by template, never by
raw path), the merged API description, and a readiness report."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from services.gateway import service
from services.gateway.deps import GatewayState, StateDep, authenticated_caller, require_scope, take_token
from services.gateway.joiner import joinable
from services.gateway.proxy import ROUTE_TABLE, ProxyRoute, forward
from shared.app import BodyTooLarge, hot_route, read_body_limited
from shared.db import session_scope

log = logging.getLogger(__name__)

UPSTREAM_PROBE_TIMEOUT_S = 1.0


def add_proxy_routes(app: FastAPI, table: tuple[ProxyRoute, ...] = ROUTE_TABLE) -> None:
    for route in table:
        for template in route.templates():
            app.add_api_route(
                template,
                _proxy_endpoint(route),
                methods=list(route.methods),
                name=f"proxy:{route.upstream}:{template}",
                include_in_schema=False,  # the public description is the merged one
            )


def _proxy_endpoint(route: ProxyRoute) -> Callable[..., Awaitable[Response]]:
    # No FastAPI dependencies on this, the hot path: resolving them per request cost more than
    # the work they do (the same functions are called directly instead).
    joins = route.upstream == "ingest" and route.path == "/v1/events"  # single events

    @hot_route
    async def proxy(request: Request) -> Response:
        gateway: GatewayState = request.app.state.gateway
        caller = await authenticated_caller(request, gateway)
        settings = gateway.settings
        require_scope(caller, route.scope)
        take_token(caller, gateway)  # after the scope: a refused request costs no token
        try:  # stops reading past the limit, whether or not a Content-Length was sent
            body = await read_body_limited(request, settings.max_body_bytes)
        except BodyTooLarge as exc:
            return JSONResponse({"detail": str(exc)}, status_code=413)
        if joins and gateway.joiner is not None and joinable(request, body):
            return await gateway.joiner.submit(caller.tenant_id, body, request.state.request_id)
        response = await forward(
            gateway.client,
            upstream=route.upstream,
            base_url=settings.upstreams()[route.upstream],
            request=request,
            body=body,
            tenant_id=caller.tenant_id,
            request_id=request.state.request_id,
            internal_token=settings.internal.internal_token.get_secret_value(),
            timeout_s=settings.upstream_timeout_s,
            key_id=caller.key_id,
        )
        if route.audited(request.method) and 200 <= response.status_code < 300:
            await _audit_proxied(gateway, caller, route, request, response.status_code)
        return response

    return proxy


async def _audit_proxied(
    gateway: GatewayState, caller: Any, route: ProxyRoute, request: Request, status_code: int
) -> None:
    """An administrative change made in a service (policies, subscriptions, replays, erasures,
    source secrets, models) goes into the gateway's audit log once the service confirmed it.
    A gateway that dies between the two loses that entry; the change itself stands."""
    # A customer id is personal data: such entries name the route, not the customer (the
    # erasure record in ingest says which customer, and is itself erased-safe).
    path = route.path if "{customer_id}" in route.path else request.url.path

    def write() -> None:
        with session_scope(gateway.engine) as session:
            service.audit(session, gateway.clock, actor=caller.key_id,
                          action=f"{request.method} {route.path}"[:64], target=path[:64],
                          tenant_id=caller.tenant_id, detail={"path": path, "status": status_code})

    try:
        await asyncio.to_thread(write)
    except SQLAlchemyError as exc:
        log.error("could not write the audit entry for %s %s: %s", request.method, path, type(exc).__name__)


def add_docs_routes(app: FastAPI) -> None:
    async def openapi(gateway: StateDep) -> JSONResponse:
        return JSONResponse(await gateway.openapi.document())

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="churnguard API")

    app.add_api_route("/openapi.json", openapi, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


async def upstream_probes(gateway: GatewayState) -> dict[str, str]:
    bases = gateway.settings.upstreams()
    probes = await asyncio.gather(*(_probe(gateway, url) for url in bases.values()))
    return dict(zip(bases, probes, strict=True))


async def _probe(gateway: GatewayState, base_url: str) -> str:
    try:
        answer = await gateway.client.get(f"{base_url}/healthz", timeout=UPSTREAM_PROBE_TIMEOUT_S)
        return "reachable" if answer.status_code == 200 else f"answered {answer.status_code}"
    except Exception:
        return "unreachable"
