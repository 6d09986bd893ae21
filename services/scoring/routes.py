"""Scoring's read API (called through the gateway): latest score per customer, the model registry."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel

from services.scoring import service
from services.scoring.deps import SessionDep
from shared.app import TenantId
from shared.events import RiskBand

router = APIRouter(prefix="/v1", tags=["scoring"])


class CustomerScoreOut(BaseModel):
    customer_id: str
    probability: float
    band: RiskBand
    model_version: str
    scored_at: datetime
    score_id: str
    event_id: str | None
    features: dict[str, float]


class ModelOut(BaseModel):
    version: str
    algorithm: str
    active: bool
    roc_auc: float
    baseline_auc: float
    feature_names: list[str]
    n_train: int
    n_holdout: int
    horizon_days: int
    trained_on_tenant: str
    trained_at: datetime


CustomerIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The tenant's customer id.")]


@router.get("/customers/{customer_id}/score", response_model=CustomerScoreOut)
def get_customer_score(customer_id: CustomerIdPath, tenant_id: TenantId, session: SessionDep) -> CustomerScoreOut:
    score = service.latest_score(session, tenant_id, customer_id)
    if score is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no score for customer {customer_id!r} yet")
    return CustomerScoreOut(**vars(score))


@router.get("/models", response_model=list[ModelOut])
def get_models(_tenant_id: TenantId, session: SessionDep) -> list[ModelOut]:
    """The model registry (global in this version), newest first, without artifacts."""
    return [ModelOut(**row) for row in service.list_models(session)]
