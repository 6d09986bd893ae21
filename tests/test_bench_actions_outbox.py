"""bench/actions.py's latency runs start from an empty outbox: `empty_outbox` on the real
database (PostgreSQL when reachable, else SQLite), leaving the other actions tables alone."""

from datetime import datetime, timezone

from sqlalchemy import text

from bench.actions import OUTBOX_TABLES, empty_outbox, fill_outbox, subscribe
from services.actions.tables import TABLES
from shared.db import create_tables, make_engine


def _count(engine, table: str) -> int:
    with engine.connect() as connection:
        return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_empty_outbox_removes_offers_deliveries_and_subscriptions_only(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO actions_sweep_leases (name, holder, expires_at) VALUES ('kept', 'bench', :at)"
            ), {"at": datetime.now(timezone.utc)})
        fill_outbox(engine, subscribe(engine, "http://127.0.0.1:9/ok"), 30)
        assert _count(engine, "actions_deliveries") == 30
        assert _count(engine, "actions_offers") == 30

        empty_outbox(engine)

        assert {table: _count(engine, table) for table in OUTBOX_TABLES} == dict.fromkeys(OUTBOX_TABLES, 0)
        assert _count(engine, "actions_sweep_leases") == 1
    finally:
        engine.dispose()
