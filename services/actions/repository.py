"""All SQL of the actions service.

Tenant-facing queries always filter by tenant_id. The delivery worker's queries (claiming due
deliveries, counting the outbox) are system-wide by nature and say so in their names.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from services.actions.tables import (
    ActionsDecision,
    ActionsDelivery,
    ActionsOffer,
    ActionsWebhookSubscription,
)

# --- decisions and offers -----------------------------------------------------------


def get_decision(session: Session, tenant_id: str, score_id: str) -> ActionsDecision | None:
    return session.exec(
        select(ActionsDecision).where(
            ActionsDecision.tenant_id == tenant_id, ActionsDecision.score_id == score_id
        )
    ).first()


def last_offer_at(session: Session, tenant_id: str, customer_id: str) -> datetime | None:
    return session.exec(
        select(func.max(ActionsOffer.created_at)).where(
            ActionsOffer.tenant_id == tenant_id, ActionsOffer.customer_id == customer_id
        )
    ).first()


def list_offers(
    session: Session, tenant_id: str, customer_id: str, limit: int
) -> Sequence[ActionsOffer]:
    return session.exec(
        select(ActionsOffer)
        .where(ActionsOffer.tenant_id == tenant_id, ActionsOffer.customer_id == customer_id)
        .order_by(col(ActionsOffer.created_at).desc(), col(ActionsOffer.offer_id))
        .limit(limit)
    ).all()


def list_decisions(
    session: Session, tenant_id: str, customer_id: str, limit: int
) -> Sequence[ActionsDecision]:
    return session.exec(
        select(ActionsDecision)
        .where(ActionsDecision.tenant_id == tenant_id, ActionsDecision.customer_id == customer_id)
        .order_by(col(ActionsDecision.decided_at).desc(), col(ActionsDecision.decision_id))
        .limit(limit)
    ).all()


# --- webhook subscriptions ----------------------------------------------------------


def get_subscription(
    session: Session, tenant_id: str, subscription_id: str
) -> ActionsWebhookSubscription | None:
    return session.exec(
        select(ActionsWebhookSubscription).where(
            ActionsWebhookSubscription.tenant_id == tenant_id,
            ActionsWebhookSubscription.id == subscription_id,
        )
    ).first()


def active_subscriptions(session: Session, tenant_id: str) -> Sequence[ActionsWebhookSubscription]:
    return session.exec(
        select(ActionsWebhookSubscription)
        .where(
            ActionsWebhookSubscription.tenant_id == tenant_id,
            col(ActionsWebhookSubscription.active).is_(True),
        )
        .order_by(col(ActionsWebhookSubscription.created_at), col(ActionsWebhookSubscription.id))
    ).all()


def pending_deliveries_of_subscription(
    session: Session, tenant_id: str, subscription_id: str
) -> Sequence[ActionsDelivery]:
    return session.exec(
        select(ActionsDelivery).where(
            ActionsDelivery.tenant_id == tenant_id,
            ActionsDelivery.subscription_id == subscription_id,
            ActionsDelivery.status == "pending",
        )
    ).all()


# --- deliveries (tenant-facing) -----------------------------------------------------


def get_delivery(session: Session, tenant_id: str, delivery_id: str) -> ActionsDelivery | None:
    return session.exec(
        select(ActionsDelivery).where(
            ActionsDelivery.tenant_id == tenant_id, ActionsDelivery.delivery_id == delivery_id
        )
    ).first()


def list_deliveries(
    session: Session, tenant_id: str, status: str | None, limit: int
) -> Sequence[ActionsDelivery]:
    query = select(ActionsDelivery).where(ActionsDelivery.tenant_id == tenant_id)
    if status is not None:
        query = query.where(ActionsDelivery.status == status)
    return session.exec(
        query.order_by(
            col(ActionsDelivery.created_at).desc(), col(ActionsDelivery.delivery_id)
        ).limit(limit)
    ).all()


# --- deliveries (the worker: system-wide) -------------------------------------------


def lock_due_deliveries(session: Session, now: datetime, limit: int) -> Sequence[ActionsDelivery]:
    """Due pending deliveries, oldest first, row-locked. On PostgreSQL `FOR UPDATE SKIP LOCKED`
    lets several workers claim disjoint rows; SQLite ignores the clause (one writer anyway)."""
    return session.exec(
        select(ActionsDelivery)
        .where(ActionsDelivery.status == "pending", col(ActionsDelivery.next_attempt_at) <= now)
        .order_by(col(ActionsDelivery.next_attempt_at), col(ActionsDelivery.delivery_id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def subscriptions_by_id(
    session: Session, ids: Sequence[str]
) -> dict[str, ActionsWebhookSubscription]:
    if not ids:
        return {}
    rows = session.exec(
        select(ActionsWebhookSubscription).where(col(ActionsWebhookSubscription.id).in_(list(ids)))
    ).all()
    return {row.id: row for row in rows}


def lock_delivery(session: Session, delivery_id: str) -> ActionsDelivery | None:
    return session.exec(
        select(ActionsDelivery).where(ActionsDelivery.delivery_id == delivery_id).with_for_update()
    ).first()


def count_open_deliveries(session: Session) -> dict[str, int]:
    """Pending and parked deliveries, by status (delivered rows are history and not counted)."""
    rows = session.exec(
        select(ActionsDelivery.status, func.count())
        .where(col(ActionsDelivery.status).in_(["pending", "parked"]))
        .group_by(ActionsDelivery.status)
    ).all()
    return {status: count for status, count in rows}
