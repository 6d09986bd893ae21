"""Small real upstream services for the gateway tests: FastAPI apps served by uvicorn in a
background thread on a free port. They trust the gateway through shared's real TenantId
dependency and echo what they received; `?sleep=<s>` and `?status=<code>` change their answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import create_model

from shared.app import TenantId
from tests.helpers import ServerThread  # noqa: F401  (re-exported for the gateway tests)


def upstream_app(name: str, internal_token: str) -> FastAPI:
    app = FastAPI(title=f"fake {name}")
    app.state.internal_token = internal_token

    async def echo(request: Request, tenant: TenantId) -> JSONResponse:
        body = await request.body()
        sleep_s = float(request.query_params.get("sleep", 0))
        deadline = time.monotonic() + sleep_s
        while time.monotonic() < deadline:  # stop early once the gateway gave up on us
            if await request.is_disconnected():
                break
            await asyncio.sleep(0.02)
        status = int(request.query_params.get("status", 200))
        payload: dict[str, Any] = {
            "upstream": name,
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
            "tenant": tenant,
        }
        headers = {"Retry-After": "7"} if status == 503 else None
        return JSONResponse(payload, status_code=status, headers=headers)

    # Same schema name, different shape in scoring: the merged description must keep both.
    Thing = create_model("Thing", owner=(str, ...), value=(int if name == "scoring" else str, ...))

    def thing() -> Any:
        return Thing(owner=name, value=1 if name == "scoring" else "1")

    routes: dict[str, list[tuple[str, str]]] = {
        "ingest": [("POST", "/v1/events"), ("POST", "/v1/events/batch"), ("GET", "/v1/schema")],
        "scoring": [("GET", "/v1/customers/{customer_id}/score"), ("GET", "/v1/models"),
                    ("POST", "/v1/models/{version}/activate")],
        "actions": [("GET", "/v1/webhooks"), ("POST", "/v1/webhooks"), ("DELETE", "/v1/webhooks/{webhook_id}"),
                    ("GET", "/v1/customers/{customer_id}/offers"), ("GET", "/v1/customers/{customer_id}/decisions"),
                    ("GET", "/v1/deliveries"), ("POST", "/v1/deliveries/{delivery_id}/replay")],
    }[name]
    for method, path in routes:
        app.add_api_route(path, echo, methods=[method], name=f"{method} {path}")
    # Not in the gateway's route table: must stay out of the public API description.
    app.add_api_route("/internal/thing", thing, methods=["GET"], response_model=Thing)
    # ... while scoring and actions use a schema of that name in a public operation.
    public_thing = {"scoring": "/v1/models/thing", "actions": "/v1/webhooks/thing"}.get(name)
    if public_thing:
        app.add_api_route(public_thing, thing, methods=["GET"], response_model=Thing, name="thing")
    # A public path that belongs to another service: only that service's operation counts.
    if name == "scoring":
        app.add_api_route("/v1/webhooks", echo, methods=["PUT"], name="scoring-webhooks")
    app.add_api_route("/healthz", lambda: {"status": "alive"}, methods=["GET"], include_in_schema=False)
    # Anything else is echoed too, so the gateway's forwarding can be checked on any path.
    app.add_api_route("/{rest:path}", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                      include_in_schema=False)
    return app
