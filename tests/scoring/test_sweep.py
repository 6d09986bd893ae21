"""The periodic sweep: time alone moves risk; re-scored, published only when it moved, one
instance at a time (lease), and run by the lifespan. Rounds are called directly; time moves
on a ManualClock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine

from services.scoring import repository, service
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.model import Predictor, TrainedModel
from services.scoring.sweeps import Sweeper, sweep_score_id, time_bucket
from services.scoring.tables import TABLES
from shared.clock import ManualClock
from shared.db import create_tables, make_engine, session_scope
from shared.events import ScoreRecord
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES

from .conftest import event_record, headers, read_topic, register, wait_until

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _predictor(trained: TrainedModel) -> Predictor:
    r = trained.report
    return Predictor(r.version, r.feature_names, trained.estimator, r.roc_auc)


def _contract(customer: str, at: datetime, ends: datetime) -> object:
    return event_record(customer, "subscription.started", at, {
        "contract_id": f"k-{customer}", "plan": "plus", "price": "19.90", "currency": "EUR",
        "start_date": at.date().isoformat(), "end_date": ends.date().isoformat(), "auto_renew": False,
    })


def _order(customer: str, at: datetime, amount: str = "40.00") -> object:
    return event_record(customer, "order.completed", at,
                        {"order_id": f"o-{customer}-{at.timestamp()}", "amount": amount, "currency": "EUR"})


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    create_tables(engine, TABLES)
    yield engine
    engine.dispose()


def _seed(engine: Engine, predictor: Predictor) -> None:
    """Customers scored by their events at NOW: a busy buyer, one whose contract ends soon, an idle one."""
    records = [
        *[_order("busy", NOW - d * DAY) for d in (1, 8, 15, 22, 29)],
        _contract("renewal", NOW - 340 * DAY, NOW + 20 * DAY), _order("renewal", NOW - 2 * DAY),
        _order("idle", NOW - 200 * DAY), event_record("idle", "session.recorded", NOW - 3 * DAY, {}),
        event_record("other-tenant", "order.completed", NOW - 5 * DAY,
                     {"order_id": "o-g", "amount": "10.00", "currency": "EUR"}, tenant="globex"),
    ]
    with session_scope(engine) as session:
        service.process_batch(session, records, predictor, service.Bands(high=0.5, medium=0.2), NOW)


async def test_a_round_rescores_everyone_and_publishes_only_what_moved(
    engine: Engine, scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, trained_model: TrainedModel
) -> None:
    predictor = _predictor(trained_model)
    _seed(engine, predictor)
    clock = ManualClock(NOW)
    settings = replace_settings(scoring_settings, sweep_interval_s=3600, sweep_delta=0.05, sweep_batch=2)
    publisher = Publisher(kafka_settings, "test-sweep")
    sweeper = Sweeper(settings, engine, publisher, clock, lambda: predictor)
    rescored_before = _metric("churnguard_scoring_sweep_rescored_total")
    published_before = _metric("churnguard_scoring_sweep_published_total")
    try:
        # right after the event scores nothing has moved: all four re-scored (pages of 2), none published
        first = await sweeper.run_once()
        assert first.skipped is None and first.rescored == 4 and first.published == []

        # 45 days later: inactivity grew and one contract has run out
        clock.advance(45 * DAY)
        with session_scope(engine) as session:
            before = {c: repository.latest_score(session, t, c) for t, c in
                      [("acme", "busy"), ("acme", "renewal"), ("acme", "idle"), ("globex", "other-tenant")]}
        second = await sweeper.run_once()
        assert second.rescored == 4
        assert second.published, "45 days without activity must move someone's risk"
        bucket = time_bucket(clock.now(), 3600)
        for score in second.published:
            old = before[score.customer_id]
            assert old is not None
            assert abs(score.probability - old.probability) > 0.05 or score.band != old.band
            assert score.cause == "sweep" and score.event_id is None and score.scored_at == clock.now()
            assert score.score_id == sweep_score_id(score.tenant_id, score.customer_id, bucket)
            assert score.features["days_since_last_activity"] >= 45.0
        renewal = next((s for s in second.published if s.customer_id == "renewal"), None)
        assert renewal is not None and renewal.features["days_to_contract_end"] == -25.0
        with session_scope(engine) as session:
            for score in second.published:
                stored = service.latest_score(session, score.tenant_id, score.customer_id)
                assert stored is not None and stored.score_id == score.score_id
                assert stored.probability == pytest.approx(score.probability)
                assert stored.features == score.features
                assert stored.reasons == score.reasons  # explained like event scores
            # what did not move keeps its event score
            for customer, old in before.items():
                if customer not in {s.customer_id for s in second.published}:
                    tenant = "globex" if customer == "other-tenant" else "acme"
                    assert repository.latest_score(session, tenant, customer).score_id == old.score_id

        # the same round again (a retry within the hour): the same score ids, deduplicated downstream
        clock.advance(timedelta(minutes=5))
        again = await sweeper.run_once()
        assert sorted(s.score_id for s in again.published) == sorted(s.score_id for s in second.published)

        # an hour later nothing has moved by more than the delta since the sweep scores
        clock.advance(timedelta(hours=1))
        assert (await sweeper.run_once()).published == []
    finally:
        await publisher.close()

    published = {s.score_id for s in second.published}
    records = await read_topic(kafka_settings, CHURN_SCORES,
                               until=lambda rs: {ScoreRecord.model_validate_json(r.value).score_id for r in rs} >= published)
    on_topic = [ScoreRecord.model_validate_json(r.value) for r in records]
    assert {s.score_id for s in on_topic} == published
    assert all(s.cause == "sweep" for s in on_topic)
    assert _metric("churnguard_scoring_sweep_rescored_total") == rescored_before + 16
    assert _metric("churnguard_scoring_sweep_published_total") == published_before + 2 * len(published)


def replace_settings(settings: ScoringSettings, **changes: object) -> ScoringSettings:
    return settings.model_copy(update=changes)


async def test_one_instance_sweeps_at_a_time(
    engine: Engine, scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, trained_model: TrainedModel
) -> None:
    predictor = _predictor(trained_model)
    _seed(engine, predictor)
    clock = ManualClock(NOW)
    settings = replace_settings(scoring_settings, sweep_interval_s=600)
    publisher = Publisher(kafka_settings, "test-sweep")
    a = Sweeper(settings, engine, publisher, clock, lambda: predictor, holder="instance-a")
    b = Sweeper(settings, engine, publisher, clock, lambda: predictor, holder="instance-b")
    try:
        assert (await a.run_once()).rescored == 4
        assert (await b.run_once()).skipped == "lease held elsewhere"
        clock.advance(timedelta(minutes=10))
        assert (await a.run_once()).skipped is None  # the holder renews its lease
        clock.advance(timedelta(minutes=14))
        assert (await b.run_once()).skipped == "lease held elsewhere"
        clock.advance(timedelta(minutes=2))  # a's lease (1.5 intervals) ran out: b takes over
        assert (await b.run_once()).skipped is None
        assert (await a.run_once()).skipped == "lease held elsewhere"
        b.start()
        await b.stop()  # a graceful stop releases the lease
        assert (await a.run_once()).skipped is None
        assert (await Sweeper(settings, engine, publisher, clock, lambda: None).run_once()).skipped == "no model"
    finally:
        await publisher.close()


async def test_the_lifespan_runs_the_sweep_in_the_background(
    scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, trained_model)
    engine = make_engine(database_url)
    try:
        _seed(engine, _predictor(trained_model))
    finally:
        engine.dispose()
    clock = ManualClock(NOW)
    settings = replace_settings(scoring_settings, sweep_interval_s=0.2)
    with TestClient(create_app(settings, clock)) as client:
        event_score = client.get("/v1/customers/idle/score", headers=headers()).json()
        clock.advance(90 * DAY)
        bucket = time_bucket(clock.now(), 0.2)

        def swept() -> dict | None:
            body = client.get("/v1/customers/idle/score", headers=headers()).json()
            return body if body["score_id"] != event_score["score_id"] else None

        body = wait_until(swept, timeout_s=10, what="idle re-scored by the background sweep")
        assert body["scored_at"].startswith("2026-07-30")
        assert body["features"]["days_since_last_activity"] == pytest.approx(93.0)
        assert time_bucket(datetime.fromisoformat(body["scored_at"]), 0.2) == bucket
        assert body["score_id"] == sweep_score_id("acme", "idle", bucket)
