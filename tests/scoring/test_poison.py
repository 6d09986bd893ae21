"""Poisoned messages written straight to customer-events, ahead of a customer's good events on
the same partition: the real scoring consumer (real broker, real database) dead-letters each with
a reason naming its problem, the retried kind after the configured attempts, counts them, and
goes on to score the good events behind them; `churnguard dlq list` shows them."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from services.cli import app as cli
from services.scoring import repository
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.model import TrainedModel
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS, dead_letter
from tests.poison import check_dead_letters, poisoned_events, write_poisoned

from .conftest import event_record, headers, read_topic, register, wait_until

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
MAX_ATTEMPTS = 2  # not the default (3): the setting reaches the consumer


def _dead_letters(reason: str) -> float:
    return REGISTRY.get_sample_value("churnguard_scoring_dead_letters_total", {"reason": reason}) or 0.0


def _stored_events(database_url: str, customer: str) -> int:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return repository.count_events(session, "acme", customer)
    finally:
        engine.dispose()


async def test_poisoned_events_go_to_the_dead_letter_topic_and_the_partition_keeps_moving(
    scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel
) -> None:
    postgres = database_url.startswith("postgresql")
    kafka = kafka_settings.model_copy(update={"consumer_max_attempts": MAX_ATTEMPTS})
    settings = scoring_settings.model_copy(update={"kafka": kafka})
    register(database_url, trained_model)
    poison = poisoned_events("acme", "c-p", postgres=postgres)
    good = [
        event_record("c-p", "order.completed", NOW - timedelta(days=3),
                     {"order_id": "o-1", "amount": "20.00", "currency": "EUR"}),
        event_record("c-p", "support.complaint", NOW - timedelta(days=1), {"severity": "high"}),
    ]
    before = {reason: _dead_letters(reason) for reason in ("undecodable", "unprocessable")}

    with TestClient(create_app(settings, ManualClock(NOW))) as client:
        await write_poisoned(kafka, poison)
        publisher = Publisher(kafka, "test-ingest")
        try:  # behind the poison, on its partition (same key)
            for record in good:
                assert record.key == poison[0].key
                await publisher.publish(CUSTOMER_EVENTS, record.key, record.model_dump_json().encode())
        finally:
            await publisher.close()

        def scored_with_both() -> bool:
            response = client.get("/v1/customers/c-p/score", headers=headers())
            features = response.json()["features"] if response.status_code == 200 else {}
            return features.get("orders_90d") == 1.0 and features.get("complaints_90d") == 1.0

        wait_until(scored_with_both, timeout_s=30, what="the good events behind the poison scored")
        # the schema-valid poison of c-p (occurred two days after it was received) was never stored
        assert _stored_events(database_url, "c-p") == len(good)
        wait_until(lambda: _dead_letters("unprocessable") - before["unprocessable"] == len(poison) - 1,
                   what="unprocessable dead letters counted")
        assert _dead_letters("undecodable") - before["undecodable"] == 1

    dlq = await read_topic(kafka, dead_letter(CUSTOMER_EVENTS), until=lambda rs: len(rs) >= len(poison))
    letters = check_dead_letters(dlq, poison, max_attempts=MAX_ATTEMPTS, groups={CUSTOMER_EVENTS: [settings.group_id]})
    offsets = {name: int(dict(r.headers)["source-offset"]) for (_, name), [r] in letters.items()}
    assert sorted(offsets.values()) == list(range(len(poison)))  # the first records of a fresh topic, in order
    reasons = {name: dict(r.headers)["reason"].decode() for (_, name), [r] in letters.items()}
    assert reasons["occurred-after-received"].startswith("unprocessable: occurred_at ")
    assert "48.0 h after received_at" in reasons["occurred-after-received"]
    if postgres:
        assert reasons["nul-in-customer-id"].startswith(f"unprocessable: failed {MAX_ATTEMPTS} times: DataError")

    env = {"CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "CHURNGUARD_KAFKA_TOPIC_PREFIX": kafka.topic_prefix}
    listed = await asyncio.to_thread(CliRunner().invoke, cli, ["dlq", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert f"{len(poison)} dead letters on customer-events.dlq, {len(poison)} not replayed" in listed.output
    for name, reason in reasons.items():
        assert f"by {settings.group_id}: {reason.splitlines()[0]}" in listed.output, name
