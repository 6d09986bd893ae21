"""HTTP API of the actions service (called by the gateway only): thin, transaction at the edge.
Webhook subscriptions and deliveries: webhook_routes.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from services.actions import service
from services.actions.deps import EngineDep
from services.actions.schemas import DecisionOut, OfferOut
from shared.app import TenantId
from shared.db import session_scope

router = APIRouter(prefix="/v1")

CustomerId = Annotated[str, Path(min_length=1, max_length=128)]
Limit = Annotated[int, Query(ge=1, le=500)]


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
