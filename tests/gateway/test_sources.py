"""Upstream sources at the gateway: the API key as `?key=` under /v1/sources/ only, never
forwarded or logged; and the whole way from a Shopify webhook to the topic through real ingest."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.deps import MISSING_KEY, MISSING_SOURCE_KEY
from services.gateway.query_key import query_key_of, without_query_key
from services.ingest.app import create_app as create_ingest_app
from services.ingest.config import IngestSettings
from services.ingest.sources.shopify import sign
from shared.events import EventRecord
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.gateway.conftest import INTERNAL_TOKEN
from tests.helpers import ServerThread, read_topic

ORDER = Path(__file__).parents[1] / "ingest" / "data" / "shopify_order.json"
WEBHOOK = "/v1/sources/shopify/orders"
SECRET = "shpss_gateway-test-0123456789ab"


def test_query_key_is_accepted_under_sources_and_not_forwarded(client: TestClient, tenant: tuple[str, str]) -> None:
    tenant_id, key = tenant
    response = client.post(f"{WEBHOOK}?key={key}", content=b'{"id": 1}',
                           headers={"Content-Type": "application/json", "X-Shopify-Topic": "orders/create"})
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert (echoed["upstream"], echoed["path"], echoed["tenant"]) == ("ingest", WEBHOOK, tenant_id)
    assert echoed["query"] == ""  # the key stayed at the gateway
    assert key not in json.dumps(echoed)
    assert echoed["headers"]["x-shopify-topic"] == "orders/create"

    other_params = client.post(f"{WEBHOOK}?shop=a&key={key}&x=a%20b", content=b"{}")
    assert other_params.status_code == 200
    assert other_params.json()["query"] == "shop=a&x=a%20b"

    for method in ("PUT", "DELETE"):
        secret = client.request(method, f"/v1/sources/shopify/secret?key={key}", content=b"{}")
        assert secret.status_code == 200, (method, secret.text)
        assert (secret.json()["upstream"], secret.json()["method"], secret.json()["query"]) == ("ingest", method, "")


def test_query_key_is_refused_elsewhere(client: TestClient, tenant: tuple[str, str]) -> None:
    _, key = tenant
    for method, path in (("POST", "/v1/events"), ("GET", "/v1/models"), ("GET", "/v1/customers/c-1/score")):
        response = client.request(method, f"{path}?key={key}", content=b"{}" if method == "POST" else None)
        assert response.status_code == 401, (method, path)
        assert response.json()["detail"] == MISSING_KEY


def test_headers_still_work_under_sources_and_a_stray_query_key_is_dropped(
    client: TestClient, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    tenant_id, key = tenant
    under_sources = client.put("/v1/sources/shopify/secret", json={"secret": SECRET}, headers=auth)
    assert under_sources.status_code == 200 and under_sources.json()["tenant"] == tenant_id
    # a key in the URL of another route is no credential, but it is not forwarded either
    elsewhere = client.post(f"/v1/events?dry=1&key={key}", content=b"{}", headers=auth)
    assert elsewhere.status_code == 200
    assert elsewhere.json()["query"] == "dry=1"


def test_bad_or_missing_query_key_under_sources_is_401(client: TestClient) -> None:
    missing = client.post(WEBHOOK, content=b"{}")
    assert missing.status_code == 401
    assert missing.json()["detail"] == MISSING_SOURCE_KEY
    for key in ("cg_not-a-real-key", ""):
        response = client.post(f"{WEBHOOK}?key={key}", content=b"{}")
        assert response.status_code == 401
    assert client.post(f"{WEBHOOK}?key=cg_not-a-real-key", content=b"{}").json()["detail"] == "invalid API key"


def test_unknown_source_paths_are_not_routed(client: TestClient, auth: dict[str, str]) -> None:
    assert client.post("/v1/sources/woocommerce/orders", content=b"{}", headers=auth).status_code == 404
    assert client.get("/v1/sources/shopify/secret", headers=auth).status_code == 405  # write-only


@pytest.mark.parametrize(
    ("query", "without", "key"),
    [
        (b"", b"", None),
        (b"key=cg_1", b"", "cg_1"),
        (b"a=1&key=cg_1&b=2", b"a=1&b=2", "cg_1"),
        (b"k%65y=cg_2&x=%20", b"x=%20", "cg_2"),  # an encoded name is the same parameter
        (b"key=cg_1&key=cg_2", b"", "cg_1"),
        (b"keys=1&monkey=2&x=key", b"keys=1&monkey=2&x=key", None),
        (b"key", b"", None),
    ],
)
def test_query_key_parsing(query: bytes, without: bytes, key: str | None) -> None:
    assert without_query_key(query) == without
    assert query_key_of(query) == key


# --- the whole way: gateway -> real ingest -> broker --------------------------------------


@pytest.fixture
def live_ingest(kafka_settings: KafkaSettings, database_url: str) -> Iterator[str]:
    settings = IngestSettings(
        kafka=kafka_settings, database=DatabaseSettings(database_url=database_url),
        internal=InternalAuthSettings(internal_token=SecretStr(INTERNAL_TOKEN)),
    )
    server = ServerThread(create_ingest_app(settings), lifespan="on").start()
    try:
        yield server.url
    finally:
        server.stop()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_shopify_webhook_through_gateway_and_ingest(
    settings: GatewaySettings, live_ingest: str, tenant: tuple[str, str], auth: dict[str, str],
    kafka_settings: KafkaSettings,
) -> None:
    tenant_id, key = tenant
    gateway = ServerThread(create_app(settings.model_copy(update={"ingest_url": live_ingest})), lifespan="on")
    access = logging.getLogger("uvicorn.access")
    records, level = _Records(), access.level
    access.addHandler(records)
    access.setLevel(logging.INFO)
    gateway.start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            assert http.put("/v1/sources/shopify/secret", json={"secret": SECRET}, headers=auth).status_code == 204
            body = ORDER.read_bytes()
            shopify = {"Content-Type": "application/json", "X-Shopify-Topic": "orders/create",
                       "X-Shopify-Shop-Domain": "shop-de.myshopify.com"}
            forged = http.post(f"{WEBHOOK}?key={key}", content=body,
                               headers={**shopify, "X-Shopify-Hmac-Sha256": sign(body, "not-the-secret-at-all")})
            # the caller's 401 (a wrong signature), not "internal token mismatch"
            assert forged.status_code == 401, forged.text
            assert "does not match the body" in forged.json()["detail"]
            assert forged.headers["WWW-Authenticate"].startswith("HMAC-SHA256")

            signed = http.post(f"{WEBHOOK}?key={key}", content=body,
                               headers={**shopify, "X-Shopify-Hmac-Sha256": sign(body, SECRET)})
            assert signed.status_code == 200, signed.text
            assert signed.json() == {"accepted": 1, "duplicates": 0}
    finally:
        gateway.stop()
        access.removeHandler(records)
        access.setLevel(level)

    [record] = asyncio.run(read_topic(kafka_settings, CUSTOMER_EVENTS, 1))
    published = EventRecord.model_validate_json(record.value)
    assert published.tenant_id == tenant_id
    assert (published.event.id, published.event.customer_id) == ("shopify:order:5412389701234", "shopify:7001234567890")

    logged = "\n".join(records.messages)
    assert WEBHOOK in logged  # the access log did record the requests...
    assert key not in logged and "key=" not in logged  # ...without the key
