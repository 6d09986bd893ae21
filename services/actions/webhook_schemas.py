"""Request and response bodies of the webhook subscription and deliveries API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    UrlConstraints,
    field_validator,
    model_validator,
)

from services.actions import webhooks
from shared.events import RFC3339DateTime

WebhookEventType = Literal["offer.created"]
DeliveryStatus = Literal["pending", "delivered", "parked"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[HttpUrl, UrlConstraints(max_length=2000)] = Field(
        description="Where to POST events: https, to a public address (http and local "
        "addresses only when CHURNGUARD_ACTIONS_WEBHOOK_ALLOW_LOCAL_URLS is on).",
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
        return None if value is None else webhooks.check_secret(value)


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    event_types: list[str]
    active: bool
    created_at: datetime
    disabled_reason: str | None = None
    disabled_at: datetime | None = None


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Shown only in this response: keep it to verify signatures.")


class RotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret: str | None = Field(
        None, description="The new secret (`whsec_` + base64). Generated when omitted.", max_length=200
    )

    @field_validator("secret")
    @classmethod
    def _secret_format(cls, value: str | None) -> str | None:
        return None if value is None else webhooks.check_secret(value)


class SecretRotated(BaseModel):
    id: str
    secret: str = Field(description="The new secret, shown only in this response.")
    previous_secret_expires_at: datetime = Field(
        description="Until then every request is signed with the previous secret as well."
    )


class AttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempted_at: datetime
    outcome: str
    status_code: int | None
    error: str | None
    latency_ms: float


class DeliveryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    delivery_id: str = Field(description="The webhook-id header: the same on every retry.")
    subscription_id: str
    offer_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int = Field(description="Attempts since the delivery was created or last replayed.")
    next_attempt_at: datetime
    leased_until: datetime | None = Field(
        description="Set while a worker holds the delivery (an attempt on its way): until when. "
        "If that worker dies, the delivery is attempted again after this, with the same webhook-id."
    )
    last_error: str | None
    last_status_code: int | None
    delivered_at: datetime | None
    created_at: datetime
    payload: dict[str, Any]
    attempt_log: list[AttemptOut] = Field(
        default_factory=list, description="Every attempt, replays included, oldest first."
    )

    @field_validator("payload", mode="before")
    @classmethod
    def _parse_payload(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, (str, bytes)) else value

    @classmethod
    def of(cls, item: webhooks.DeliveryWithAttempts) -> DeliveryOut:
        out = cls.model_validate(item.delivery)
        out.attempt_log = [AttemptOut.model_validate(a) for a in item.attempts]
        return out


class ReplayRange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    created_from: RFC3339DateTime = Field(description="Parked deliveries created at or after this.")
    created_to: RFC3339DateTime = Field(description="... and before this.")
    subscription_id: str | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _ordered(self) -> ReplayRange:
        if self.created_to <= self.created_from:
            raise ValueError("created_to must be after created_from")
        return self


class RangeReplayed(BaseModel):
    replayed: list[str] = Field(description="Delivery ids queued again (same webhook-ids).")
    skipped_inactive_subscription: list[str]
