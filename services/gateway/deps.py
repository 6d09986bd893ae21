from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.gateway import metrics
from services.gateway.config import GatewaySettings
from services.gateway.openapi import MergedOpenApi
from services.gateway.query_key import accepts_query_key, take_query_key
from services.gateway.service import Caller, KeyAuthenticator, KeyRejected
from shared.db import session_scope
from shared.logs import bind_tenant

log = logging.getLogger(__name__)

MISSING_KEY = "missing API key: send Authorization: Bearer <key> or X-API-Key"
MISSING_SOURCE_KEY = (
    "missing API key: send Authorization: Bearer <key> or X-API-Key, or (for a webhook sender "
    "that cannot set headers) add ?key=<key> to the URL"
)
INVALID_KEY = "invalid API key"


@dataclass
class GatewayState:
    settings: GatewaySettings
    engine: Engine
    client: httpx.AsyncClient  # one pool for every upstream call
    authenticator: KeyAuthenticator
    openapi: MergedOpenApi


async def _state(request: Request) -> GatewayState:
    return request.app.state.gateway


StateDep = Annotated[GatewayState, Depends(_state)]


def presented_key(request: Request) -> str | None:
    """`Authorization: Bearer <key>` first, then `X-API-Key: <key>`, then, under /v1/sources/
    only, `?key=<key>` (taken out of the query string on every path, see query_key.py)."""
    from_query = take_query_key(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    from_header = request.headers.get("x-api-key", "").strip()
    if from_header:
        return from_header
    return from_query if accepts_query_key(request.url.path) else None


async def authenticated_caller(request: Request, gateway: StateDep) -> Caller:
    """The tenant comes from the key, and only from the key."""
    key = presented_key(request)

    def lookup() -> Caller:
        with session_scope(gateway.engine) as session:
            return gateway.authenticator.authenticate(session, key)

    try:
        caller = gateway.authenticator.cached(key) or await asyncio.to_thread(lookup)
    except KeyRejected as rejected:
        metrics.AUTH_FAILURES.labels(rejected.reason).inc()
        if rejected.reason == "missing":
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                MISSING_SOURCE_KEY if accepts_query_key(request.url.path) else MISSING_KEY,
                headers={"WWW-Authenticate": 'Bearer realm="churnguard"'},
            ) from None
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, INVALID_KEY,
            headers={"WWW-Authenticate": 'Bearer realm="churnguard", error="invalid_token"'},
        ) from None
    except SQLAlchemyError as exc:
        log.error("cannot check API keys: %s", type(exc).__name__)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "cannot check API keys right now; retry later",
            headers={"Retry-After": "1"},
        ) from None
    bind_tenant(caller.tenant_id)
    return caller


CallerDep = Annotated[Caller, Depends(authenticated_caller)]
