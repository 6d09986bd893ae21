"""Shopify webhooks through ingest, against the real broker and database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.ingest.app import create_app
from services.ingest.sources.shopify import sign
from shared.events import EventRecord
from shared.db import make_engine
from shared.secret_box import TOKEN_PREFIX
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.helpers import internal_headers, read_topic
from tests.ingest.test_routes import settings_for

DATA = Path(__file__).parent / "data"
SECRET = "shpss_tenant-a-0123456789abcdef"
SECRET_B = "shpss_tenant-b-fedcba9876543210"
SHOP = "shop-de.myshopify.com"
CUSTOMER = "shopify:7001234567890"
WEBHOOK = "/v1/sources/shopify/orders"


def payload(name: str = "shopify_order.json", **changes: Any) -> dict[str, Any]:
    return {**json.loads((DATA / name).read_text()), **changes}


def deliver(
    client: TestClient,
    body: dict[str, Any] | bytes,
    topic: str = "orders/create",
    *,
    secret: str | None = SECRET,
    tenant: str = "tenant-a",
    signature: str | None = None,
) -> Any:
    """POST the way Shopify does: raw JSON, signed over exactly those bytes."""
    raw = body if isinstance(body, bytes) else json.dumps(body, indent=2).encode()
    headers = {
        **internal_headers(tenant),
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Shop-Domain": SHOP,
        "X-Shopify-API-Version": "2025-10",
        "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
    }
    if signature is not None:
        headers["X-Shopify-Hmac-Sha256"] = signature
    elif secret is not None:
        headers["X-Shopify-Hmac-Sha256"] = sign(raw, secret)
    return client.post(WEBHOOK, content=raw, headers=headers)


def put_secret(client: TestClient, secret: str, tenant: str = "tenant-a", source: str = "shopify") -> Any:
    return client.put(f"/v1/sources/{source}/secret", json={"secret": secret}, headers=internal_headers(tenant))


def published_for(client: TestClient, kafka: KafkaSettings, tenant: str = "tenant-a", customer: str = CUSTOMER) -> list[EventRecord]:
    """Everything published for this customer so far: a marker event of the same customer (so
    the same partition, in order) is sent last, and the topic read until it arrives."""
    marker = {"id": f"marker-{time.monotonic_ns()}", "type": "session.recorded", "customer_id": customer,
              "occurred_at": "2025-11-20T10:00:00Z", "data": {}}
    assert client.post("/v1/events", json=marker, headers=internal_headers(tenant)).status_code == 202

    def decoded(records: list) -> list[EventRecord]:
        return [EventRecord.model_validate_json(r.value) for r in records]

    records = asyncio.run(read_topic(
        kafka, CUSTOMER_EVENTS, until=lambda rs: any(r.event.id == marker["id"] for r in decoded(rs))))
    return [r for r in decoded(records)
            if r.tenant_id == tenant and r.event.customer_id == customer and r.event.id != marker["id"]]


@pytest.fixture
def client(kafka_settings: KafkaSettings, database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(kafka_settings, database_url))) as test_client:
        assert put_secret(test_client, SECRET).status_code == 204
        yield test_client


def test_signed_order_is_published_as_order_completed(client: TestClient, kafka_settings: KafkaSettings) -> None:
    response = deliver(client, payload())
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0}

    [record] = published_for(client, kafka_settings)
    assert record.tenant_id == "tenant-a" and record.key == b"tenant-a/shopify:7001234567890"
    event = record.event
    assert (event.id, event.type, event.customer_id) == ("shopify:order:5412389701234", "order.completed", CUSTOMER)
    assert event.occurred_at.isoformat() == "2025-11-20T11:00:00+01:00"
    assert event.source == "shopify:shop-de.myshopify.com"
    assert event.data.model_dump() == {"order_id": "shopify:5412389701234", "amount": "114.60", "currency": "EUR", "items": 4}


def test_create_then_paid_is_one_event(client: TestClient, kafka_settings: KafkaSettings) -> None:
    assert deliver(client, payload(), "orders/create").json() == {"accepted": 1, "duplicates": 0}
    assert deliver(client, payload(financial_status="paid"), "orders/paid").json() == {"accepted": 0, "duplicates": 1}
    assert deliver(client, payload(), "orders/create").json() == {"accepted": 0, "duplicates": 1}  # Shopify's retry
    assert [r.event.id for r in published_for(client, kafka_settings)] == ["shopify:order:5412389701234"]


def test_refund_after_the_order_is_attributed_to_its_customer(client: TestClient, kafka_settings: KafkaSettings) -> None:
    assert deliver(client, payload(), "orders/paid").status_code == 200
    response = deliver(client, payload("shopify_refund.json"), "refunds/create")
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0}

    order, refund = published_for(client, kafka_settings)
    assert order.event.type == "order.completed"
    assert (refund.event.id, refund.event.type, refund.event.customer_id) == (
        "shopify:refund:930123456789", "order.refunded", CUSTOMER)
    assert refund.event.data.model_dump() == {
        "order_id": "shopify:5412389701234", "amount": "71.00", "currency": "EUR", "reason": "Beanie arrived damaged"}
    assert refund.key == order.key  # same customer, same partition, in order


def test_refund_for_an_unknown_order_is_422(client: TestClient, kafka_settings: KafkaSettings) -> None:
    response = deliver(client, payload("shopify_refund.json"), "refunds/create")
    assert response.status_code == 422
    body = response.json()
    assert "refund for an order churnguard has not seen" in body["detail"]
    assert body["errors"][0]["field"] == "order_id"
    # once the order has arrived, Shopify's retry of the same refund goes through
    assert deliver(client, payload(), "orders/create").status_code == 200
    assert deliver(client, payload("shopify_refund.json"), "refunds/create").json() == {"accepted": 1, "duplicates": 0}


@pytest.mark.parametrize("signature", [None, "", "bm90IHRoZSBzaWduYXR1cmU=", sign(b"another body", SECRET)])
def test_missing_or_wrong_signature_is_401_and_nothing_is_published(
    client: TestClient, kafka_settings: KafkaSettings, signature: str | None
) -> None:
    response = deliver(client, payload(), secret=None, signature=signature)
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert "X-Shopify-Hmac-Sha256" in detail
    assert ("missing" in detail) if not signature else ("does not match the body" in detail)
    assert response.headers["WWW-Authenticate"].startswith("HMAC-SHA256")
    assert published_for(client, kafka_settings) == []
    # nothing remembered either: a refund for that order still cannot be attributed
    assert deliver(client, payload("shopify_refund.json"), "refunds/create").status_code == 422


def test_tampered_body_is_401(client: TestClient) -> None:
    raw = json.dumps(payload()).encode()
    tampered = raw.replace(b'"114.60"', b'"1.00"')
    assert tampered != raw
    assert deliver(client, tampered, signature=sign(raw, SECRET)).status_code == 401


def test_without_a_secret_the_webhook_is_409(kafka_settings: KafkaSettings, database_url: str) -> None:
    with TestClient(create_app(settings_for(kafka_settings, database_url))) as client:
        response = deliver(client, payload())
    assert response.status_code == 409
    assert response.json()["detail"] == "no shopify secret configured for this tenant: PUT /v1/sources/shopify/secret"


def test_guest_order_is_acknowledged_but_not_published(client: TestClient) -> None:
    """A 4xx would make Shopify retry, and eventually drop the shop's subscription."""
    response = deliver(client, payload("shopify_order_guest.json"), "orders/paid")
    assert response.status_code == 200
    assert response.json()["accepted"] == 0
    assert "guest checkout" in response.json()["note"]


