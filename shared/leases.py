"""A named row lease: which instance of a service runs a time-driven job (a sweep) right now.

Each service owns its lease table (columns `name` primary key, `holder`, `expires_at`); the
mechanism lives here once. `acquire_lease` takes or renews the lease with one conditional UPDATE
(free, expired or already ours), atomic on PostgreSQL and SQLite alike; a crashed holder's lease
simply expires and another instance takes over.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import update
from sqlmodel import Session

from shared.db import dialect_insert


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def acquire_lease(
    session: Session, table: Any, name: str, holder: str, now: datetime, expires_at: datetime
) -> bool:
    """Take (or renew) the lease `name` in `table` (a SQLModel lease table class) for `holder`
    until `expires_at`, if it is free, expired or already ours."""
    session.execute(
        dialect_insert(session, table.__table__).on_conflict_do_nothing(index_elements=["name"]),
        [{"name": name, "holder": "", "expires_at": _utc(now)}],
    )
    result = session.execute(
        update(table)
        .where(table.name == name, (table.holder == holder) | (table.expires_at <= _utc(now)))
        .values(holder=holder, expires_at=_utc(expires_at))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def release_lease(session: Session, table: Any, name: str, holder: str, now: datetime) -> None:
    """Let the lease expire now (a stopping holder), so another instance need not wait."""
    session.execute(
        update(table)
        .where(table.name == name, table.holder == holder)
        .values(expires_at=_utc(now))
    )
