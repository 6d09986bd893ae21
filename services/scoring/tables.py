"""Scoring's own tables: event history, current features, scores, the model registry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime


def _ts(**kwargs: Any) -> Any:
    return Field(sa_column=Column(UtcDateTime, nullable=False, **kwargs))


class ScoringEvent(SQLModel, table=True):
    """Every customer event scoring has seen; (tenant_id, event_id) makes redelivery a no-op."""

    __tablename__ = "scoring_events"
    __table_args__ = (
        UniqueConstraint("tenant_id", "event_id", name="uq_scoring_events_tenant_event"),
        Index("ix_scoring_events_history", "tenant_id", "customer_id", "occurred_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=128)
    event_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    type: str = Field(max_length=64)
    occurred_at: datetime = _ts()
    received_at: datetime = _ts()
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ScoringCustomerFeatures(SQLModel, table=True):
    """The latest feature vector per customer (what the latest score was computed from)."""

    __tablename__ = "scoring_customer_features"

    tenant_id: str = Field(max_length=128, primary_key=True)
    customer_id: str = Field(max_length=128, primary_key=True)
    features: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_at: datetime = _ts()


class ScoringScore(SQLModel, table=True):
    """One score per consumed event; score_id is deterministic from tenant + event id."""

    __tablename__ = "scoring_scores"
    __table_args__ = (Index("ix_scoring_scores_latest", "tenant_id", "customer_id", "scored_at"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    score_id: str = Field(max_length=64, unique=True)
    probability: float
    band: str = Field(max_length=16)
    model_version: str = Field(max_length=64)
    scored_at: datetime = _ts()
    event_id: str | None = Field(default=None, max_length=128)
    reasons: list[str] = Field(
        default_factory=list,
        sa_column=Column(JSON, nullable=False, default=lambda: [], server_default=text("'[]'")),
        description="Top contributing reasons in plain language, most important first (services.scoring.reasons).",
    )


class ScoringModel(SQLModel, table=True):
    """The model registry. Models are global (not per tenant) in this version; at most one is active."""

    __tablename__ = "scoring_models"
    __table_args__ = (
        Index(
            "uq_scoring_models_one_active", "active", unique=True,
            sqlite_where=text("active"), postgresql_where=text("active"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    version: str = Field(max_length=64, unique=True)
    algorithm: str = Field(max_length=200)
    roc_auc: float
    baseline_auc: float
    feature_names: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    n_train: int
    n_holdout: int
    horizon_days: int
    trained_on_tenant: str = Field(max_length=128, description="whose history it was trained on")
    trained_at: datetime = _ts()
    active: bool = False
    artifact: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    serving: bytes | None = Field(
        default=None, sa_column=Column(LargeBinary, nullable=True),
        description="the model as numpy arrays (.npz, services.scoring.serving), what scoring loads; "
                    "NULL for a model of another kind or registered before them: scoring loads the artifact",
    )
    # training window and validation-period metrics (model.TrainReport)
    candidate: str = Field(default="", max_length=64, description="winning candidate's short name")
    first_cutoff: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    last_cutoff: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    validation_cutoff: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    pr_auc: float | None = None
    brier: float | None = None
    lift_top_decile: float | None = None
    runner_up_auc: float | None = Field(default=None, description="the losing candidate's ROC AUC")
    calibration: list[dict[str, float]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    candidates: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    importance: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    validation: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False),
        description="labels, probabilities and baseline scores of the validation period (report charts)",
    )
    report_path: str | None = Field(default=None, max_length=500)
    reasons_reference: dict[str, float] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False, server_default=text("'{}'")),
        description="per-feature training medians: the typical customer reasons are measured against",
    )
    # activation history: rollback follows previous_version
    activated_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    previous_version: str | None = Field(default=None, max_length=64)


class ScoringEventFlag(SQLModel, table=True):
    """Why a stored event's data is (partly) unusable for features (features.FLAG_REASONS).
    The event stays in scoring_events; features ignore the flagged part."""

    __tablename__ = "scoring_event_flags"

    tenant_id: str = Field(max_length=128, primary_key=True)
    event_id: str = Field(max_length=128, primary_key=True)
    reason: str = Field(max_length=32, primary_key=True)
    customer_id: str = Field(max_length=128)
    flagged_at: datetime = _ts()


class ScoringSweepLease(SQLModel, table=True):
    """Which instance runs the periodic re-score sweep, until when (one row per sweep name)."""

    __tablename__ = "scoring_sweep_leases"

    name: str = Field(max_length=64, primary_key=True)
    holder: str = Field(max_length=128)
    expires_at: datetime = _ts()


class ScoringErasure(SQLModel, table=True):
    """Tombstone of an erased customer (GDPR Art. 17): everything else about them is deleted,
    and their later events are neither stored nor scored (services.scoring.erasure)."""

    __tablename__ = "scoring_erasures"

    tenant_id: str = Field(max_length=128, primary_key=True)
    customer_id: str = Field(max_length=128, primary_key=True)
    erasure_id: str = Field(max_length=128)
    erased_at: datetime = _ts()


class ScoringHistoryMark(SQLModel, table=True):
    """Bumped whenever a tenant's stored history changes other than by the event consumer (a
    history import, the retention purge): consumers then drop their cached histories of that
    tenant (services.scoring.history_cache). No customer data."""

    __tablename__ = "scoring_history_marks"

    tenant_id: str = Field(max_length=128, primary_key=True)
    generation: int = 0


TABLES: tuple[type[SQLModel], ...] = (
    ScoringEvent, ScoringCustomerFeatures, ScoringScore, ScoringModel, ScoringEventFlag, ScoringSweepLease,
    ScoringErasure, ScoringHistoryMark,
)
