"""All SQL of the webhook part of the actions service (subscriptions, secrets, the outbox and
its attempt log).

Tenant-facing queries always filter by tenant_id. The delivery worker's queries (claiming due
deliveries, counting the outbox) are system-wide by nature and say so in their docstrings.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, text, update
from sqlmodel import Session, col, select

from services.actions.tables import (
    ActionsDelivery,
    ActionsDeliveryAttempt,
    ActionsWebhookSecret,
    ActionsWebhookSubscription,
)

# --- subscriptions and secrets -------------------------------------------------------


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


def active_subscription_events(session: Session, tenant_id: str) -> list[tuple[str, list[str]]]:
    """(id, event types) of the tenant's active subscriptions, oldest first (no secrets read)."""
    s = ActionsWebhookSubscription
    rows = session.exec(
        select(s.id, s.event_types)
        .where(s.tenant_id == tenant_id, col(s.active).is_(True))
        .order_by(col(s.created_at), col(s.id))
    ).all()
    return [(row[0], list(row[1] or [])) for row in rows]


def subscriptions_by_id(
    session: Session, ids: Sequence[str]
) -> dict[str, ActionsWebhookSubscription]:
    """System-wide (the worker)."""
    if not ids:
        return {}
    rows = session.exec(
        select(ActionsWebhookSubscription).where(col(ActionsWebhookSubscription.id).in_(list(ids)))
    ).all()
    return {row.id: row for row in rows}


def live_previous_secrets(
    session: Session, subscription_ids: Sequence[str], now: datetime
) -> dict[str, list[str]]:
    """Previous secrets still inside their rotation overlap, newest first, per subscription."""
    if not subscription_ids:
        return {}
    rows = session.exec(
        select(ActionsWebhookSecret)
        .where(
            col(ActionsWebhookSecret.subscription_id).in_(list(subscription_ids)),
            col(ActionsWebhookSecret.expires_at) > now,
        )
        .order_by(col(ActionsWebhookSecret.created_at).desc())
    ).all()
    result: dict[str, list[str]] = {}
    for row in rows:
        result.setdefault(row.subscription_id, []).append(row.secret)
    return result


# --- deliveries (tenant-facing) --------------------------------------------------------


