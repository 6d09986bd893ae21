"""Request and response bodies of the actions HTTP API."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, UrlConstraints, field_validator

from services.actions import service
from services.actions.policies import PolicyDocument

WebhookEventType = Literal["offer.created"]
DeliveryStatus = Literal["pending", "delivered", "parked"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[HttpUrl, UrlConstraints(max_length=2000)] = Field(
        description="Where to POST events (http or https).",
        examples=["https://crm.example.com/hooks/churnguard"],
    )
    secret: str | None = Field(
        None,
        description="Signing secret, `whsec_` + base64 of 24-64 bytes. Generated when omitted.",
        max_length=200,
    )
    event_types: list[WebhookEventType] = Field(
        default_factory=lambda: ["offer.created"], min_length=1, max_length=10
    )

    @field_validator("secret")
    @classmethod
    def _secret_format(cls, value: str | None) -> str | None:
        return None if value is None else service.check_secret(value)


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    event_types: list[str]
    active: bool
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Shown only in this response: keep it to verify signatures.")


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


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    delivery_id: str = Field(description="The webhook-id header: the same on every retry.")
    subscription_id: str
    offer_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    last_status_code: int | None
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any]

    @field_validator("payload", mode="before")
    @classmethod
    def _parse_payload(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, (str, bytes)) else value
