"""The event id ledger: which ids each tenant has sent, so ingest can answer "duplicate".

Both directions are batched across requests, because one database round trip per request
was ingest's largest cost:
- lookups from concurrent requests are answered by one query per tenant per round;
- ids the broker acknowledged are written behind the requests, many per transaction, with
  driver-level statements (SQLAlchemy's per-row parameter processing cost more than SQLite).
Ids waiting to be written still count as known. If the process dies before a write, a resend of
those few ids is published again and scoring's unique key stores it once.

Its connections are not pinged before use and lookups run outside a transaction: on PostgreSQL
a ping and BEGIN/ROLLBACK were five of a lookup's six round trips. A connection the database
dropped (a restart) fails one try; SQLAlchemy then discards the pool's connections and the work
is done once more on a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from services.ingest import metrics, repository
from shared.tasks import stop_gracefully

log = logging.getLogger(__name__)
T = TypeVar("T")

class LedgerUnavailable(Exception):
    """The id table could not be read; the caller publishes without the duplicate check."""


class EventIdLedger:
    def __init__(self, engine: Engine, flush_interval_s: float = 0.02) -> None:
        """`engine`: best one of the ledger's own, made with `pre_ping=False` (see above)."""
        self._engine = engine
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._flush_interval_s = flush_interval_s
        self._pending: dict[tuple[str, str], tuple[str, datetime]] = {}
        # Taken out of _pending by a write round and not committed yet: still known, or a resend
        # arriving during the write would be neither in memory nor in the table.
        self._writing: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._lookups: list[tuple[str, list[str], asyncio.Future[set[str]]]] = []
        self._writes_due = asyncio.Event()
        self._lookups_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._writer = repository.IdWriter(engine.dialect)

    def start(self) -> None:
        self._running = True
        self._tasks = [
            asyncio.create_task(self._write_rounds(), name="ingest:ledger-writes"),
            asyncio.create_task(self._lookup_rounds(), name="ingest:ledger-lookups"),
        ]

    async def stop(self) -> None:
        self._running = False
        self._writes_due.set()
        self._lookups_due.set()
        for task in self._tasks:
            await stop_gracefully(task, timeout_s=10)
        for _, _, future in self._lookups:
            if not future.done():
                future.set_exception(LedgerUnavailable("ingest is stopping"))
        self._lookups = []
        await self._flush()  # whatever arrived after the last round

    async def known(self, tenant_id: str, event_ids: Sequence[str]) -> set[str]:
        """The ids among `event_ids` this tenant sent before (raises LedgerUnavailable)."""
        found = {event_id for event_id in event_ids
                 if (tenant_id, event_id) in self._pending or (tenant_id, event_id) in self._writing}
        remaining = [event_id for event_id in event_ids if event_id not in found]
        if not remaining:
            return found
        if not self._running:
            raise LedgerUnavailable("the id ledger is not running")
        future: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._lookups.append((tenant_id, remaining, future))
        self._lookups_due.set()
        return found | await future

    def add(self, tenant_id: str, events: Sequence[Any], received_at: datetime) -> None:
        """Remember acknowledged events (anything with `.id` and `.type`)."""
        self._pending.update(((tenant_id, event.id), (event.type, received_at)) for event in events)
        self._writes_due.set()

    async def _lookup_rounds(self) -> None:
        while self._running:
            await self._lookups_due.wait()
            self._lookups_due.clear()
            if not self._lookups:
                continue
            round_, self._lookups = self._lookups, []
            wanted: dict[str, set[str]] = {}
            for tenant_id, event_ids, _ in round_:
                wanted.setdefault(tenant_id, set()).update(event_ids)
            try:
                stored = await asyncio.to_thread(once_more_if_disconnected, lambda: self._select(wanted))
            except SQLAlchemyError as exc:
                for _, _, future in round_:
                    if not future.done():
                        future.set_exception(LedgerUnavailable(type(exc).__name__))
                continue
            for tenant_id, event_ids, future in round_:
                if not future.done():
                    future.set_result(stored.get(tenant_id, set()).intersection(event_ids))

    def _select(self, wanted: dict[str, set[str]]) -> dict[str, set[str]]:
        with self._reader.connect() as connection:
            return {tenant_id: repository.known_ids(connection, tenant_id, event_ids)
                    for tenant_id, event_ids in wanted.items()}

    async def _write_rounds(self) -> None:
        while self._running:
            await self._writes_due.wait()
            self._writes_due.clear()
            await asyncio.sleep(self._flush_interval_s)  # let a round fill up
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._writing.update(batch)
        rows = [(tenant_id, event_id, type_, received_at)
                for (tenant_id, event_id), (type_, received_at) in batch.items()]

        def write() -> None:
            with self._engine.begin() as connection:
                self._writer.write(connection, rows)

        try:
            await asyncio.to_thread(once_more_if_disconnected, write)
        except SQLAlchemyError as exc:  # the broker has them: they were rightly accepted
            metrics.DEDUP_UNAVAILABLE.inc()
            log.warning("could not record %d event ids (%s)", len(batch), type(exc).__name__)
        finally:
            for key in batch:
                self._writing.pop(key, None)


def once_more_if_disconnected(work: Callable[[], T]) -> T:
    """`work()`, and once more if it failed on a connection the database had dropped (which
    SQLAlchemy then invalidated, with the rest of the pool)."""
    try:
        return work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.info("the id table's connection was gone; trying once more on a new one")
        return work()
