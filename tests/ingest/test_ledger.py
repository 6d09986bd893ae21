"""The event id ledger on both databases: batched lookups and writes, per tenant."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from services.ingest.ledger import EventIdLedger, LedgerUnavailable
from services.ingest.tables import TABLES
from shared.db import create_tables, make_engine

RECEIVED = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Sent:
    id: str
    type: str = "order.completed"


@pytest.fixture(params=["sqlite", "default"])
def engine(request: pytest.FixtureRequest, tmp_path: Path, database_url: str):
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else database_url
    engine = make_engine(url, pre_ping=False)  # as ingest makes the ledger's
    create_tables(engine, TABLES)
    yield engine
    engine.dispose()


async def test_ids_are_known_while_pending_and_after_the_write_per_tenant(engine) -> None:
    ledger = EventIdLedger(engine, flush_interval_s=0.001)
    ledger.start()
    ids = [f"e-{i}" for i in range(2_500)]  # more than one SQLite chunk
    try:
        assert await ledger.known("t1", ids) == set()
        ledger.add("t1", [Sent(i) for i in ids[:2_000]], RECEIVED)
        assert await ledger.known("t1", ids) == set(ids[:2_000])  # pending counts as known
        await ledger.stop()  # writes what is pending

        again = EventIdLedger(engine)  # a restarted ingest reads them back from the table
        again.start()
        answers = await asyncio.gather(
            again.known("t1", ids[1_990:2_010]), again.known("t2", ids[:10]), again.known("t1", ids[:3])
        )
        assert answers == [set(ids[1_990:2_000]), set(), set(ids[:3])]
        again.add("t1", [Sent(ids[0])], RECEIVED)  # a second write of one id is harmless
        await again.stop()
    finally:
        await ledger.stop()


async def test_a_stopped_ledger_says_so_instead_of_guessing(engine) -> None:
    ledger = EventIdLedger(engine)
    with pytest.raises(LedgerUnavailable):
        await ledger.known("t1", ["e-1"])


async def test_connections_the_database_dropped_cost_one_more_try_not_an_answer(database_url: str) -> None:
    """The ledger's connections are not pinged: after the server dropped them (a restart), the
    next write and lookup fail once on them and are done again on new connections, so no id
    goes unrecorded and no lookup is answered without the table."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a server that drops connections: PostgreSQL (SQLite has none)")
    engine = make_engine(database_url, pre_ping=False)
    create_tables(engine, TABLES)
    ledger = EventIdLedger(engine, flush_interval_s=0.001)
    ledger.start()
    try:
        ledger.add("t1", [Sent("e-1")], RECEIVED)
        await ledger.stop()  # written: the pool now holds connections that have been used
        ledger = EventIdLedger(engine, flush_interval_s=0.001)
        ledger.start()
        assert await ledger.known("t1", ["e-1", "e-2"]) == {"e-1"}
        database = engine.url.database
        with psycopg.connect(engine.url.set(drivername="postgresql", database="postgres")
                             .render_as_string(hide_password=False), autocommit=True) as admin:
            dropped = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = %s", (database,)).fetchone()
        assert dropped is not None and dropped[0] >= 1
        assert await ledger.known("t1", ["e-1", "e-2"]) == {"e-1"}  # read again, not guessed
        ledger.add("t1", [Sent("e-2")], RECEIVED)
        await ledger.stop()
        again = EventIdLedger(engine)
        again.start()
        assert await again.known("t1", ["e-1", "e-2", "e-3"]) == {"e-1", "e-2"}
        await again.stop()
    finally:
        await ledger.stop()
        engine.dispose()
