"""Request and response bodies of the actions HTTP API."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.actions.policies import PolicyDocument

# Webhook subscription and delivery bodies: services/actions/webhook_schemas.py


class OfferOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    offer_id: str
    customer_id: str
    policy: str
    kind: str
    discount_percent: int | None
    valid_until: datetime
    churn_probability: float | None
    band: str | None
    model_version: str | None
    score_id: str = Field(description="The score, or the deterministic id of another trigger.")
    created_at: datetime
    trigger: str
    offer_key: str | None
    service: bool
    cost: float
    details: dict[str, Any]


class DecisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    decision_id: str
    score_id: str = Field(description="The score, or the deterministic id of another trigger.")
    customer_id: str
    trigger: str
    policy: str | None
    outcome: str
    reason: str = Field(
        description="matched, no_match, cooldown, consent, holdout, budget, value_gate, erased."
    )
    offer_id: str | None
    offer_key: str | None
    offer_kind: str | None
    service: bool | None
    offer_cost: float | None
    customer_value: float | None
    churn_probability: float | None
    band: str | None
    model_version: str | None
    decided_at: datetime


class PoliciesOut(BaseModel):
    source: Literal["default", "tenant"] = Field(
        description="default: the policy file applies (the tenant defined none); tenant: its own."
    )
    document: PolicyDocument


class ContractOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    contract_id: str
    status: str
    end_date: date | None
    auto_renew: bool
    notice_at: datetime | None
    ended_at: datetime | None


class CustomerStateOut(BaseModel):
    """What actions knows of a customer from customer-events (no profile data beyond what
    policies use: consent, segment, attributes, tier, feedback, contracts)."""

    customer_id: str
    known: bool
    marketing_consent: bool | None = None
    segment: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    loyalty_tier: str | None = None
    last_activity_at: datetime | None = None
    last_complaint_at: datetime | None = None
    last_nps: int | None = None
    last_csat: int | None = None
    last_probability: float | None = None
    last_band: str | None = None
    contracts: list[ContractOut] = Field(default_factory=list)


class UpliftGroupOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    policy: str
    band: str = Field(description="Risk band at the decision; `all` sums the policy's bands.")
    treated_customers: int
    control_customers: int
    treated_churned: int
    control_churned: int
    treated_churn_rate: float | None
    control_churn_rate: float | None
    uplift: float | None = Field(description="Control churn rate minus treated churn rate.")
    uplift_ci_low: float | None
    uplift_ci_high: float | None
    redemptions: int
    offer_cost: float
    retained_customers: float | None
    retained_revenue: float | None
    roi: float | None


class UpliftReportOut(BaseModel):
    as_of: datetime
    horizon_days: int
    interval: str
    groups: list[UpliftGroupOut]
