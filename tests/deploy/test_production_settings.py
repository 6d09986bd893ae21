"""Production Kafka settings come from configuration: idempotent producer, read_committed
consumers on Apache Kafka; the embedded broker's defaults otherwise (it has no InitProducerId)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.kafka import consumer_options, make_consumer, make_producer, producer_options
from shared.settings import KafkaSettings


def test_defaults_suit_the_embedded_broker() -> None:
    settings = KafkaSettings(_env_file=None)
    assert producer_options(settings, "p")["enable_idempotence"] is False
    assert producer_options(settings, "p")["acks"] == "all"
    assert consumer_options(settings, "g", "c")["isolation_level"] == "read_uncommitted"


async def test_production_values_reach_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment is what the prod overlay sets (deploy/k8s/overlays/prod).
    monkeypatch.setenv("CHURNGUARD_KAFKA_ENABLE_IDEMPOTENCE", "true")
    monkeypatch.setenv("CHURNGUARD_KAFKA_ISOLATION_LEVEL", "read_committed")
    settings = KafkaSettings()
    assert producer_options(settings, "p")["enable_idempotence"] is True
    assert consumer_options(settings, "g", "c")["isolation_level"] == "read_committed"

    producer = make_producer(settings, "p")
    assert producer._txn_manager is not None  # aiokafka creates it only for an idempotent producer
    assert producer._sender._acks == -1
    consumer = make_consumer(settings, ["t"], "g", "c")
    assert consumer._isolation_level == "read_committed"


def test_bad_production_values_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHURNGUARD_KAFKA_ISOLATION_LEVEL", "serializable")
    with pytest.raises(ValidationError, match="isolation_level"):
        KafkaSettings()
    monkeypatch.delenv("CHURNGUARD_KAFKA_ISOLATION_LEVEL")
    monkeypatch.setenv("CHURNGUARD_KAFKA_ENABLE_IDEMPOTENCE", "maybe")
    with pytest.raises(ValidationError, match="enable_idempotence"):
        KafkaSettings()
