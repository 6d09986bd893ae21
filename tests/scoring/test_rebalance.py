"""Two scoring instances in one consumer group: the second joins while events flow (a
rebalance). No event is lost or counted twice, each customer's events are scored in order,
and data the features cannot use is flagged without stopping the consumer."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select

from services.scoring import repository
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.consumer import ScoringConsumer
from services.scoring.features import FLAG_CURRENCY, compute_features
from services.scoring.model import TrainedModel
from services.scoring.tables import ScoringEvent
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.events import EventRecord, ScoreRecord
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS

from .conftest import event_record, read_topic, register, wait_until

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
CUSTOMERS = 40
WAVE = 2  # events per customer per wave
MAX_WAVES = 30


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _wave(n: int) -> list[EventRecord]:
    """WAVE events for every customer, later in time than the previous wave's; every 7th
    customer's first order of a wave is in USD (flagged: its amount does not count)."""
    records = []
    for c in range(CUSTOMERS):
        for k in range(WAVE):
            at = NOW - timedelta(days=60) + timedelta(hours=n * WAVE + k)
            if k == 0:
                currency = "USD" if c % 7 == 0 else "EUR"
                records.append(event_record(f"c-{c}", "order.completed", at,
                                            {"order_id": f"o-{n}-{c}", "amount": "12.50", "currency": currency}))
            else:
                records.append(event_record(f"c-{c}", "session.recorded", at, {"duration_seconds": n}))
    return records


def _scoring(client: TestClient) -> ScoringConsumer:
    return client.app_state["scoring"]


async def test_two_instances_share_partitions_without_losing_or_reordering_events(
    scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, trained_model)
    settings = scoring_settings.model_copy(update={"sweep_enabled": False})
    clock = ManualClock(NOW)
    publisher = Publisher(kafka_settings, "test-ingest")
    sent: list[EventRecord] = []
    flagged_before = _metric("churnguard_scoring_events_flagged_total", reason=FLAG_CURRENCY)

    async def publish(records: list[EventRecord]) -> None:
        await publisher.publish_many(CUSTOMER_EVENTS, [(r.key, r.model_dump_json().encode()) for r in records])
        sent.extend(records)

    try:
        with TestClient(create_app(settings, clock)) as first:
            await publish(_wave(0))
            wait_until(lambda: _scoring(first).loop and _scoring(first).loop.stats.processed > 0,
                       what="the first instance consuming")
            with TestClient(create_app(settings, clock)) as second:
                # keep events flowing while the second instance joins and the group rebalances
                for n in range(1, MAX_WAVES):
                    await publish(_wave(n))
                    loop = _scoring(second).loop
                    if loop is not None and loop.stats.processed > 0 and n >= 3:
                        break
                    await asyncio.sleep(0.2)  # pacing the producer, not waiting for an outcome
                else:
                    raise AssertionError("the second instance never got a partition")
                await publish(_wave(n + 1))
                engine = make_engine(database_url)
                try:
                    def stored() -> int:
                        with session_scope(engine) as session:
                            return repository.count_events(session, "acme")
                    wait_until(lambda: stored() == len(sent), timeout_s=20, what="every event stored")

                    def handled() -> tuple[int, int]:  # counted after the offset commit
                        return _scoring(first).loop.stats.processed, _scoring(second).loop.stats.processed

                    wait_until(lambda: sum(handled()) >= len(sent), timeout_s=10,
                               what="every event handled and committed (more only when redelivered)")
                    assert all(done > 0 for done in handled()), handled()

                    with session_scope(engine) as session:
                        ids = list(session.execute(
                            select(ScoringEvent.event_id).where(ScoringEvent.tenant_id == "acme")).scalars())
                        histories = repository.load_histories(session, "acme", [f"c-{c}" for c in range(CUSTOMERS)])
                        features = {c: repository.customer_features(session, "acme", f"c-{c}") for c in range(CUSTOMERS)}
                        flags = repository.event_flags(session, "acme")
                finally:
                    engine.dispose()
    finally:
        await publisher.close()

    # nothing lost, nothing twice
    assert sorted(ids) == sorted(r.event.id for r in sent)
    by_customer: dict[str, list[EventRecord]] = defaultdict(list)
    for record in sent:
        by_customer[record.event.customer_id].append(record)
    for c in range(CUSTOMERS):
        customer = f"c-{c}"
        # the stored features are what the full history gives: no event missing or counted twice
        assert features[c] is not None
        assert features[c].features == compute_features(histories[customer], NOW)
        assert features[c].features == compute_features([r.event for r in by_customer[customer]], NOW)
    usd = {r.event.id for r in sent if r.event.type == "order.completed" and r.event.data.currency == "USD"}
    assert set(flags) == usd and all(v == [FLAG_CURRENCY] for v in flags.values())
    assert _metric("churnguard_scoring_events_flagged_total", reason=FLAG_CURRENCY) == flagged_before + len(usd)

    # each customer's scores were published in the order of its events (first time each was scored)
    records = await read_topic(
        kafka_settings, CHURN_SCORES,
        until=lambda rs: len({ScoreRecord.model_validate_json(r.value).event_id for r in rs}) >= len(sent),
    )
    order: dict[str, list[str]] = defaultdict(list)
    for raw in records:
        score = ScoreRecord.model_validate_json(raw.value)
        if score.event_id not in order[score.customer_id]:
            order[score.customer_id].append(score.event_id)
    for customer, records_of in by_customer.items():
        assert order[customer] == [r.event.id for r in records_of], customer
