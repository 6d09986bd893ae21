"""ingest against the real broker: acknowledged events are on the topic, bad input is named."""

from __future__ import annotations

import asyncio
import gc
import json
import select
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from services.ingest.app import create_app
from services.ingest.config import IngestSettings
from shared.app import YOUNG_GC_THRESHOLD
from shared.clock import ManualClock
from shared.events import EventRecord
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.helpers import INTERNAL_TOKEN, ServerThread, internal_headers, read_topic

HEADERS = internal_headers("tenant-a")


def event(n: int = 1, **overrides) -> dict:
    body = {
        "id": f"evt-{n}",
        "type": "order.completed",
        "customer_id": "c-1042",
        "occurred_at": "2026-11-20T10:00:00Z",
        "source": "shop-de",
        "data": {"order_id": f"o-{n}", "amount": "59.90", "currency": "EUR"},
    }
    body.update(overrides)
    return body


def settings_for(kafka: KafkaSettings, database_url: str, **overrides) -> IngestSettings:
    return IngestSettings(
        kafka=kafka, database=DatabaseSettings(database_url=database_url),
        internal=InternalAuthSettings(internal_token=INTERNAL_TOKEN), **overrides,
    )


@pytest.fixture
def client(kafka_settings: KafkaSettings, database_url: str):
    with TestClient(create_app(settings_for(kafka_settings, database_url))) as test_client:
        yield test_client


def test_one_event_is_on_the_topic_keyed_by_tenant_and_customer(client: TestClient, kafka_settings: KafkaSettings) -> None:
    response = client.post("/v1/events", json=event(), headers=HEADERS)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0, "id": "evt-1"}

    [record] = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 1))
    assert record.key == b"tenant-a/c-1042"
    published = EventRecord.model_validate_json(record.value)
    assert published.tenant_id == "tenant-a"
    assert published.event.data.amount == "59.90"


def test_tenant_comes_from_the_gateway_not_the_body(client: TestClient, kafka_settings: KafkaSettings) -> None:
    response = client.post("/v1/events", json=event(tenant_id="tenant-b"), headers=HEADERS)
    assert response.status_code == 422
    assert {"field": "tenant_id", "message": "Extra inputs are not permitted"} in response.json()["errors"]


def test_batch_keeps_good_events_and_reports_bad_ones_by_index(client: TestClient, kafka_settings: KafkaSettings) -> None:
    batch = {"events": [
        event(1),
        event(2, type="order.teleported"),
        event(3),
        {k: v for k, v in event(4).items() if k != "customer_id"},
        event(5, data={"order_id": "o-5", "amount": 59.9, "currency": "EUR"}),
    ]}
    response = client.post("/v1/events/batch", json=batch, headers=HEADERS)
    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (2, 3)
    by_index = {e["index"]: e for e in body["errors"]}
    assert by_index[1]["field"] == "type" and "order.teleported" in by_index[1]["message"]
    assert by_index[3] == {"index": 3, "field": "customer_id", "message": "required field is missing"}
    assert by_index[4]["field"] == "data.amount"

    records = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 2))
    assert sorted(EventRecord.model_validate_json(r.value).event.id for r in records) == ["evt-1", "evt-3"]


def test_batch_with_no_valid_event_is_422(client: TestClient) -> None:
    response = client.post("/v1/events/batch", json={"events": [event(type="nope")]}, headers=HEADERS)
    assert response.status_code == 422
    assert response.json()["accepted"] == 0


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"id": "x",', 400, "malformed JSON at line 1"),
        (b"", 400, "empty"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (b'{"id": NaN}', 400, "NaN is not valid JSON"),
        (b'{"id": Infinity}', 400, "Infinity is not valid JSON"),
        (b'{"id": "\xff\xfe"}', 400, "not valid UTF-8"),
        (b'{"id": "a\\u0000b"}', 400, "NUL"),
        (b"[" * 10_000 + b"]" * 10_000, 400, "nested too deeply"),
        (b'{"a": ' * 20 + b"1" + b"}" * 20, 400, "nested too deeply"),
    ],
)
def test_malformed_bodies_get_a_clear_reason(client: TestClient, body: bytes, status: int, needle: str) -> None:
    response = client.post("/v1/events", content=body, headers={**HEADERS, "content-type": "application/json"})
    assert response.status_code == status
    assert needle in response.text


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "nope"}, "type"),
        ({"customer_id": None}, "customer_id"),
        ({"occurred_at": "2026-11-20T10:00:00"}, "occurred_at"),
        ({"data": {"order_id": "o", "amount": "59.90", "currency": "euro"}}, "data.currency"),
        ({"type": "feedback.nps", "data": {"score": 11}}, "data.score"),
        ({"customer_id": ""}, "customer_id"),
        ({"data": {"order_id": "o", "amount": "-5.00", "currency": "EUR"}}, "data.amount"),
        ({"occurred_at": "1970-01-01T00:00:00Z"}, "occurred_at"),
        ({"occurred_at": "2100-01-01T00:00:00Z"}, "occurred_at"),
    ],
)
def test_invalid_events_name_the_field(client: TestClient, change: dict, field: str) -> None:
    body = {k: v for k, v in {**event(), **change}.items() if v is not None}
    response = client.post("/v1/events", json=body, headers=HEADERS)
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]]


