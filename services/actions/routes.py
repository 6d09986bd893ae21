"""HTTP API of the actions service (called by the gateway only): thin, transaction at the edge."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from services.actions import service
from services.actions.deps import ClockDep, EngineDep, WorkerDep
from services.actions.schemas import (
    DecisionOut,
    DeliveryOut,
    DeliveryStatus,
    OfferOut,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
)
from shared.app import TenantId
from shared.db import session_scope

router = APIRouter(prefix="/v1")

CustomerId = Annotated[str, Path(min_length=1, max_length=128)]
ObjectId = Annotated[str, Path(min_length=1, max_length=64)]
Limit = Annotated[int, Query(ge=1, le=500)]


@router.post(
    "/webhooks",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    tags=["webhooks"],
)
def create_webhook(
    body: WebhookCreate, tenant: TenantId, engine: EngineDep, clock: ClockDep
) -> WebhookCreated:
    """Subscribe a URL to signed webhooks. The secret is returned only here."""
    with session_scope(engine) as session:
        subscription = service.create_subscription(
            session,
            tenant,
            str(body.url),
            clock.now(),
            secret=body.secret,
            event_types=body.event_types,
        )
    return WebhookCreated.model_validate(subscription)


@router.get("/webhooks", response_model=list[WebhookOut], tags=["webhooks"])
def list_webhooks(tenant: TenantId, engine: EngineDep) -> list[WebhookOut]:
    with session_scope(engine) as session:
        rows = service.list_subscriptions(session, tenant)
    return [WebhookOut.model_validate(r) for r in rows]


@router.delete(
    "/webhooks/{subscription_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["webhooks"]
)
def delete_webhook(
    subscription_id: ObjectId, tenant: TenantId, engine: EngineDep, clock: ClockDep
) -> Response:
    """Stop sending to this URL; its pending deliveries are parked."""
    try:
        with session_scope(engine) as session:
            service.delete_subscription(session, tenant, subscription_id, clock.now())
    except service.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/customers/{customer_id}/offers", response_model=list[OfferOut], tags=["customers"])
def customer_offers(
    customer_id: CustomerId, tenant: TenantId, engine: EngineDep, limit: Limit = 100
) -> list[OfferOut]:
    with session_scope(engine) as session:
        rows = service.list_offers(session, tenant, customer_id, limit)
    return [OfferOut.model_validate(r) for r in rows]


@router.get(
    "/customers/{customer_id}/decisions", response_model=list[DecisionOut], tags=["customers"]
)
def customer_decisions(
    customer_id: CustomerId, tenant: TenantId, engine: EngineDep, limit: Limit = 100
) -> list[DecisionOut]:
    """Every decision taken on this customer's scores, newest first, with outcome and reason."""
    with session_scope(engine) as session:
        rows = service.list_decisions(session, tenant, customer_id, limit)
    return [DecisionOut.model_validate(r) for r in rows]


@router.get("/deliveries", response_model=list[DeliveryOut], tags=["deliveries"])
def list_deliveries(
    tenant: TenantId,
    engine: EngineDep,
    status_filter: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: Limit = 100,
) -> list[DeliveryOut]:
    with session_scope(engine) as session:
        rows = service.list_deliveries(session, tenant, status_filter, limit)
    return [DeliveryOut.model_validate(r) for r in rows]


@router.post("/deliveries/{delivery_id}/replay", response_model=DeliveryOut, tags=["deliveries"])
def replay_delivery(
    delivery_id: ObjectId, tenant: TenantId, engine: EngineDep, clock: ClockDep, worker: WorkerDep
) -> DeliveryOut:
    """Send a parked or failing delivery again now, with a fresh retry schedule."""
    try:
        with session_scope(engine) as session:
            delivery = service.replay_delivery(session, tenant, delivery_id, clock.now())
    except service.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except service.Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    worker.wake()
    return DeliveryOut.model_validate(delivery)
