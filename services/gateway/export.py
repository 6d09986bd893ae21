"""GET /v1/customers/{customer_id}/export: everything held about one customer (GDPR Art. 15/20),
from every service, as one JSON document.

The gateway fans out to each service's internal export route (`/internal/v1/customers/{id}/export`,
not in the route table, so not reachable from outside) with the caller's tenant, in parallel and
within the upstream timeout. Each service answers its own section plus `held` (whether it holds
anything about the customer). The document is all or nothing: if a service cannot answer, the
caller gets 503 (an export missing a service's data must not pass for complete). If no service
holds anything about the customer of this tenant (another tenant's customer id included), 404.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse

from services.gateway import metrics
from services.gateway.deps import CallerDep, StateDep, require_scope, take_token
from services.gateway.scopes import SCORES_READ
from shared.app import INTERNAL_TOKEN_HEADER, REQUEST_ID_HEADER, TENANT_HEADER
from shared.clock import Clock

EXPORT_PATH = "/v1/customers/{customer_id}/export"
SECTIONS = ("ingest", "scoring", "actions")

CustomerIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The tenant's customer id.")]


class UpstreamFailed(Exception):
    def __init__(self, upstream: str, why: str) -> None:
        super().__init__(f"{upstream} {why}")
        self.upstream = upstream


async def _section(
    client: httpx.AsyncClient, upstream: str, base_url: str, customer_id: str, headers: dict[str, str],
    timeout_s: float,
) -> dict[str, Any]:
    started = time.perf_counter()
    outcome = "error"
    try:
        url = f"{base_url.rstrip('/')}/internal/v1/customers/{customer_id}/export"
        try:
            answer = await client.get(url, headers=headers, timeout=timeout_s)
        except httpx.TimeoutException as exc:
            outcome = "timeout"
            raise UpstreamFailed(upstream, f"did not answer within {timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            outcome = "unavailable"
            raise UpstreamFailed(upstream, f"is unavailable ({type(exc).__name__})") from exc
        outcome = f"{answer.status_code // 100}xx"
        if answer.status_code != 200:
            raise UpstreamFailed(upstream, f"answered HTTP {answer.status_code}")
        body = answer.json()
        if not isinstance(body, dict) or "held" not in body:
            raise UpstreamFailed(upstream, "answered an unexpected document")
        return body
    finally:
        metrics.UPSTREAM_REQUESTS.labels(upstream, outcome).inc()
        metrics.UPSTREAM_DURATION.labels(upstream).observe(time.perf_counter() - started)


def add_export_route(app: FastAPI, clock: Clock) -> None:
    async def export_customer(
        customer_id: CustomerIdPath, request: Request, caller: CallerDep, gateway: StateDep
    ) -> JSONResponse:
        """Everything held about the customer in ingest (erasure record, upstream sources'
        orders), scoring (event history, features, scores with reasons) and actions (state,
        contracts, decisions, offers, webhook deliveries), as one document. 404 when nothing is
        held about this customer of your tenant; 503 when a service cannot answer just now."""
        require_scope(caller, SCORES_READ)  # everything about a customer: a read of personal data
        take_token(caller, gateway)
        settings = gateway.settings
        headers = {
            INTERNAL_TOKEN_HEADER: settings.internal.internal_token.get_secret_value(),
            TENANT_HEADER: caller.tenant_id,
            REQUEST_ID_HEADER: request.state.request_id,
        }
        bases = settings.upstreams()
        encoded = quote(customer_id, safe="")
        results = await asyncio.gather(
            *(_section(gateway.client, name, bases[name], encoded, headers, settings.upstream_timeout_s)
              for name in SECTIONS),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        for failure in failed:
            if not isinstance(failure, UpstreamFailed):
                raise failure
        if failed:
            return JSONResponse(
                {"detail": "export incomplete, retry later: " + "; ".join(str(f) for f in failed)},
                status_code=503, headers={"Retry-After": "1"},
            )
        sections = dict(zip(SECTIONS, results, strict=True))
        if not any(section["held"] for section in sections.values()):  # type: ignore[index]
            return JSONResponse({"detail": f"no data held about customer {customer_id!r}"}, status_code=404)
        document: dict[str, Any] = {"customer_id": customer_id, "exported_at": clock.now().isoformat()}
        for name, section in sections.items():
            document[name] = {k: v for k, v in section.items() if k != "held"}  # type: ignore[union-attr]
        return JSONResponse(document)

    app.add_api_route(EXPORT_PATH, export_customer, methods=["GET"], name="export:customer",
                      include_in_schema=False)
