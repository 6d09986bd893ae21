"""Tables owned by the actions service (all prefixed `actions_`, all carrying tenant_id)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime
from shared.secret_box import EncryptedSecret


class ActionsDecision(SQLModel, table=True):
    """One decision per trigger: the dedup record (UNIQUE tenant_id, score_id) and the audit trail.

    `score_id` is the score decided for trigger "score"; for the other triggers it is a
    deterministic trigger id (contract + end date + step, or the event id), so a repeated sweep
    or a redelivered event finds the decision already taken."""

    __tablename__ = "actions_decisions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "score_id", name="uq_actions_decisions_tenant_score"),
        Index("ix_actions_decisions_tenant_customer", "tenant_id", "customer_id", "decided_at"),
        Index("ix_actions_decisions_tenant_policy", "tenant_id", "policy", "decided_at"),
    )

    decision_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    score_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    trigger: str = Field(default="score", max_length=32)
    policy: str | None = Field(default=None, max_length=128)
    outcome: str = Field(max_length=32)
    reason: str = Field(max_length=128)
    offer_id: str | None = Field(default=None, max_length=64)
    offer_key: str | None = Field(default=None, max_length=64)
    offer_kind: str | None = Field(default=None, max_length=32)
    service: bool | None = None
    offer_cost: float | None = None
    customer_value: float | None = None
    churn_probability: float | None = None
    band: str | None = Field(default=None, max_length=16)
    model_version: str | None = Field(default=None, max_length=128)
    decided_at: datetime = Field(sa_type=UtcDateTime)


class ActionsOffer(SQLModel, table=True):
    __tablename__ = "actions_offers"
    __table_args__ = (
        Index(
            "ix_actions_offers_tenant_customer_created", "tenant_id", "customer_id", "created_at"
        ),
        Index("ix_actions_offers_tenant_policy_created", "tenant_id", "policy", "created_at"),
    )

    offer_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    policy: str = Field(max_length=128)
    kind: str = Field(max_length=32)
    discount_percent: int | None = None
    valid_until: datetime = Field(sa_type=UtcDateTime)
    churn_probability: float | None = None
    band: str | None = Field(default=None, max_length=16)
    model_version: str | None = Field(default=None, max_length=128)
    score_id: str = Field(max_length=128)
    created_at: datetime = Field(sa_type=UtcDateTime)
    trigger: str = Field(default="score", max_length=32)
    offer_key: str | None = Field(default=None, max_length=64)
    service: bool = False
    cost: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class ActionsWebhookSubscription(SQLModel, table=True):
    __tablename__ = "actions_webhook_subscriptions"
    __table_args__ = (Index("ix_actions_webhook_subscriptions_tenant", "tenant_id", "active"),)

    id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    url: str = Field(max_length=2048)
    secret: str = Field(sa_type=EncryptedSecret)  # encrypted at rest (shared.secret_box)
    event_types: list[str] = Field(sa_type=JSON)
    active: bool = True
    created_at: datetime = Field(sa_type=UtcDateTime)
    # Why the subscription stopped (deleted by the tenant, or the receiver answered 410 Gone).
    disabled_reason: str | None = Field(default=None, max_length=200)
    disabled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


DELIVERIES_FILLFACTOR = 50  # PostgreSQL: room on each page for its rows' lease and booking


class ActionsDelivery(SQLModel, table=True):
    """The webhook outbox: written in the decision's transaction, drained by the delivery worker.

    `delivery_id` is the Standard Webhooks message id (`webhook-id`), the same on every retry,
    so receivers can deduplicate. `payload` is the exact JSON text that gets signed and sent.
    A pending row is due at `next_attempt_at`; while a worker holds it (claimed, its attempt
    on the way) `leased_until` says until when: after that (the worker died) any worker may
    take it again. The lease is a column of its own, outside every index, and the table leaves
    half of each page free: a claim's lease is then a HOT update on the row's own page (no new
    index entries; the booking that follows lands on that page too). It halved the WAL per
    delivery, cut PostgreSQL's CPU per delivery by about 13%, and the table is smaller, not
    larger (updates no longer move rows to new pages; docs/benchmarks.md).
    """

    __tablename__ = "actions_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "subscription_id", "offer_id", name="uq_actions_deliveries_subscription_offer"
        ),
        Index("ix_actions_deliveries_due", "status", "next_attempt_at"),
        Index("ix_actions_deliveries_tenant_status", "tenant_id", "status"),
        {"postgresql_with": {"fillfactor": DELIVERIES_FILLFACTOR}},
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
    leased_until: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_error: str | None = Field(default=None, max_length=1000)
    last_status_code: int | None = None
    delivered_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    created_at: datetime = Field(sa_type=UtcDateTime)


class ActionsCustomer(SQLModel, table=True):
    """What actions knows of one customer from `customer-events` (and the latest score).

    Each fact keeps the time of the event it came from (`*_at`), and an older event never
    overwrites a newer one: redelivered or out-of-order events leave the latest state."""

    __tablename__ = "actions_customers"

    tenant_id: str = Field(primary_key=True, max_length=128)
    customer_id: str = Field(primary_key=True, max_length=128)
    marketing_consent: bool | None = None
    consent_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    segment: str | None = Field(default=None, max_length=200)
    attributes: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    profile_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    loyalty_tier: str | None = Field(default=None, max_length=200)
    tier_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_activity_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_complaint_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_nps: int | None = None
    nps_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_csat: int | None = None
    csat_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_score_id: str | None = Field(default=None, max_length=128)
    last_probability: float | None = None
    last_band: str | None = Field(default=None, max_length=16)
    last_model_version: str | None = Field(default=None, max_length=128)
    spend_365d: float | None = None
    last_scored_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    # Set by mark_erased (GDPR Art. 17): every other field is cleared, the row stays as the
    # marker that this customer is never targeted again and never rebuilt from later events.
    erased_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class ActionsContract(SQLModel, table=True):
    """A customer's contract as the subscription events describe it (latest event wins)."""

    __tablename__ = "actions_contracts"
    __table_args__ = (
        Index("ix_actions_contracts_status_end", "status", "end_date"),
        Index("ix_actions_contracts_tenant_customer", "tenant_id", "customer_id"),
    )

    tenant_id: str = Field(primary_key=True, max_length=128)
    contract_id: str = Field(primary_key=True, max_length=128)
    customer_id: str = Field(max_length=128)
    status: str = Field(max_length=16)  # active, notice (cancellation given), ended
    end_date: date | None = None
    auto_renew: bool = False
    price: str | None = Field(default=None, max_length=32)
    notice_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)  # occurred_at of the event applied last