@pytest.mark.parametrize("topic", ["orders/updated", "customers/create", ""])
def test_unsupported_topic_is_422_naming_the_supported_ones(client: TestClient, topic: str) -> None:
    response = deliver(client, payload(), topic)
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == "X-Shopify-Topic"
    assert "orders/create, orders/paid, orders/cancelled, refunds/create" in error["message"]


def test_cancelled_order_publishes_nothing_and_says_why(client: TestClient, kafka_settings: KafkaSettings) -> None:
    response = deliver(client, payload(cancelled_at="2025-11-21T09:00:00+01:00", cancel_reason="customer"),
                       "orders/cancelled")
    assert response.status_code == 200
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (0, 0)
    assert "refunds/create" in body["note"]
    assert published_for(client, kafka_settings) == []
    # but the order's customer is now known, so its refund can be attributed
    assert deliver(client, payload("shopify_refund.json"), "refunds/create").json()["accepted"] == 1


@pytest.mark.parametrize(
    ("changes", "field", "contract_field"),
    [
        ({"currency": "euro"}, "currency", "data.currency"),
        ({"current_total_price": "-5.00"}, "current_total_price", "data.amount"),
        ({"current_total_price": 114.6}, "current_total_price", "data.amount"),
        ({"processed_at": "2099-01-01T00:00:00Z"}, "processed_at", "occurred_at"),
        ({"processed_at": "2025-11-20T11:00:00"}, "processed_at", "occurred_at"),  # no timezone
    ],
)
def test_payload_making_an_invalid_event_names_the_shopify_field(
    client: TestClient, changes: dict[str, Any], field: str, contract_field: str
) -> None:
    response = deliver(client, payload(**changes))
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == field
    assert contract_field in error["message"]


