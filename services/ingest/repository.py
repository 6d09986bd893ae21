"""All SQL of ingest."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import select
from sqlmodel import Session

from services.ingest.tables import IngestEventId
from shared.db import dialect_insert


def known_ids(session: Session, tenant_id: str, event_ids: Sequence[str]) -> set[str]:
    if not event_ids:
        return set()
    statement = select(IngestEventId.event_id).where(
        IngestEventId.tenant_id == tenant_id, IngestEventId.event_id.in_(event_ids)  # type: ignore[attr-defined]
    )
    return set(session.execute(statement).scalars())


def record_ids(session: Session, tenant_id: str, events: Iterable[tuple[str, str]], received_at: datetime) -> None:
    """Insert-if-absent: two concurrent sends of one id both end here harmlessly."""
    rows = [{"tenant_id": tenant_id, "event_id": event_id, "type": type_, "received_at": received_at}
            for event_id, type_ in events]
    if rows:
        statement = dialect_insert(session, IngestEventId.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["tenant_id", "event_id"]
        )
        session.execute(statement, rows)