def test_far_future_events_are_rejected(client: TestClient) -> None:
    response = client.post("/v1/events", json=event(occurred_at="2099-01-01T00:00:00Z"), headers=HEADERS)
    assert response.status_code == 422
    assert "future" in response.text


def test_oversized_bodies_are_refused_while_streaming(client: TestClient) -> None:
    big = event(data={"order_id": "o", "amount": "1.00", "currency": "EUR"}, source="x" * 40_000)
    response = client.post("/v1/events", json=big, headers=HEADERS)
    assert response.status_code == 413
    assert "32768 bytes" in response.json()["detail"]

    def chunked():  # no Content-Length: the limit must hold while reading
        yield b'{"id": "'
        for _ in range(100):
            yield b"x" * 1024
    response = client.post("/v1/events", content=chunked(), headers={**HEADERS, "content-type": "application/json"})
    assert response.status_code == 413


def test_batch_over_500_events_is_refused(client: TestClient) -> None:
    events = [event(n) for n in range(501)]
    for e in events:  # keep under the byte limit so the count limit is what triggers
        e.pop("source")
    response = client.post("/v1/events/batch", json={"events": events}, headers=HEADERS)
    assert response.status_code == 413
    assert "limit is 500" in response.json()["detail"]


def test_only_the_gateway_may_call(client: TestClient) -> None:
    assert client.post("/v1/events", json=event()).status_code == 401
    wrong = {**HEADERS, "X-Churnguard-Internal-Token": "guess"}
    assert client.post("/v1/events", json=event(), headers=wrong).status_code == 401


def test_broker_down_means_503_with_retry_after_quickly(database_url: str) -> None:
    dead = KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000)
    with TestClient(create_app(settings_for(dead, database_url, publish_timeout_s=1.0))) as client:
        started = time.monotonic()
        response = client.post("/v1/events", json=event(), headers=HEADERS)
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "2"
        assert time.monotonic() - started < 5
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_serving_runs_on_the_settled_heap(client: TestClient) -> None:
    """Startup's objects frozen, young collections rarer (shared.app.settled_heap): 500-event
    batches cost ~24% less CPU than with the collector's defaults (docs/benchmarks.md, History)."""
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD


def test_ready_metrics_and_schema(client: TestClient) -> None:
    assert client.get("/readyz").json() == {
        "status": "ready", "checks": {"broker": True}, "diagnostics": {"database": True, "erasure_status_consumer": True}}
    client.post("/v1/events", json=event(), headers=HEADERS)
    client.post("/v1/events", json=event(type="nope"), headers=HEADERS)
    metrics = client.get("/metrics").text
    assert 'churnguard_ingest_events_accepted_total{type="order.completed"}' in metrics
    assert 'churnguard_ingest_events_rejected_total{reason="invalid"}' in metrics
    assert 'churnguard_ingest_http_requests_total{method="POST",route="/v1/events",status="202"}' in metrics
    schema = client.get("/v1/schema", headers=HEADERS).json()
    assert "order.completed" in json.dumps(schema["discriminator"])
    openapi = client.get("/openapi.json").json()
    assert "CustomerEvent" in openapi["components"]["schemas"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_415(client: TestClient, content_type: str | None) -> None:
    headers = dict(HEADERS)
    if content_type:
        headers["content-type"] = content_type
    response = client.post("/v1/events", content=json.dumps(event()).encode(), headers=headers)
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]


