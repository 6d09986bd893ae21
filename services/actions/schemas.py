"""Request and response bodies of the actions HTTP API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, UrlConstraints, field_validator

from services.actions import service

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
    discount_percent: int
    valid_until: datetime
    churn_probability: float
    band: str
    model_version: str
    score_id: str
    created_at: datetime


class DecisionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    decision_id: str
    score_id: str
    customer_id: str
    policy: str | None
    outcome: str
    reason: str
    offer_id: str | None
    churn_probability: float
    band: str
    model_version: str
    decided_at: datetime


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
