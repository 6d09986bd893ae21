"""Scoring's read API (called through the gateway): latest score per customer, the model registry."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from pydantic import BaseModel, Field

from services.scoring import erasure, service
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
    reasons: list[str] = Field(
        default_factory=list,
        description="Top contributing reasons (at most 3), in plain language, most important first; "
        "derived from the model: only features whose actual value raises the risk.",
    )


class CalibrationBin(BaseModel):
    lower: float
    upper: float
    count: int
    mean_predicted: float = Field(description="mean predicted churn probability in the bin")
    observed: float = Field(description="share of the bin that actually churned")


class CandidateOut(BaseModel):
    name: str
    algorithm: str
    roc_auc: float
    winner: bool


class ImportanceOut(BaseModel):
    feature: str
    mean: float = Field(description="mean drop in validation ROC AUC when the feature is shuffled")
    std: float


class ModelOut(BaseModel):
    version: str
    algorithm: str
    candidate: str = Field(description="the winning candidate's short name")
    active: bool
    roc_auc: float = Field(description="ROC AUC on the validation period")
    baseline_auc: float = Field(description="the recency-only baseline's ROC AUC on the validation period")
    runner_up_auc: float | None = Field(description="the losing candidate's ROC AUC on the validation period")
    pr_auc: float | None
    brier: float | None
    lift_top_decile: float | None = Field(description="churn rate in the riskiest tenth / overall churn rate")
    feature_names: list[str]
    n_train: int
    n_holdout: int
    horizon_days: int
    first_cutoff: datetime | None
    last_cutoff: datetime | None
    validation_cutoff: datetime | None
    trained_on_tenant: str
    trained_at: datetime
    activated_at: datetime | None
    previous_version: str | None = Field(description="the model a rollback from this one re-activates")
    report_path: str | None
    served_from: Literal["arrays", "artifact"] = Field(
        description="what scoring loads: `arrays`, the model's serving arrays (numpy alone); `artifact`, its "
        "skops file through sklearn (a model of a kind without serving arrays, or one not loaded since they "
        "were introduced: its first load writes them)")


class ModelDetailOut(ModelOut):
    calibration: list[CalibrationBin] = Field(description="10 equal-count bins of the predicted probability")
    candidates: list[CandidateOut]
    importance: list[ImportanceOut] = Field(description="permutation importance on the validation period")
    reasons_reference: dict[str, float] = Field(
        description="the typical customer a score's reasons are measured against: per-feature medians of the "
        "training examples (empty for a model registered before references were stored: reasons then use a fixed one)")




CustomerIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The tenant's customer id.")]
VersionPath = Annotated[str, Path(min_length=1, max_length=64, description="A model version, e.g. m-20260601120000-1a2b.")]


# Documented answers besides the success (the gateway's schemathesis run checks every status).
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such customer score or model."}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": "The registry's state forbids this."}}
FORBIDDEN: dict[int | str, dict[str, Any]] = {403: {"description": "Not an operator tenant."}}


@router.get("/customers/{customer_id}/score", response_model=CustomerScoreOut, responses=NOT_FOUND)
def get_customer_score(customer_id: CustomerIdPath, tenant_id: TenantId, session: SessionDep) -> CustomerScoreOut:
    score = service.latest_score(session, tenant_id, customer_id)
    if score is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no score for customer {customer_id!r} yet")
    return CustomerScoreOut(**vars(score))


def _sees_model(request: Request, tenant_id: str, row: dict[str, Any]) -> bool:
    """A model's metrics come from the history it was trained on: its tenant and the operators
    (CHURNGUARD_SCORING_MODEL_ADMIN_TENANTS) see it, nobody else."""
    return row["trained_on_tenant"] == tenant_id or tenant_id in request.state.scoring.settings.model_admin_tenants


@router.get("/models", response_model=list[ModelOut])
def get_models(request: Request, tenant_id: TenantId, session: SessionDep) -> list[ModelOut]:
    """The models trained on this tenant's history (operators: all), newest first, without
    artifacts."""
    return [ModelOut(**row) for row in service.list_models(session) if _sees_model(request, tenant_id, row)]


@router.get("/models/{version}", response_model=ModelDetailOut, responses=NOT_FOUND)
def get_model(version: VersionPath, request: Request, tenant_id: TenantId, session: SessionDep) -> ModelDetailOut:
    """One model with its validation metrics, calibration bins, candidates and feature importance."""
    try:
        row = service.model_detail(session, version)
    except service.ModelNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    if not _sees_model(request, tenant_id, row):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {version!r}")
    return ModelDetailOut(**row)


def _now(request: Request) -> datetime:
    return request.state.scoring.clock.now()


def model_admin(request: Request, tenant_id: TenantId) -> str:
    if tenant_id not in request.state.scoring.settings.model_admin_tenants:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "the model registry is shared by every tenant: promoting or rolling back is limited to "
            "operator tenants (CHURNGUARD_SCORING_MODEL_ADMIN_TENANTS)",
        )
    return tenant_id


ModelAdmin = Annotated[str, Depends(model_admin)]


@router.post("/models/rollback", response_model=ModelDetailOut, responses={**FORBIDDEN, **CONFLICT})
def rollback_model(request: Request, _tenant_id: ModelAdmin, session: SessionDep) -> ModelDetailOut:
    """Re-activate the model that was active before the current one (409 if there is none).
    Running scorers switch at their next registry refresh."""
    try:
        return ModelDetailOut(**service.rollback_model(session, _now(request)))
    except service.RegistryConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc


@router.post("/models/{version}/promote", response_model=ModelDetailOut,
             responses={**FORBIDDEN, **NOT_FOUND, **CONFLICT})
def promote_model(version: VersionPath, request: Request, _tenant_id: ModelAdmin, session: SessionDep) -> ModelDetailOut:
    """Make this model the active one, after checking its artifact loads (409 if not).
    Running scorers switch at their next registry refresh."""
    try:
        return ModelDetailOut(**service.promote_model(session, version, _now(request)))
    except service.ModelNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except service.RegistryConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc


# Not in the gateway's route table: the gateway's export route fans out to it (services/gateway/export.py).
internal_router = APIRouter(prefix="/internal/v1", tags=["internal"], include_in_schema=False)


@internal_router.get("/customers/{customer_id}/export")
def export_customer(customer_id: CustomerIdPath, tenant_id: TenantId, session: SessionDep) -> dict[str, Any]:
    """Everything scoring holds about the customer (GDPR Art. 15/20): event history with flags,
    features, scores with reasons, and the erasure tombstone if any."""
    section = erasure.export(session, tenant_id, customer_id)
    return {**section, "held": erasure.holds_anything(section)}
