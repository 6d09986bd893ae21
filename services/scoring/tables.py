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


TABLES: tuple[type[SQLModel], ...] = (ScoringEvent, ScoringCustomerFeatures, ScoringScore, ScoringModel)