def read_one_snapshot(session: Session) -> None:
    """Make the rest of this (read) transaction see one snapshot, so a delivery and its attempt
    log read by two queries agree. PostgreSQL reads each statement's own snapshot by default;
    SQLite already reads one snapshot per transaction. Must come first in the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))


def get_delivery(session: Session, tenant_id: str, delivery_id: str) -> ActionsDelivery | None:
    return session.exec(
        select(ActionsDelivery).where(
            ActionsDelivery.tenant_id == tenant_id, ActionsDelivery.delivery_id == delivery_id
        )
    ).first()


def list_deliveries(
    session: Session,
    tenant_id: str,
    *,
    status: str | None = None,
    subscription_id: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    limit: int = 100,
    lock: bool = False,
) -> Sequence[ActionsDelivery]:
    """Newest first. `created_from` is inclusive, `created_to` exclusive."""
    query = select(ActionsDelivery).where(ActionsDelivery.tenant_id == tenant_id)
    if status is not None:
        query = query.where(ActionsDelivery.status == status)
    if subscription_id is not None:
        query = query.where(ActionsDelivery.subscription_id == subscription_id)
    if created_from is not None:
        query = query.where(col(ActionsDelivery.created_at) >= created_from)
    if created_to is not None:
        query = query.where(col(ActionsDelivery.created_at) < created_to)
    query = query.order_by(
        col(ActionsDelivery.created_at).desc(), col(ActionsDelivery.delivery_id)
    ).limit(limit)
    if lock:
        query = query.with_for_update()
    return session.exec(query).all()


def attempts_of(
    session: Session, tenant_id: str, delivery_ids: Sequence[str]
) -> dict[str, list[ActionsDeliveryAttempt]]:
    if not delivery_ids:
        return {}
    rows = session.exec(
        select(ActionsDeliveryAttempt)
        .where(
            ActionsDeliveryAttempt.tenant_id == tenant_id,
            col(ActionsDeliveryAttempt.delivery_id).in_(list(delivery_ids)),
        )
        .order_by(col(ActionsDeliveryAttempt.attempted_at), col(ActionsDeliveryAttempt.id))
    ).all()
    result: dict[str, list[ActionsDeliveryAttempt]] = {}
    for row in rows:
        result.setdefault(row.delivery_id, []).append(row)
    return result


def pending_deliveries_of_subscription(
    session: Session, subscription_id: str
) -> Sequence[ActionsDelivery]:
    return session.exec(
        select(ActionsDelivery).where(
            ActionsDelivery.subscription_id == subscription_id,
            ActionsDelivery.status == "pending",
        )
    ).all()


# --- deliveries (the worker: system-wide) ---------------------------------------------


def lock_due_deliveries(
    session: Session, now: datetime, limit: int, exclude_subscriptions: Sequence[str] = ()
) -> Sequence[ActionsDelivery]:
    """Due pending deliveries, oldest first, row-locked, skipping subscriptions the worker
    cannot send to right now (open circuit, no free slot). On PostgreSQL `FOR UPDATE SKIP
    LOCKED` lets several workers claim disjoint rows; SQLite ignores it (one writer anyway)."""
    query = select(ActionsDelivery).where(
        ActionsDelivery.status == "pending", col(ActionsDelivery.next_attempt_at) <= now
    )
    if exclude_subscriptions:
        query = query.where(col(ActionsDelivery.subscription_id).not_in(list(exclude_subscriptions)))
    return session.exec(
        query.order_by(col(ActionsDelivery.next_attempt_at), col(ActionsDelivery.delivery_id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def lock_due_delivery_rows(
    session: Session, now: datetime, limit: int, exclude_subscriptions: Sequence[str] = ()
) -> Sequence[Row[Any]]:
    """`lock_due_deliveries` as plain rows (no ORM objects: the worker's hot path)."""
    d = ActionsDelivery
    query = select(
        d.delivery_id, d.subscription_id, d.tenant_id, d.payload, d.attempts, d.created_at
    ).where(d.status == "pending", col(d.next_attempt_at) <= now)
    if exclude_subscriptions:
        query = query.where(col(d.subscription_id).not_in(list(exclude_subscriptions)))
    return session.exec(
        query.order_by(col(d.next_attempt_at), col(d.delivery_id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def set_deliveries(session: Session, delivery_ids: Sequence[str], **values: Any) -> None:
    if delivery_ids:
        session.execute(
            update(ActionsDelivery)
            .where(col(ActionsDelivery.delivery_id).in_(list(delivery_ids)))
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def defer_due_deliveries(
    session: Session, subscription_id: str, until: datetime, now: datetime
) -> None:
    """Move a subscription's due pending deliveries to `until` (its circuit is open), so the
    claim query does not wade through them on every round. Uses the (subscription_id, offer_id)
    unique index."""
    session.execute(
        update(ActionsDelivery)
        .where(
            ActionsDelivery.subscription_id == subscription_id,
            ActionsDelivery.status == "pending",
            col(ActionsDelivery.next_attempt_at) <= now,
        )
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )


def mark_delivered(
    session: Session, delivery_ids: Sequence[str], attempts_before: int, status_code: int,
    now: datetime,
) -> list[tuple[str, str]]:
    """Book successful attempts in one statement; only rows still pending with the attempt
    count the worker claimed them at are changed. Returns (delivery_id, tenant_id) of those."""
    result = session.execute(
        update(ActionsDelivery)
        .where(
            col(ActionsDelivery.delivery_id).in_(list(delivery_ids)),
            ActionsDelivery.status == "pending",
            ActionsDelivery.attempts == attempts_before,
        )
        .values(
            status="delivered",
            attempts=attempts_before + 1,
            delivered_at=now,
            last_status_code=status_code,
            last_error=None,
        )
        .returning(ActionsDelivery.delivery_id, ActionsDelivery.tenant_id)
        .execution_options(synchronize_session=False)
    )
    return [(row[0], row[1]) for row in result]


def lock_delivery(session: Session, delivery_id: str) -> ActionsDelivery | None:
    return session.exec(
        select(ActionsDelivery).where(ActionsDelivery.delivery_id == delivery_id).with_for_update()
    ).first()


def lock_deliveries(session: Session, delivery_ids: Sequence[str]) -> dict[str, ActionsDelivery]:
    """Row-lock several deliveries in one round trip (booking a batch of attempts)."""
    if not delivery_ids:
        return {}
    rows = session.exec(
        select(ActionsDelivery)
        .where(col(ActionsDelivery.delivery_id).in_(sorted(delivery_ids)))
        .order_by(col(ActionsDelivery.delivery_id))  # one lock order: no deadlocks between workers
        .with_for_update()
    ).all()
    return {row.delivery_id: row for row in rows}


def lock_subscription(session: Session, subscription_id: str) -> ActionsWebhookSubscription | None:
    return session.exec(
        select(ActionsWebhookSubscription)
        .where(ActionsWebhookSubscription.id == subscription_id)
        .with_for_update()
    ).first()


def count_open_deliveries(session: Session) -> dict[str, int]:
    """Pending and parked deliveries, by status (delivered rows are history and not counted)."""
    rows = session.exec(
        select(ActionsDelivery.status, func.count())
        .where(col(ActionsDelivery.status).in_(["pending", "parked"]))
        .group_by(ActionsDelivery.status)
    ).all()
    return {status: count for status, count in rows}