def test_same_id_is_published_once_per_tenant(kafka_settings: KafkaSettings, database_url: str) -> None:
    clock = ManualClock(datetime.now(timezone.utc))
    settings = settings_for(kafka_settings, database_url)
    with TestClient(create_app(settings, clock)) as client:
        in_one_batch = client.post("/v1/events/batch", json={"events": [event(1), event(1), event(2)]}, headers=HEADERS)
        assert (in_one_batch.json()["accepted"], in_one_batch.json()["duplicates"]) == (2, 1)
        across_batches = client.post("/v1/events/batch", json={"events": [event(2), event(3)]}, headers=HEADERS)
        assert (across_batches.json()["accepted"], across_batches.json()["duplicates"]) == (1, 1)
        clock.advance(timedelta(days=9))
        days_later = client.post("/v1/events", json=event(1), headers=HEADERS)
        assert days_later.json() == {"accepted": 0, "duplicates": 1, "id": "evt-1"}
    with TestClient(create_app(settings, clock)) as restarted:
        after_restart = restarted.post("/v1/events", json=event(3), headers=HEADERS)
        assert after_restart.json()["duplicates"] == 1
        other_tenant = restarted.post("/v1/events", json=event(1), headers=internal_headers("tenant-b"))
        assert other_tenant.json() == {"accepted": 1, "duplicates": 0, "id": "evt-1"}
        metrics = restarted.get("/metrics").text
        assert "churnguard_ingest_events_duplicate_total" in metrics

    records = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 5, timeout_s=3))
    published = sorted((EventRecord.model_validate_json(r.value).tenant_id, EventRecord.model_validate_json(r.value).event.id)
                       for r in records)
    assert published == [("tenant-a", "evt-1"), ("tenant-a", "evt-2"), ("tenant-a", "evt-3"), ("tenant-b", "evt-1")]


def test_the_future_is_judged_by_the_injected_clock(kafka_settings: KafkaSettings, database_url: str) -> None:
    clock = ManualClock(datetime(2026, 6, 1, tzinfo=timezone.utc))  # months before the wall clock
    with TestClient(create_app(settings_for(kafka_settings, database_url), clock)) as client:
        within_a_day = event(occurred_at="2026-06-01T23:00:00Z")
        assert client.post("/v1/events", json=within_a_day, headers=HEADERS).status_code == 202
        past_for_the_wall_clock_but_future_for_ours = event(2, occurred_at="2026-06-03T00:00:00Z")
        assert client.post("/v1/events", json=past_for_the_wall_clock_but_future_for_ours, headers=HEADERS).status_code == 422


def test_a_gigabyte_chunked_body_is_cut_off_at_the_limit(kafka_settings: KafkaSettings, database_url: str) -> None:
    """Over a real socket: ingest answers 413 after reading little more than the limit, while
    the sender still has almost the whole gigabyte to go."""
    server = ServerThread(create_app(settings_for(kafka_settings, database_url))).start()
    sent = 0
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/events HTTP/1.1\r\nHost: ingest\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items()).encode() + b"\r\n"
            )
            chunk = b"x" * 65536
            framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            answer = b""
            while sent < 1024**3:
                if select.select([sock], [], [], 0)[0]:
                    answer = sock.recv(65536)
                    break
                try:
                    sock.sendall(framed)
                except (BrokenPipeError, ConnectionResetError):
                    answer = sock.recv(65536)
                    break
                sent += len(chunk)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"32768 bytes" in answer
        assert sent < 16 * 1024 * 1024, f"sent {sent} bytes before the answer"
    finally:
        server.stop()


def test_nothing_is_produced_for_rejected_input(client: TestClient, kafka_settings: KafkaSettings) -> None:
    bad_bodies = [
        b'{"id": "x",', b'{"id": NaN}', b"\xff", json.dumps(event(type="nope")).encode(),
        json.dumps(event(occurred_at="1970-01-01T00:00:00Z")).encode(),
        json.dumps({"events": [event(type="nope"), event(customer_id="")]}).encode(),
    ]
    for body in bad_bodies:
        for path in ("/v1/events", "/v1/events/batch"):
            response = client.post(path, content=body, headers={**HEADERS, "content-type": "application/json"})
            assert 400 <= response.status_code < 500, (path, body, response.text)
    assert asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 1, timeout_s=2)) == []
