"""ingest's erasure requests on the real broker and database: the control record on the
customer's partition, who asked, idempotent repeats, broker down, bad input, status reports."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from fastapi.testclient import TestClient

from services.ingest.app import create_app
from services.ingest.config import IngestSettings
from shared.broker import free_port
from shared.clock import ManualClock
from shared.events import ErasureRecord, ErasureStatusRecord, decode_customer_record
from shared.kafka import Publisher
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CUSTOMER_EVENTS, ERASURE_STATUS
from tests.helpers import INTERNAL_TOKEN, internal_headers, read_topic, wait_until

NOW = datetime(2026, 11, 20, 12, tzinfo=timezone.utc)
HEADERS = internal_headers("tenant-a")


def _settings(kafka: KafkaSettings, database_url: str, **overrides: object) -> IngestSettings:
    return IngestSettings(kafka=kafka, database=DatabaseSettings(database_url=database_url),
                          internal=InternalAuthSettings(internal_token=INTERNAL_TOKEN), **overrides)  # type: ignore[arg-type]


def _report(kafka: KafkaSettings, *reports: ErasureStatusRecord) -> None:
    async def send() -> None:
        publisher = Publisher(kafka, "test-status")
        try:
            await publisher.publish_many(ERASURE_STATUS, [(r.key, r.model_dump_json().encode()) for r in reports])
        finally:
            await publisher.close()

    asyncio.run(send())


def test_an_erasure_is_recorded_published_and_completed_by_the_services_reports(
    kafka_settings: KafkaSettings, database_url: str
) -> None:
    with TestClient(create_app(_settings(kafka_settings, database_url), ManualClock(NOW))) as client:
        response = client.delete("/v1/customers/c-1042", headers={**HEADERS, "X-Churnguard-Key-Id": "k_abc"})
        assert response.status_code == 202, response.text
        erasure = response.json()
        assert erasure["requested_by"] == "k_abc" and erasure["status"] == "pending"
        assert erasure["requested_at"] == "2026-11-20T12:00:00Z"
        assert {n: s["status"] for n, s in erasure["services"].items()} == {
            "ingest": "done", "scoring": "pending", "actions": "pending"}

        [record] = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 1))
        assert record.key == b"tenant-a/c-1042"
        assert decode_customer_record(record.value) == ErasureRecord(
            erasure_id=erasure["erasure_id"], tenant_id="tenant-a", customer_id="c-1042", requested_at=NOW)

        repeat = client.delete("/v1/customers/c-1042", headers=HEADERS)  # pending: the same one, sent again
        assert repeat.status_code == 202 and repeat.json()["erasure_id"] == erasure["erasure_id"]
        assert repeat.json()["requested_by"] == "k_abc"

        status_url = erasure["status_url"]
        scoring_done = ErasureStatusRecord(erasure_id=erasure["erasure_id"], tenant_id="tenant-a",
                                           service="scoring", done_at=NOW)
        unknown = ErasureStatusRecord(erasure_id="er_nobody", tenant_id="tenant-a", service="actions", done_at=NOW)
        _report(kafka_settings, scoring_done, unknown, scoring_done)
        wait_until(lambda: client.get(status_url, headers=HEADERS).json()["services"]["scoring"]["status"] == "done")
        assert client.get(status_url, headers=HEADERS).json()["status"] == "pending"
        _report(kafka_settings, scoring_done.model_copy(update={"service": "actions"}))
        done = wait_until(lambda: (r := client.get(status_url, headers=HEADERS).json())["status"] == "done" and r)
        assert done["completed_at"] == "2026-11-20T12:00:00Z"
        assert client.delete("/v1/customers/c-1042", headers=HEADERS).status_code == 200
        assert "churnguard_ingest_erasures_completed_total" in client.get("/metrics").text

        # Tenant isolation and bad input.
        assert client.get(status_url, headers=internal_headers("tenant-b")).status_code == 404
        assert client.get("/v1/customers/c-1042/erasure", headers=internal_headers("tenant-b")).status_code == 404
        assert client.delete(f"/v1/customers/{'c' * 129}", headers=HEADERS).status_code == 422
        assert client.delete("/v1/customers/c-1", headers=internal_headers("tenant-a", token="wrong")).status_code == 401
        too_long_key = client.delete("/v1/customers/c-2", headers={**HEADERS, "X-Churnguard-Key-Id": "k" * 129})
        assert too_long_key.status_code == 422


def test_with_the_broker_down_the_erasure_is_kept_and_a_retry_sends_it(
    kafka_settings: KafkaSettings, database_url: str
) -> None:
    down = kafka_settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    with TestClient(create_app(_settings(down, database_url, publish_timeout_s=0.5), ManualClock(NOW))) as client:
        response = client.delete("/v1/customers/c-7", headers=HEADERS)
        assert response.status_code == 503 and response.headers["retry-after"]
        assert "retry" in response.json()["detail"]
        recorded = client.get("/v1/customers/c-7/erasure", headers=HEADERS).json()
    with TestClient(create_app(_settings(kafka_settings, database_url), ManualClock(NOW))) as client:
        retried = client.delete("/v1/customers/c-7", headers=HEADERS)
        assert retried.status_code == 202 and retried.json()["erasure_id"] == recorded["erasure_id"]
    [record] = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 1))
    assert decode_customer_record(record.value).erasure_id == recorded["erasure_id"]  # type: ignore[union-attr]
