"""The consumer against the real broker and database: score, publish, dedup, DLQ, readiness."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.scoring import repository
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.features import compute_features
from services.scoring.model import TrainedModel
from services.scoring.service import score_id_for
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.events import EventRecord, ScoreRecord, partition_key
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS, dead_letter

from .conftest import event_record, headers, read_topic, register, retrained, wait_until

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _stored_events(database_url: str, tenant: str, customer: str) -> int:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return repository.count_events(session, tenant, customer)
    finally:
        engine.dispose()


async def _publish(kafka_settings: KafkaSettings, records: list[EventRecord]) -> None:
    publisher = Publisher(kafka_settings, "test-ingest")
    try:
        await publisher.publish_many(CUSTOMER_EVENTS, [(r.key, r.model_dump_json().encode()) for r in records])
    finally:
        await publisher.close()


def _score(client: TestClient, customer: str, tenant: str = "acme") -> dict | None:
    response = client.get(f"/v1/customers/{customer}/score", headers=headers(tenant))
    return response.json() if response.status_code == 200 else None


async def test_events_are_stored_scored_published_and_deduplicated(
    scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel
) -> None:
    model = register(database_url, trained_model)
    c1 = [
        event_record("c-1", "support.complaint", NOW - timedelta(days=1), {"severity": "high"}),
        event_record("c-1", "order.completed", NOW - timedelta(days=40), {"order_id": "o1", "amount": "20.00", "currency": "EUR"}),
        event_record("c-1", "feedback.nps", NOW - timedelta(days=2), {"score": 2}),
    ]
    later = event_record("c-2", "order.completed", NOW - timedelta(hours=1), {"order_id": "o2", "amount": "5.50", "currency": "EUR"})
    duplicates_before = _metric("churnguard_scoring_events_duplicate_total")
    dead_before = _metric("churnguard_scoring_dead_letters_total", reason="undecodable")

    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        # out of order, the same event twice, and a poison message ahead of c-2's event on its partition
        await _publish(kafka_settings, [c1[0], c1[2], c1[1], c1[0]])
        publisher = Publisher(kafka_settings, "test-poison")
        try:
            await publisher.publish(CUSTOMER_EVENTS, partition_key("acme", "c-2"), b"{not an event record")
        finally:
            await publisher.close()
        await _publish(kafka_settings, [later])

        wait_until(lambda: _score(client, "c-2"), what="c-2 scored after the poison message")
        body = wait_until(lambda: (s := _score(client, "c-1")) and s["features"]["orders_90d"] == 1.0 and s,
                          what="c-1 scored with all its events")
        assert body["model_version"] == model.version
        assert 0.0 <= body["probability"] <= 1.0
        # features come from the sorted stored history as of the clock, whatever the arrival order
        assert body["features"] == compute_features([r.event for r in c1], NOW)
        assert _stored_events(database_url, "acme", "c-1") == 3

        # the same event resent later changes nothing in the history, and is re-published under its score_id
        await _publish(kafka_settings, [c1[1]])
        wait_until(lambda: _metric("churnguard_scoring_events_duplicate_total") >= duplicates_before + 2,
                   what="duplicates counted")
        assert _stored_events(database_url, "acme", "c-1") == 3

        assert _score(client, "c-1", tenant="globex") is None
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        metrics = client.get("/metrics").text
        assert f'churnguard_scoring_active_model_info{{version="{model.version}"}} 1.0' in metrics
        trained = _metric("churnguard_scoring_active_model_trained_timestamp_seconds")
        assert abs(trained - model.trained_at.timestamp()) < 1
        assert "churnguard_scoring_score_drift NaN" in metrics  # a handful of scores: not enough to tell
        # every partition this consumer worked on was drained: lag 0 there
        # (the registry is the process's: earlier tests' consumers left their own topics' lines)
        topic = f'topic="{kafka_settings.topic(CUSTOMER_EVENTS)}"'
        lags = [line for line in metrics.splitlines() if line.startswith("churnguard_scoring_consumer_lag{") and topic in line]
        assert lags and all(line.endswith(" 0.0") for line in lags), lags
        assert _metric("churnguard_scoring_batch_size_count") >= 1

    expected = {score_id_for("acme", r.event.id) for r in [*c1, later]}
    records = await read_topic(
        kafka_settings, CHURN_SCORES,
        until=lambda rs: {ScoreRecord.model_validate_json(r.value).score_id for r in rs} >= expected,
    )
    scores = [ScoreRecord.model_validate_json(r.value) for r in records]
    assert {s.score_id for s in scores} == expected
    assert all(s.tenant_id == "acme" and s.model_version == model.version and s.cause == "event" for s in scores)
    assert all(r.key == partition_key("acme", s.customer_id) for r, s in zip(records, scores, strict=True))
    by_event = {s.event_id: s for s in scores}
    assert by_event[later.event.id].customer_id == "c-2"
    assert by_event[later.event.id].features["spend_90d"] == 5.5

    dlq = await read_topic(kafka_settings, dead_letter(CUSTOMER_EVENTS), until=lambda rs: len(rs) >= 1)
    assert dict(dlq[0].headers)["reason"].decode().startswith("undecodable:")
    assert _metric("churnguard_scoring_dead_letters_total", reason="undecodable") == dead_before + 1


async def test_waits_for_a_model_then_scores_and_picks_up_new_models(
    scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel
) -> None:
    clock = ManualClock(NOW)
    with TestClient(create_app(scoring_settings, clock)) as client:
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        checks = not_ready.json()["checks"]
        assert checks["model"] is False and checks["consumer"] is False
        assert checks["database"] is True and checks["broker"] is True

        # an event published while there is no model waits in Kafka
        first = event_record("c-9", "session.recorded", NOW - timedelta(days=3), {"duration_seconds": 30})
        await _publish(kafka_settings, [first])
        assert _score(client, "c-9") is None

        model = register(database_url, trained_model)
        wait_until(lambda: client.get("/readyz").status_code == 200, what="ready once a model is active")
        body = wait_until(lambda: _score(client, "c-9"), what="the waiting event scored")
        assert body["model_version"] == model.version
        assert body["features"]["days_since_last_activity"] == 3.0

        # a newly activated model is used without a restart; domain time moves with the clock
        newer = register(database_url, retrained(trained_model, "m-20260501000000-0042"))
        wait_until(lambda: f'version="{newer.version}"' in client.get("/metrics").text, what="new model loaded")
        clock.advance(timedelta(days=10))
        await _publish(kafka_settings, [event_record("c-9", "feedback.nps", NOW + timedelta(days=9), {"score": 9})])
        body = wait_until(lambda: (s := _score(client, "c-9")) and s["model_version"] == newer.version and s,
                          what="scored with the new model")
        assert body["features"]["days_since_last_activity"] == 1.0
        assert body["features"]["tenure_days"] == 13.0
        assert json.loads(client.get("/readyz").text)["status"] == "ready"
