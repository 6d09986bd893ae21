"""Tables owned by the actions service (all prefixed `actions_`, all carrying tenant_id)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime


class ActionsDecision(SQLModel, table=True):
    """One decision per score: the dedup record (UNIQUE tenant_id, score_id) and the audit trail."""

    __tablename__ = "actions_decisions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "score_id", name="uq_actions_decisions_tenant_score"),
        Index("ix_actions_decisions_tenant_customer", "tenant_id", "customer_id", "decided_at"),
    )

    decision_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    score_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    policy: str | None = Field(default=None, max_length=128)
    outcome: str = Field(max_length=32)
    reason: str = Field(max_length=128)
    offer_id: str | None = Field(default=None, max_length=64)
    churn_probability: float
    band: str = Field(max_length=16)
    model_version: str = Field(max_length=128)
    decided_at: datetime = Field(sa_type=UtcDateTime)


class ActionsOffer(SQLModel, table=True):
    __tablename__ = "actions_offers"
    __table_args__ = (
        Index(
            "ix_actions_offers_tenant_customer_created", "tenant_id", "customer_id", "created_at"
        ),
    )

    offer_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    policy: str = Field(max_length=128)
    kind: str = Field(max_length=32)
    discount_percent: int
    valid_until: datetime = Field(sa_type=UtcDateTime)
    churn_probability: float
    band: str = Field(max_length=16)
    model_version: str = Field(max_length=128)
    score_id: str = Field(max_length=128)
    created_at: datetime = Field(sa_type=UtcDateTime)


class ActionsWebhookSubscription(SQLModel, table=True):
    __tablename__ = "actions_webhook_subscriptions"
    __table_args__ = (Index("ix_actions_webhook_subscriptions_tenant", "tenant_id", "active"),)

    id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    url: str = Field(max_length=2048)
    secret: str = Field(max_length=256)
    event_types: list[str] = Field(sa_type=JSON)
    active: bool = True
    created_at: datetime = Field(sa_type=UtcDateTime)
    # Why the subscription stopped (deleted by the tenant, or the receiver answered 410 Gone).
    disabled_reason: str | None = Field(default=None, max_length=200)
    disabled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class ActionsDelivery(SQLModel, table=True):
    """The webhook outbox: written in the decision's transaction, drained by the delivery worker.

    `delivery_id` is the Standard Webhooks message id (`webhook-id`), the same on every retry,
    so receivers can deduplicate. `payload` is the exact JSON text that gets signed and sent.
    """

    __tablename__ = "actions_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "subscription_id", "offer_id", name="uq_actions_deliveries_subscription_offer"
        ),
        Index("ix_actions_deliveries_due", "status", "next_attempt_at"),
        Index("ix_actions_deliveries_tenant_status", "tenant_id", "status"),
    )

    delivery_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    subscription_id: str = Field(max_length=64, foreign_key="actions_webhook_subscriptions.id")
    offer_id: str = Field(max_length=64, foreign_key="actions_offers.offer_id")
    event_type: str = Field(max_length=64)
    payload: str = Field(sa_type=Text)
    status: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_type=UtcDateTime)
    last_error: str | None = Field(default=None, max_length=1000)
    last_status_code: int | None = None
    delivered_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(sa_type=UtcDateTime)


TABLES: list[type[SQLModel]] = [
    ActionsWebhookSubscription,
    ActionsOffer,
    ActionsDecision,
    ActionsDelivery,
]


# --- webhooks: secret rotation and the attempt log ------------------------------------


class ActionsWebhookSecret(SQLModel, table=True):
    """A previous signing secret of a subscription, still used (beside the current one) until
    `expires_at`: the overlap of a rotation, so receivers can switch without losing webhooks."""

    __tablename__ = "actions_webhook_secrets"
    __table_args__ = (Index("ix_actions_webhook_secrets_subscription", "subscription_id"),)

    id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    subscription_id: str = Field(max_length=64, foreign_key="actions_webhook_subscriptions.id")
    secret: str = Field(max_length=256)
    created_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime)


class ActionsDeliveryAttempt(SQLModel, table=True):
    """One HTTP attempt of a delivery: what the receiver answered (or the error), and how long
    it took. `attempted_at` is the injected clock; `latency_ms` is measured wall time."""

    __tablename__ = "actions_delivery_attempts"
    __table_args__ = (
        Index("ix_actions_delivery_attempts_delivery", "delivery_id", "attempted_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(max_length=64, foreign_key="actions_deliveries.delivery_id")
    tenant_id: str = Field(max_length=128)
    outcome: str = Field(max_length=16)
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=1000)
    latency_ms: float
    attempted_at: datetime = Field(sa_type=UtcDateTime)


TABLES += [ActionsWebhookSecret, ActionsDeliveryAttempt]
