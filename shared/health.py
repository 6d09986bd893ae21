"""Liveness and readiness. /readyz runs real checks; it never just says OK."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT_S = 3.0


def health_router() -> APIRouter:
    """Checks are read from `app.state.readiness` (name -> async () -> bool), set in lifespan.
    `app.state.diagnostics` (name -> async () -> object), if set, is reported alongside but
    does not decide readiness (e.g. the gateway's view of its upstreams)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        checks: dict[str, Check] = getattr(request.app.state, "readiness", {})
        results = await asyncio.gather(*(_run(check) for check in checks.values()))
        report = dict(zip(checks, results, strict=True))
        ready = bool(report) and all(report.values())
        body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": report}
        diagnostics: dict[str, Callable[[], Awaitable[object]]] = getattr(request.app.state, "diagnostics", {})
        if diagnostics:
            values = await asyncio.gather(*(_diagnose(d) for d in diagnostics.values()))
            body["diagnostics"] = dict(zip(diagnostics, values, strict=True))
        return JSONResponse(body, status_code=200 if ready else 503)

    return router


async def _run(check: Check) -> bool:
    try:
        return bool(await asyncio.wait_for(check(), CHECK_TIMEOUT_S))
    except Exception:
        return False


async def _diagnose(diagnostic: Callable[[], Awaitable[object]]) -> object:
    try:
        return await asyncio.wait_for(diagnostic(), CHECK_TIMEOUT_S)
    except Exception as exc:
        return f"unavailable: {type(exc).__name__}"
