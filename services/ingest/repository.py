"""All SQL of ingest."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Dialect, delete, select, update
from sqlmodel import Session

from services.ingest.tables import IngestErasure, IngestEventId, IngestSourceOrder, IngestSourceSecret
from shared.db import dialect_insert

SQLITE_CHUNK = 900  # well under SQLite's bound-parameter limit on every build


def known_ids(connection: Connection, tenant_id: str, event_ids: Collection[str]) -> set[str]:
    """Driver-level, like IdWriter: SQLAlchemy's expansion of a large IN list cost more than the
    query. PostgreSQL takes the ids as one array; SQLite in chunks under its parameter limit."""
    table = IngestEventId.__table__.name  # type: ignore[attr-defined]
    ids = list(event_ids)
    if connection.dialect.paramstyle != "qmark":
        sql = f"SELECT event_id FROM {table} WHERE tenant_id = %s AND event_id = ANY(%s)"
        return {row[0] for row in connection.exec_driver_sql(sql, (tenant_id, ids))}
    found: set[str] = set()
    for start in range(0, len(ids), SQLITE_CHUNK):
        chunk = ids[start:start + SQLITE_CHUNK]
        sql = f"SELECT event_id FROM {table} WHERE tenant_id = ? AND event_id IN ({', '.join('?' * len(chunk))})"
        found.update(row[0] for row in connection.exec_driver_sql(sql, (tenant_id, *chunk)))
    return found


class IdWriter:
    """Insert-if-absent of (tenant_id, event_id, type, received_at) rows with one driver-level
    executemany: SQLAlchemy's per-row parameter processing cost more than the database did.
    Two concurrent sends of one id both end here harmlessly."""

    def __init__(self, dialect: Dialect) -> None:
        table = IngestEventId.__table__  # type: ignore[attr-defined]
        columns = ("tenant_id", "event_id", "type", "received_at")
        placeholder = "?" if dialect.paramstyle == "qmark" else "%s"
        self._sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) "
                     f"VALUES ({', '.join([placeholder] * len(columns))}) ON CONFLICT DO NOTHING")
        bind = table.c.received_at.type.bind_processor(dialect) or (lambda value: value)
        if dialect.name == "sqlite":
            # sqlite3 would adapt the (naive UTC) datetime once per row in Python; done once per
            # distinct time here, to the very text its default adapter writes (isoformat(" ")).
            self._bind_time = lambda value: _sqlite_text(bind(value))
        else:
            self._bind_time = bind

    def write(self, connection: Connection, rows: Iterable[tuple[str, str, str, datetime]]) -> None:
        bound: dict[datetime, Any] = {}
        parameters = []
        for tenant_id, event_id, type_, received_at in rows:
            if received_at not in bound:
                bound[received_at] = self._bind_time(received_at)
            parameters.append((tenant_id, event_id, type_, bound[received_at]))
        if parameters:
            connection.exec_driver_sql(self._sql, parameters)


def _sqlite_text(value: Any) -> Any:
    return value.isoformat(" ") if isinstance(value, datetime) else value


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
    erased = erased_among(session, tenant_id, set(orders.values()))
    rows = [{"tenant_id": tenant_id, "source": source, "order_id": order_id,
             "customer_id": customer_id, "seen_at": now} for order_id, customer_id in orders.items()
            if customer_id not in erased]
    if rows:
        insert = dialect_insert(session, IngestSourceOrder.__table__)
        statement = insert.on_conflict_do_update(
            index_elements=["tenant_id", "source", "order_id"],
            set_={"customer_id": insert.excluded.customer_id, "seen_at": insert.excluded.seen_at},
        )
        session.execute(statement, rows)


# --- erasures (GDPR Art. 17) --------------------------------------------------------------

ERASING_SERVICES = ("scoring", "actions")


def add_erasure(session: Session, row: dict[str, Any]) -> IngestErasure:
    """Insert-if-absent per (tenant, customer); returns the customer's erasure, new or earlier."""
    session.execute(
        dialect_insert(session, IngestErasure.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["tenant_id", "customer_id"]
        ),
        [row],
    )
    found = customer_erasure(session, row["tenant_id"], row["customer_id"])
    assert found is not None
    return found


def customer_erasure(session: Session, tenant_id: str, customer_id: str) -> IngestErasure | None:
    statement = select(IngestErasure).where(
        IngestErasure.tenant_id == tenant_id, IngestErasure.customer_id == customer_id
    )
    return session.execute(statement).scalars().first()


def get_erasure(session: Session, tenant_id: str, erasure_id: str) -> IngestErasure | None:
    statement = select(IngestErasure).where(
        IngestErasure.tenant_id == tenant_id, IngestErasure.erasure_id == erasure_id
    ).execution_options(populate_existing=True)
    return session.execute(statement).scalars().first()


def erase_source_orders(session: Session, tenant_id: str, customer_id: str) -> int:
    statement = delete(IngestSourceOrder).where(
        IngestSourceOrder.tenant_id == tenant_id, IngestSourceOrder.customer_id == customer_id  # type: ignore[arg-type]
    )
    return int(session.execute(statement).rowcount or 0)


def source_orders_of(session: Session, tenant_id: str, customer_id: str) -> list[IngestSourceOrder]:
    statement = select(IngestSourceOrder).where(
        IngestSourceOrder.tenant_id == tenant_id, IngestSourceOrder.customer_id == customer_id
    ).order_by(IngestSourceOrder.source, IngestSourceOrder.order_id)
    return list(session.execute(statement).scalars())


def erased_among(session: Session, tenant_id: str, customer_ids: Collection[str]) -> set[str]:
    if not customer_ids:
        return set()
    statement = select(IngestErasure.customer_id).where(
        IngestErasure.tenant_id == tenant_id,
        IngestErasure.customer_id.in_(sorted(customer_ids)),  # type: ignore[attr-defined]
    )
    return set(session.execute(statement).scalars())


def all_erased(connection: Connection) -> set[tuple[str, str]]:
    statement = select(IngestErasure.tenant_id, IngestErasure.customer_id)
    return {(tenant, customer) for tenant, customer in connection.execute(statement)}


def mark_service_done(session: Session, tenant_id: str, erasure_id: str, service: str, done_at: datetime) -> bool:
    """Record that `service` finished (the first report wins); completes the erasure when every
    service has. False if there is no such erasure for the tenant."""
    if service not in ERASING_SERVICES:
        raise ValueError(f"unknown erasing service {service!r}")
    column = getattr(IngestErasure, f"{service}_done_at")
    session.execute(
        update(IngestErasure)
        .where(IngestErasure.tenant_id == tenant_id, IngestErasure.erasure_id == erasure_id, column.is_(None))
        .values({column: done_at})
    )
    row = get_erasure(session, tenant_id, erasure_id)
    if row is None:
        return False
    finished = [row.ingest_done_at, *(getattr(row, f"{name}_done_at") for name in ERASING_SERVICES)]
    if row.completed_at is None and all(finished):
        row.completed_at = max(t for t in finished if t is not None)
        session.add(row)
    return True
