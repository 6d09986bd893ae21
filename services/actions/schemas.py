"""Request and response bodies of the actions HTTP API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

# Webhook subscription and delivery bodies: services/actions/webhook_schemas.py


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
