"""History retention: raw events older than the tenant's period are purged by the scheduled job,
one instance at a time (shared lease); time moves on a ManualClock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from services.scoring import repository
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.retention import HistoryPurger
from services.scoring.tables import TABLES
from shared.clock import ManualClock
from shared.db import create_tables, make_engine, session_scope

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
DAY = timedelta(days=1)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    create_tables(engine, TABLES)
    yield engine
    engine.dispose()


def _store(engine: Engine, tenant: str, customer: str, days_ago: list[int]) -> None:
    rows = [{
        "tenant_id": tenant, "event_id": f"{customer}-{age}", "customer_id": customer, "type": "order.completed",
        "occurred_at": NOW - age * DAY, "received_at": NOW - age * DAY,
        "payload": {"order_id": f"o-{age}", "amount": "10.00", "currency": "USD"},
    } for age in days_ago]
    flags = [{"tenant_id": tenant, "event_id": f"{customer}-{age}", "reason": "currency", "customer_id": customer,
              "flagged_at": NOW} for age in days_ago]
    with session_scope(engine) as session:
        repository.import_events(session, rows)
        repository.insert_event_flags(session, flags)
        repository.upsert_features(session, tenant, {customer: {"orders_90d": 1.0}}, NOW)


def _left(engine: Engine, tenant: str, customer: str) -> tuple[list[str], list[str], bool]:
    with session_scope(engine) as session:
        events = sorted(e.event_id for e in repository.customer_events(session, tenant, customer))
        flags = sorted(repository.event_flags(session, tenant, customer))
        features = repository.customer_features(session, tenant, customer) is not None
    return events, flags, features


def _scraped(settings: ScoringSettings, series: str) -> float:
    """A real scrape of scoring's /metrics (the app's lifespan runs; no model, so no consumer)."""
    with TestClient(create_app(settings.model_copy(update={"sweep_enabled": False, "retention_enabled": False}))) as client:
        text = client.get("/metrics").text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " ")), 0.0)


def _settings(database_url: str, **overrides: object) -> ScoringSettings:
    from shared.settings import DatabaseSettings

    return ScoringSettings(database=DatabaseSettings(database_url=database_url), **overrides)  # type: ignore[arg-type]


async def test_events_older_than_the_tenant_period_are_purged_by_one_instance(
    engine: Engine, database_url: str
) -> None:
    settings = _settings(database_url, history_retention_days=365, history_retention_overrides={"short": 30},
                         retention_interval_s=3600.0)
    _store(engine, "long", "c-1", [10, 300, 400, 800])
    _store(engine, "short", "c-1", [10, 29, 31, 300])
    clock = ManualClock(NOW)
    purger = HistoryPurger(settings, engine, clock, holder="instance-1")
    other = HistoryPurger(settings, engine, clock, holder="instance-2")

    purged_before = _scraped(settings, "churnguard_scoring_history_purged_events_total")
    outcome = await purger.run_once()
    assert outcome.purged == {"long": 2, "short": 2}
    assert _scraped(settings, "churnguard_scoring_history_purged_events_total") == purged_before + 4
    assert _scraped(settings, 'churnguard_scoring_retention_rounds_total{outcome="done"}') >= 1
    assert _left(engine, "long", "c-1") == (["c-1-10", "c-1-300"], ["c-1-10", "c-1-300"], True)
    assert _left(engine, "short", "c-1") == (["c-1-10", "c-1-29"], ["c-1-10", "c-1-29"], True)  # features stay

    # The lease: another instance skips while it is held, takes over once it expired.
    assert (await other.run_once()).skipped == "lease held elsewhere"
    clock.advance(timedelta(seconds=1.5 * 3600 + 1))
    assert (await other.run_once()).purged == {}  # nothing new is old enough yet
    # Time moves on: what was young enough then is purged now.
    clock.advance(19 * DAY)
    assert (await other.run_once()).purged == {"short": 1}
    assert _left(engine, "short", "c-1")[0] == ["c-1-10"]
    assert (await purger.run_once()).skipped == "lease held elsewhere"


def test_retention_settings_refuse_impossible_periods(database_url: str) -> None:
    with pytest.raises(ValidationError, match=r"history_retention_overrides\['t-1'\]: 0 days is outside 1..36500"):
        _settings(database_url, history_retention_overrides={"t-1": 0})
    with pytest.raises(ValidationError, match="history_retention_days"):
        _settings(database_url, history_retention_days=0)
    assert _settings(database_url, history_retention_overrides={"t-1": 90}).retention_days("t-2") == 730
