"""All SQL of ingest."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlmodel import Session

from services.ingest.tables import IngestEventId, IngestSourceOrder, IngestSourceSecret
from shared.db import dialect_insert


def known_ids(session: Session, tenant_id: str, event_ids: Sequence[str]) -> set[str]:
    if not event_ids:
        return set()
    statement = select(IngestEventId.event_id).where(
        IngestEventId.tenant_id == tenant_id, IngestEventId.event_id.in_(event_ids)  # type: ignore[attr-defined]
    )
    return set(session.execute(statement).scalars())


def record_ids(session: Session, tenant_id: str, events: Iterable[tuple[str, str, datetime]]) -> None:
    """Insert-if-absent: two concurrent sends of one id both end here harmlessly.
    events: (event_id, type, received_at)."""
    rows = [{"tenant_id": tenant_id, "event_id": event_id, "type": type_, "received_at": received_at}
            for event_id, type_, received_at in events]
    if rows:
        statement = dialect_insert(session, IngestEventId.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["tenant_id", "event_id"]
        )
        session.execute(statement, rows)


# --- upstream sources (services/ingest/sources) ---------------------------------------


def source_secret(session: Session, tenant_id: str, source: str) -> str | None:
    statement = select(IngestSourceSecret.secret).where(
        IngestSourceSecret.tenant_id == tenant_id, IngestSourceSecret.source == source
    )
    return session.execute(statement).scalar_one_or_none()


def put_source_secret(session: Session, tenant_id: str, source: str, secret: str, now: datetime) -> None:
    """Set or replace (keeps created_at)."""
    insert = dialect_insert(session, IngestSourceSecret.__table__)
    statement = insert.values(
        tenant_id=tenant_id, source=source, secret=secret, created_at=now, updated_at=now
    ).on_conflict_do_update(
        index_elements=["tenant_id", "source"],
        set_={"secret": insert.excluded.secret, "updated_at": insert.excluded.updated_at},
    )
    session.execute(statement)


def delete_source_secret(session: Session, tenant_id: str, source: str) -> bool:
    statement = delete(IngestSourceSecret).where(
        IngestSourceSecret.tenant_id == tenant_id, IngestSourceSecret.source == source  # type: ignore[arg-type]
    )
    return session.execute(statement).rowcount > 0


def order_customer(session: Session, tenant_id: str, source: str, order_id: str) -> str | None:
    statement = select(IngestSourceOrder.customer_id).where(
        IngestSourceOrder.tenant_id == tenant_id,
        IngestSourceOrder.source == source,
        IngestSourceOrder.order_id == order_id,
    )
    return session.execute(statement).scalar_one_or_none()


def remember_orders(
    session: Session, tenant_id: str, source: str, orders: dict[str, str], now: datetime
) -> None:
    """order id -> customer id; the latest webhook wins (Shopify can reassign an order)."""
    rows = [{"tenant_id": tenant_id, "source": source, "order_id": order_id,
             "customer_id": customer_id, "seen_at": now} for order_id, customer_id in orders.items()]
    if rows:
        insert = dialect_insert(session, IngestSourceOrder.__table__)
        statement = insert.on_conflict_do_update(
            index_elements=["tenant_id", "source", "order_id"],
            set_={"customer_id": insert.excluded.customer_id, "seen_at": insert.excluded.seen_at},
        )
        session.execute(statement, rows)
