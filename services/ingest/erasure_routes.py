"""Erasure (GDPR Art. 17) and export HTTP API of ingest (called by the gateway only)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.ingest import metrics
from services.ingest.erasure import ErasureNotFound, ErasureService, ErasureView
from shared.app import TenantId
from shared.kafka import BrokerUnavailable

router = APIRouter(prefix="/v1", tags=["erasure"])
internal_router = APIRouter(prefix="/internal/v1", include_in_schema=False)

# Set by the gateway (client-sent X-Churnguard-* headers are dropped there) when it knows the key.
KEY_ID_HEADER = "X-Churnguard-Key-Id"

CustomerIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The tenant's customer id.")]
ErasureIdPath = Annotated[str, Path(min_length=1, max_length=64, description="An erasure id, e.g. er_5b1c...")]


class ServiceStatusOut(BaseModel):
    status: Literal["pending", "done"]
    done_at: datetime | None


class ErasureOut(BaseModel):
    erasure_id: str
    customer_id: str
    requested_at: datetime
    requested_by: str = Field(description="The API key id of the caller, or 'api' when the gateway did not say.")
    status: Literal["pending", "done"] = Field(description="done once every service has erased the customer")
    services: dict[str, ServiceStatusOut] = Field(description="ingest, scoring and actions")
    completed_at: datetime | None
    status_url: str

    @classmethod
    def of(cls, view: ErasureView) -> ErasureOut:
        return cls(
            erasure_id=view.erasure_id, customer_id=view.customer_id, requested_at=view.requested_at,
            requested_by=view.requested_by, status=view.status,  # type: ignore[arg-type]
            services={name: ServiceStatusOut(status=s.status, done_at=s.done_at)  # type: ignore[arg-type]
                      for name, s in view.services.items()},
            completed_at=view.completed_at, status_url=f"/v1/erasures/{view.erasure_id}",
        )


async def _erasures(request: Request) -> ErasureService:
    return request.app.state.erasures


ErasuresDep = Annotated[ErasureService, Depends(_erasures)]
ERROR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}}


@router.delete(
    "/customers/{customer_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ErasureOut,
    summary="Erase a customer (GDPR Art. 17)",
    responses={
        200: {"model": ErasureOut, "description": "The customer was erased already; nothing more to do."},
        503: {"description": "The broker did not take the erasure; it is recorded, retry to send it.", **ERROR},
    },
)
async def erase_customer(
    customer_id: CustomerIdPath, tenant_id: TenantId, erasures: ErasuresDep,
    key_id: Annotated[str | None, Header(alias=KEY_ID_HEADER, include_in_schema=False, max_length=128)] = None,
) -> JSONResponse:
    """Deletes everything held about the customer in every service (event history, features,
    scores, offers, decisions, webhook payloads) through a control record each service handles,
    and from then on suppresses the customer's events. 202 with the erasure and its status URL;
    repeating the request returns the same erasure (200 once it is complete)."""
    try:
        view, _created = await erasures.request(tenant_id, customer_id, key_id or "api")
    except BrokerUnavailable:
        metrics.BROKER_UNAVAILABLE.inc()
        return JSONResponse(
            {"detail": "the erasure is recorded but the event broker did not take it; retry the request"},
            status_code=503, headers={"Retry-After": "2"},
        )
    body = ErasureOut.of(view)
    return JSONResponse(
        body.model_dump(mode="json"), status_code=200 if view.status == "done" else 202,
        headers={"Location": body.status_url},
    )


@router.get("/erasures/{erasure_id}", response_model=ErasureOut, responses={404: ERROR},
            summary="An erasure: who asked, when, and its status per service")
async def get_erasure(erasure_id: ErasureIdPath, tenant_id: TenantId, erasures: ErasuresDep) -> ErasureOut:
    try:
        return ErasureOut.of(await erasures.by_id(tenant_id, erasure_id))
    except ErasureNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.get("/customers/{customer_id}/erasure", response_model=ErasureOut, responses={404: ERROR},
            summary="The customer's erasure, if one was requested")
async def get_customer_erasure(customer_id: CustomerIdPath, tenant_id: TenantId, erasures: ErasuresDep) -> ErasureOut:
    try:
        return ErasureOut.of(await erasures.of_customer(tenant_id, customer_id))
    except ErasureNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@internal_router.get("/customers/{customer_id}/export")
async def export_customer(customer_id: CustomerIdPath, tenant_id: TenantId, erasures: ErasuresDep) -> dict[str, Any]:
    """What ingest holds about the customer (the gateway's export route fans out to it)."""
    return await erasures.export(tenant_id, customer_id)
