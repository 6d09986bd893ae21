"""The event id ledger on both databases: batched lookups and writes, per tenant."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

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
    engine = make_engine(url)
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
