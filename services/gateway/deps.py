from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, HTTPException, Request, status
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.gateway import metrics
from services.gateway.config import GatewaySettings
from services.gateway.joiner import EventJoiner
from services.gateway.openapi import MergedOpenApi
from services.gateway.query_key import accepts_query_key, take_query_key
from services.gateway.ratelimit import TokenBuckets
from services.gateway.scopes import ADMIN
from services.gateway.service import BOOTSTRAP_ACTOR, Caller, KeyAuthenticator, KeyRejected, hash_key
from shared.clock import Clock
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
    limiter: TokenBuckets
    clock: Clock
    # Key lookups in the database now running, by key hash (see _looked_up).
    lookups: dict[str, asyncio.Future[Caller]] = field(default_factory=dict)
    joiner: EventJoiner | None = None  # POST /v1/events, unless settings.join_events is off


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
    return await _caller_of(presented_key(request), request, gateway)


async def _caller_of(key: str | None, request: Request, gateway: GatewayState) -> Caller:
    try:
        caller = gateway.authenticator.cached(key) or await _looked_up(gateway, key)
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


async def _looked_up(gateway: GatewayState, key: str | None) -> Caller:
    """The key checked in the database, once at a time per key: requests that arrive while a
    lookup runs share its answer. Otherwise, when a busy key's remembered entry expires, every
    request in flight queues for the thread pool and the database with the same question."""

    def lookup() -> Caller:
        with session_scope(gateway.engine) as session:
            return gateway.authenticator.authenticate(session, key)

    hashed = hash_key(key or "")
    running = gateway.lookups.get(hashed)
    if running is None:
        running = gateway.lookups[hashed] = asyncio.ensure_future(asyncio.to_thread(lookup))
        running.add_done_callback(lambda done: _lookup_done(gateway, hashed, done))
    return await asyncio.shield(running)  # a caller giving up does not cancel it for the others


def _lookup_done(gateway: GatewayState, hashed: str, done: asyncio.Future[Caller]) -> None:
    gateway.lookups.pop(hashed, None)
    if not done.cancelled():
        done.exception()  # retrieved here too: every caller may have given up before it ended


CallerDep = Annotated[Caller, Depends(authenticated_caller)]


def require_scope(caller: Caller, scope: str) -> None:
    """403 naming the scope the key lacks."""
    if scope not in caller.scopes:
        metrics.AUTH_FAILURES.labels("scope").inc()
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this API key lacks the scope {scope!r} (it has: "
            f"{', '.join(sorted(caller.scopes)) or 'none'})",
        )


def take_token(caller: Caller, gateway: GatewayState) -> None:
    """429 + Retry-After when the key's token bucket is empty."""
    settings = gateway.settings
    per_s, burst = ((caller.rate_limit.per_s, caller.rate_limit.burst) if caller.rate_limit
                    else (settings.rate_limit_per_s, settings.rate_limit_burst))
    if per_s <= 0:
        return  # no limit
    decision = gateway.limiter.take(caller.key_id, per_s, burst)
    if not decision.allowed:
        metrics.RATE_LIMITED.labels("key").inc()
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit of this API key exceeded ({per_s:g} requests/s, burst {burst}); "
            f"retry in {decision.retry_after_s:.3f} s",
            headers={"Retry-After": decision.retry_after_header},
        )


@dataclass(frozen=True)
class Admin:
    actor: str  # "bootstrap" (the key from the environment) or the admin key's id


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


async def admin_caller(request: Request, gateway: StateDep) -> Admin:
    """The bootstrap admin key from the environment, or an API key with the `admin` scope."""
    key = presented_key(request)
    bootstrap = gateway.settings.admin_key
    # Hashes of equal length compared in constant time: neither the key nor its length leaks.
    if key and bootstrap and hmac.compare_digest(
        _digest(key), _digest(bootstrap.get_secret_value().strip())
    ):
        return Admin(BOOTSTRAP_ACTOR)
    caller = await _caller_of(key, request, gateway)
    require_scope(caller, ADMIN)
    take_token(caller, gateway)
    return Admin(caller.key_id)


AdminDep = Annotated[Admin, Depends(admin_caller)]
