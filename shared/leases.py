"""A named row lease: which instance of a service runs a time-driven job (a sweep) right now.

Each service owns its lease table (columns `name` primary key, `holder`, `expires_at`); the
mechanism lives here once. `acquire_lease` takes or renews the lease with one conditional UPDATE
(free, expired or already ours), atomic on PostgreSQL and SQLite alike; a crashed holder's lease
simply expires and another instance takes over.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import update
from sqlmodel import Session

from shared.db import dialect_insert
from shared.tasks import stop_gracefully

log = logging.getLogger(__name__)


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


class LeasedRounds:
    """Rounds of a time-driven job in the background: `run_once()` every `interval_s` (sooner
    after a failure), until `stop()`, which lets the round in hand finish and then gives up the
    lease. Subclasses implement `run_once` (taking the lease first) and `release_lease`."""

    name = "rounds"
    retry_s = 30.0

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> Any:
        raise NotImplementedError

    def release_lease(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=self.name)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await stop_gracefully(self._task, timeout_s=10)
            self._task = None
            try:
                await asyncio.to_thread(self.release_lease)
            except Exception:
                log.warning("%s: could not release the lease; it expires on its own", self.name, exc_info=True)

    async def _run(self) -> None:
        delay = self.interval_s
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
            try:
                await self.run_once()
                delay = self.interval_s
            except Exception:
                log.exception("%s: round failed; retrying soon", self.name)
                delay = min(self.interval_s, self.retry_s)