class ActionsActivityDay(SQLModel, table=True):
    """Days on which a customer did anything: the uplift report's "no activity for H days"."""

    __tablename__ = "actions_activity_days"

    tenant_id: str = Field(primary_key=True, max_length=128)
    customer_id: str = Field(primary_key=True, max_length=128)
    day: date = Field(primary_key=True)


class ActionsOfferResponse(SQLModel, table=True):
    """offer.redeemed / offer.declined, once per event id."""

    __tablename__ = "actions_offer_responses"
    __table_args__ = (Index("ix_actions_offer_responses_offer", "tenant_id", "offer_id"),)

    tenant_id: str = Field(primary_key=True, max_length=128)
    event_id: str = Field(primary_key=True, max_length=128)
    customer_id: str = Field(max_length=128)
    offer_id: str = Field(max_length=128)
    response: str = Field(max_length=16)  # redeemed, declined
    occurred_at: datetime = Field(sa_type=UtcDateTime)


class ActionsPolicyDocument(SQLModel, table=True):
    """A tenant's own policy document (API); it replaces the default file for that tenant."""

    __tablename__ = "actions_policy_documents"

    tenant_id: str = Field(primary_key=True, max_length=128)
    document: dict[str, Any] = Field(sa_type=JSON)
    updated_at: datetime = Field(sa_type=UtcDateTime)


class ActionsSweepLease(SQLModel, table=True):
    """Which instance runs the contract-end sweep, until when (shared.leases)."""

    __tablename__ = "actions_sweep_leases"

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(max_length=128)
    expires_at: datetime = Field(sa_type=UtcDateTime)


TABLES: list[type[SQLModel]] = [
    ActionsWebhookSubscription,
    ActionsOffer,
    ActionsDecision,
    ActionsDelivery,
    ActionsCustomer,
    ActionsContract,
    ActionsActivityDay,
    ActionsOfferResponse,
    ActionsPolicyDocument,
    ActionsSweepLease,
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
    secret: str = Field(sa_type=EncryptedSecret)  # encrypted at rest (shared.secret_box)
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
