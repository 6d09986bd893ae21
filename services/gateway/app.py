"""The public entry point: API keys -> tenant, then a proxy to ingest, scoring and actions."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.config import GatewaySettings
from services.gateway.joiner import EventJoiner
from services.gateway.deps import GatewayState
from services.gateway.export import add_export_route
from services.gateway.openapi import MergedOpenApi
from services.gateway.admin import router as admin_router
from services.gateway.proxy import UpstreamClient
from services.gateway.ratelimit import TokenBuckets
from services.gateway.routes import add_docs_routes, add_proxy_routes, upstream_probes
from services.gateway.service import KeyAuthenticator
from services.gateway.tables import TABLES
from shared.app import create_service_app, settled_heap
from shared.clock import Clock, SystemClock
from shared.db import create_tables, make_engine, ping

TITLE = "churnguard API"
DESCRIPTION = (
    "Send customer events, read churn scores, and manage retention offers and webhooks. "
    "Every request needs an API key: `Authorization: Bearer <key>` or `X-API-Key: <key>`."
)


def create_app(settings: GatewaySettings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(
            settings.database.url_for("gateway"), echo=settings.database.database_echo
        )
        client = UpstreamClient(settings.upstream_timeout_s, settings.upstream_max_connections)
        joiner = EventJoiner(
            client, base_url=settings.upstreams()["ingest"],
            internal_token=settings.internal.internal_token.get_secret_value(),
            timeout_s=settings.upstream_timeout_s,
        ) if settings.join_events else None
        try:
            await asyncio.to_thread(create_tables, engine, TABLES)
            app.state.gateway = GatewayState(
                settings=settings,
                engine=engine,
                client=client,
                authenticator=KeyAuthenticator(clock, cache_ttl=timedelta(seconds=settings.auth_cache_s)),
                openapi=MergedOpenApi(
                    client, settings.upstreams(), title=TITLE, version=app.version,
                    description=DESCRIPTION, ttl_s=settings.openapi_cache_s,
                    own=get_openapi(title=TITLE, version=app.version, routes=admin_router.routes)
                    if settings.admin_key is not None else None,
                    fetch_timeout_s=min(settings.upstream_timeout_s, 3.0),
                ),
                limiter=TokenBuckets(clock),
                clock=clock,
                joiner=joiner,
            )
            # Ready = our own dependency (the key database) answers. Upstream reachability is
            # reported but does not gate readiness: if it did, one service being down would pull
            # every gateway pod out of the load balancer at once, turning a partial outage (say,
            # scoring) into a total one (events could no longer be sent either). Per-route 503 +
            # Retry-After already tells callers what is down.
            app.state.readiness = {"database": lambda: asyncio.to_thread(ping, engine)}
            app.state.diagnostics = {"upstreams": lambda: upstream_probes(app.state.gateway)}
            with settled_heap():
                yield
        finally:
            if joiner is not None:
                await joiner.close()
            await client.aclose()
            engine.dispose()

    app = create_service_app(
        "gateway",
        title=TITLE,
        description=DESCRIPTION,
        lifespan=lifespan,
        internal_token=settings.internal.internal_token.get_secret_value(),
        api_docs=False,  # FastAPI's own would describe only the gateway's few routes
    )
    if settings.docs_enabled:
        add_docs_routes(app)
    if settings.admin_key is not None:
        app.include_router(admin_router, include_in_schema=False)  # described in the merged doc
    add_proxy_routes(app)
    if origins := settings.allowed_origins():
        # Off unless configured: without CORS headers a browser page on another origin cannot
        # read our answers. No cookies are used, so credentials stay off.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID", "Location"],
            max_age=600,
        )
    add_export_route(app, clock)
    app.add_exception_handler(StarletteHTTPException, _not_found)
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404 and "route" not in request.scope:
        return JSONResponse(
            {"detail": f"no such endpoint: {request.method} {request.url.path} (see /docs)"},
            status_code=404,
        )
    if exc.status_code == 405:
        # The router's Allow names the methods a route table entry forwards (for a prefix: all
        # of them); callers need the ones the API has at this path.
        allowed = await request.app.state.gateway.openapi.methods_for(request.url.path)
        if allowed:
            return JSONResponse(
                {"detail": f"{request.method} is not allowed here; allowed: {', '.join(allowed)}"},
                status_code=405, headers={"Allow": ", ".join(allowed)},
            )
    return await http_exception_handler(request, exc)