def test_large_orders_fit_and_the_limit_is_256_kib(client: TestClient) -> None:
    order = payload()
    line = order["line_items"][0]
    order["line_items"] = [{**line, "id": line["id"] + n, "quantity": 1} for n in range(60)]
    raw = json.dumps(order, indent=2).encode()
    assert 32 * 1024 < len(raw) < 256 * 1024  # over a single event's limit, under the source's
    response = deliver(client, raw)
    assert response.status_code == 200, response.text

    order["line_items"] = [{**line, "id": line["id"] + n} for n in range(400)]
    too_big = json.dumps(order, indent=2).encode()
    assert len(too_big) > 256 * 1024
    response = deliver(client, too_big)
    assert response.status_code == 413
    assert "262144 bytes" in response.json()["detail"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = deliver(client, b'{"id": 1,')
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["detail"]


def test_secret_set_replace_delete(client: TestClient, kafka_settings: KafkaSettings, database_url: str) -> None:
    replaced = "shpss_rotated-0123456789abcdef"
    assert put_secret(client, replaced).status_code == 204
    engine = make_engine(database_url)  # at rest: a Fernet token, not the secret (shared.secret_box)
    with engine.connect() as connection:
        (stored,) = connection.exec_driver_sql("SELECT secret FROM ingest_source_secrets").scalars().all()
    engine.dispose()
    assert stored.startswith(TOKEN_PREFIX) and replaced not in stored
    assert deliver(client, payload(), secret=SECRET).status_code == 401  # the old one no longer verifies
    assert deliver(client, payload(), secret=replaced).json() == {"accepted": 1, "duplicates": 0}

    assert client.delete("/v1/sources/shopify/secret", headers=internal_headers("tenant-a")).status_code == 204
    assert deliver(client, payload(), secret=replaced).status_code == 409
    again = client.delete("/v1/sources/shopify/secret", headers=internal_headers("tenant-a"))
    assert again.status_code == 404
    assert again.json()["detail"] == "no shopify secret configured for this tenant"


def test_tenants_secrets_and_orders_are_their_own(client: TestClient, kafka_settings: KafkaSettings) -> None:
    assert put_secret(client, SECRET_B, tenant="tenant-b").status_code == 204
    # tenant B's secret does not verify tenant A's webhook, nor A's secret B's
    assert deliver(client, payload(), secret=SECRET_B, tenant="tenant-a").status_code == 401
    assert deliver(client, payload(), secret=SECRET, tenant="tenant-b").status_code == 401
    assert deliver(client, payload(), secret=SECRET, tenant="tenant-a").json()["accepted"] == 1
    # A's order does not attribute B's refund
    response = deliver(client, payload("shopify_refund.json"), "refunds/create", secret=SECRET_B, tenant="tenant-b")
    assert response.status_code == 422
    # deleting B's secret leaves A's
    assert client.delete("/v1/sources/shopify/secret", headers=internal_headers("tenant-b")).status_code == 204
    assert deliver(client, payload("shopify_refund.json"), "refunds/create", tenant="tenant-a").json()["accepted"] == 1
    assert deliver(client, payload(), secret=SECRET_B, tenant="tenant-b").status_code == 409
    assert [r.tenant_id for r in published_for(client, kafka_settings, tenant="tenant-b")] == []


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"secret": "too-short"}, 422, "at least 16 characters"),
        ({"secret": "x" * 513}, 422, "at most 512 characters"),
        ({"secret": " shpss_0123456789abcdef "}, 422, "whitespace"),
        ({"secret": 1234567890123456789}, 422, "must be a string"),
        ({}, 422, "secret"),
        ({"secret": "shpss_0123456789abcdef", "shop": "x"}, 422, "shop"),
        (b'{"secret": ', 400, "malformed JSON"),
    ],
)
def test_bad_secrets_are_refused_naming_the_field(client: TestClient, body: Any, status: int, needle: str) -> None:
    headers = {**internal_headers("tenant-a"), "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.put("/v1/sources/shopify/secret", content=raw, headers=headers)
    assert response.status_code == status, response.text
    assert needle in response.text
    # the stored secret is untouched
    assert deliver(client, payload(), secret=SECRET).status_code == 200


def test_unknown_source_is_404_naming_the_known_ones(client: TestClient) -> None:
    for response in (
        put_secret(client, SECRET, source="woocommerce"),
        client.delete("/v1/sources/woocommerce/secret", headers=internal_headers("tenant-a")),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == "unknown source 'woocommerce'; known sources: shopify"


def test_only_the_gateway_may_call(client: TestClient) -> None:
    assert client.put("/v1/sources/shopify/secret", json={"secret": SECRET}).status_code == 401
    raw = json.dumps(payload()).encode()
    assert client.post(WEBHOOK, content=raw, headers={"X-Shopify-Hmac-Sha256": sign(raw, SECRET)}).status_code == 401


def test_broker_down_is_503_with_retry_after(database_url: str) -> None:
    dead = KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000)
    with TestClient(create_app(settings_for(dead, database_url, publish_timeout_s=1.0))) as client:
        assert put_secret(client, SECRET).status_code == 204
        started = time.monotonic()
        response = deliver(client, payload())
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "2"
        assert time.monotonic() - started < 5


def test_outcomes_are_counted(client: TestClient) -> None:
    deliver(client, payload())
    deliver(client, payload(), secret=None)
    metrics = client.get("/metrics").text
    assert 'churnguard_ingest_source_webhooks_total{outcome="published",source="shopify"}' in metrics
    assert 'churnguard_ingest_source_webhooks_total{outcome="bad_signature",source="shopify"}' in metrics
    assert 'route="/v1/sources/shopify/orders"' in metrics


def test_other_methods_on_the_secret_are_405_listing_both(client: TestClient) -> None:
    for method in ("GET", "POST", "OPTIONS"):
        response = client.request(method, "/v1/sources/shopify/secret", headers=internal_headers("tenant-a"))
        assert response.status_code == 405, method
        assert response.headers["Allow"] == "PUT, DELETE"
