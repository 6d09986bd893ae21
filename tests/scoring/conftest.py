"""Scoring test helpers: one model trained per session on simulated history, settings, waits."""

from __future__ import annotations

import collections
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from services.scoring import service
from services.scoring.config import ScoringSettings
from services.scoring.features import to_history_event
from services.scoring.model import TrainedModel, TrainReport, train
from services.scoring.simulate import simulate_history
from services.scoring.tables import TABLES
from shared.app import INTERNAL_TOKEN_HEADER, TENANT_HEADER
from shared.db import create_tables, make_engine, session_scope
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from tests.helpers import INTERNAL_TOKEN as TOKEN
from tests.helpers import read_topic, wait_until  # noqa: F401  (re-exported for the tests)

SIM_END = datetime(2026, 6, 1, tzinfo=timezone.utc)


def headers(tenant: str = "acme", token: str | None = TOKEN) -> dict[str, str]:
    result = {TENANT_HEADER: tenant}
    if token is not None:
        result[INTERNAL_TOKEN_HEADER] = token
    return result


def simulated_histories(customers: int, seed: int, end: datetime = SIM_END) -> dict[str, list[Any]]:
    histories: dict[str, list[Any]] = collections.defaultdict(list)
    for event in simulate_history(customers, seed, end):
        histories[event["customer_id"]].append(to_history_event(event))
    return dict(histories)


@pytest.fixture(scope="session")
def trained_model() -> TrainedModel:
    """A real model, trained once per session on 1500 simulated customers."""
    return train(simulated_histories(1500, seed=11), horizon_days=90)


def register(database_url: str, trained: TrainedModel, activate: bool = True, tenant: str = "sim") -> TrainReport:
    """Put a trained model into the registry of `database_url` (tables created if missing)."""
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        with session_scope(engine) as session:
            return service.register_model(session, trained, tenant, activate)
    finally:
        engine.dispose()


def retrained(trained: TrainedModel, version: str) -> TrainedModel:
    """The same estimator under another version (a 'new' model for registry tests)."""
    from dataclasses import replace

    return TrainedModel(estimator=trained.estimator, report=replace(trained.report, version=version))


@pytest.fixture
def scoring_settings(kafka_settings: KafkaSettings, database_url: str) -> ScoringSettings:
    return ScoringSettings(
        kafka=kafka_settings,
        database=DatabaseSettings(database_url=database_url),
        internal=InternalAuthSettings(internal_token=TOKEN),
        group_id=f"scoring-{uuid.uuid4().hex[:8]}",  # each test its own consumer group
        model_refresh_s=0.2,
        model_admin_tenants=["acme"],
    )


def event_record(
    customer: str, kind: str, at: datetime, data: dict[str, Any], *, tenant: str = "acme", event_id: str | None = None
) -> Any:
    """An EventRecord as ingest would put it on customer-events."""
    from shared.events import EventRecord, new_id, parse_event

    event = parse_event({"id": event_id or new_id(), "type": kind, "customer_id": customer,
                         "occurred_at": at.isoformat(), "source": "test", "data": data})
    return EventRecord(tenant_id=tenant, received_at=at, event=event)
