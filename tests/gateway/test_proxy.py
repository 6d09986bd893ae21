"""The gateway in front of real upstream HTTP services: forwarding, trust headers, failures."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import httpx
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant, revoke_key
from services.gateway.proxy import public_location
from shared.clock import ManualClock
from shared.settings import InternalAuthSettings
from tests.gateway.conftest import INTERNAL_TOKEN


def test_request_is_forwarded_with_the_tenant_of_the_key_and_the_internal_token(
    client: TestClient, tenant: tuple[str, str], auth: dict[str, str]
) -> None:
    tenant_id, _ = tenant
    response = client.post(
        "/v1/events?dry=1&x=a%20b",
        content=b'{"id": "e1"}',
        headers={**auth, "Content-Type": "application/json", "Accept-Language": "de"},
    )
    assert response.status_code == 200, response.text
    echoed = response.json()
    assert echoed["upstream"] == "ingest"
    assert (echoed["method"], echoed["path"], echoed["query"]) == ("POST", "/v1/events", "dry=1&x=a%20b")
    assert echoed["body"] == '{"id": "e1"}'
    assert echoed["tenant"] == tenant_id  # shared.app.TenantId accepted the gateway's token
    headers = echoed["headers"]
    assert headers["x-churnguard-internal-token"] == INTERNAL_TOKEN
    assert headers["x-churnguard-tenant"] == tenant_id
    assert headers["content-type"] == "application/json"
    assert headers["accept-language"] == "de"
    assert "authorization" not in headers and "x-api-key" not in headers


def test_each_route_reaches_its_own_upstream(client: TestClient, auth: dict[str, str]) -> None:
    expected = [
        ("POST", "/v1/events/batch", "ingest"),
        ("GET", "/v1/schema", "ingest"),
        ("GET", "/v1/customers/c-1/score", "scoring"),
        ("GET", "/v1/models", "scoring"),
        ("POST", "/v1/models/m-3/activate", "scoring"),
        ("GET", "/v1/webhooks", "actions"),
        ("DELETE", "/v1/webhooks/w-1", "actions"),
        ("GET", "/v1/customers/c-1/offers", "actions"),
        ("GET", "/v1/customers/c-1/decisions", "actions"),
        ("POST", "/v1/deliveries/d-1/replay", "actions"),
    ]
    for method, path, upstream in expected:
        response = client.request(method, path, headers=auth)
        assert response.status_code == 200, (method, path, response.text)
        assert (response.json()["upstream"], response.json()["path"]) == (upstream, path)


def test_caller_cannot_choose_the_tenant_or_fake_internal_headers(
    client: TestClient, tenant: tuple[str, str]
) -> None:
    tenant_id, key = tenant
    response = client.get(
        "/v1/customers/c-1/score",
        headers={
            "X-API-Key": key,
            "X-Churnguard-Tenant": "t_someone_else",
            "X-Churnguard-Internal-Token": "guessed",
            "X-Churnguard-Anything": "x",
        },
    )
    assert response.status_code == 200, response.text
    headers = response.json()["headers"]
    assert headers["x-churnguard-tenant"] == tenant_id
    assert headers["x-churnguard-internal-token"] == INTERNAL_TOKEN
    assert "x-churnguard-anything" not in headers
    assert "x-api-key" not in headers


def test_request_id_travels_to_the_upstream_and_back(client: TestClient, auth: dict[str, str]) -> None:
    given = client.get("/v1/models", headers={**auth, "X-Request-ID": "req-123"})
    assert given.headers["X-Request-ID"] == "req-123"
    assert given.json()["headers"]["x-request-id"] == "req-123"

    generated = client.get("/v1/models", headers=auth)
    request_id = generated.headers["X-Request-ID"]
    assert request_id and generated.json()["headers"]["x-request-id"] == request_id


def test_upstream_status_body_and_retry_after_are_passed_through(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/customers/c-1/offers?status=503", headers=auth)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert response.headers["content-type"] == "application/json"
    assert response.json()["upstream"] == "actions"

    assert client.get("/v1/customers/c-1/decisions?status=404", headers=auth).status_code == 404


def test_missing_key_is_refused_with_a_clear_message(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwdw=="}, {"X-API-Key": ""}):
        response = client.post("/v1/events", content=b"{}", headers=headers)
        assert response.status_code == 401
        assert response.json()["detail"] == "missing API key: send Authorization: Bearer <key> or X-API-Key"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_unknown_and_revoked_keys_are_refused(client: TestClient, database_url: str) -> None:
    for key in ("cg_not-a-real-key", "not even the format"):
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 401
        assert response.json()["detail"] == "invalid API key"
        assert "invalid_token" in response.headers["WWW-Authenticate"]



def test_a_revoked_key_is_refused_once_the_gateways_memory_of_it_expires(
    settings: GatewaySettings, database_url: str
) -> None:
    clock = ManualClock(datetime(2026, 5, 1, tzinfo=timezone.utc))
    with TestClient(create_app(settings.model_copy(update={"auth_cache_s": 2.0}), clock=clock)) as client:
        _, key = create_tenant(database_url, "leaky")
        assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        assert revoke_key(database_url, key) is True
        assert revoke_key(database_url, key) is False  # already revoked
        # Revoked by another process: this gateway remembers the key as valid for auth_cache_s.
        clock.advance(timedelta(seconds=1.9))
        assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        clock.advance(timedelta(seconds=0.2))
        for _ in range(2):  # the second answer comes from memory, and is the same
            response = client.get("/v1/models", headers={"X-API-Key": key})
            assert response.status_code == 401
            assert response.json()["detail"] == "invalid API key"

        failures = client.get("/metrics").text
        assert 'churnguard_gateway_auth_failures_total{reason="revoked"}' in failures


def test_without_the_memory_revocation_is_immediate(settings: GatewaySettings, database_url: str) -> None:
    with TestClient(create_app(settings.model_copy(update={"auth_cache_s": 0.0}))) as client:
        _, key = create_tenant(database_url, "leaky")
        assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        assert revoke_key(database_url, key) is True
        assert client.get("/v1/models", headers={"X-API-Key": key}).status_code == 401


def test_unknown_path_is_404_and_wrong_method_405(client: TestClient, auth: dict[str, str]) -> None:
    response = client.get("/v1/secrets", headers=auth)
    assert response.status_code == 404
    assert "/v1/secrets" in response.json()["detail"]
    assert client.get("/internal/thing", headers=auth).status_code == 404  # upstream-only path
    assert client.get("/v1/events", headers=auth).status_code == 405


def test_oversize_body_is_refused_naming_the_limit(client: TestClient, auth: dict[str, str]) -> None:
    limit = 64 * 1024
    declared = client.post("/v1/events", content=b"x" * (limit + 1), headers=auth)
    assert declared.status_code == 413
    assert declared.json()["detail"] == f"request body exceeds the limit of {limit} bytes"

    def chunks():  # no Content-Length: sent with Transfer-Encoding: chunked
        for _ in range(8):
            yield b"y" * (16 * 1024)

    chunked = client.post("/v1/events", content=chunks(), headers=auth)
    assert chunked.status_code == 413
    assert str(limit) in chunked.json()["detail"]

    exactly = client.post("/v1/events", content=b"z" * limit, headers=auth)
    assert exactly.status_code == 200 and len(exactly.json()["body"]) == limit


def test_chunked_body_is_not_read_past_the_limit(client: TestClient, auth: dict[str, str]) -> None:
    """Streamed straight into the ASGI app (TestClient itself would join the chunks first):
    the gateway stops pulling chunks once the limit is passed."""
    pulled = 0

    async def endless():
        nonlocal pulled
        for _ in range(10_000):  # 160 MiB if anyone read it all
            pulled += 1
            yield b"x" * (16 * 1024)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            return await c.post("/v1/events", content=endless(), headers=auth)

    response = client.portal.call(send)
    assert response.status_code == 413
    assert pulled <= 5  # 64 KiB limit / 16 KiB chunks, plus the one that crossed it


def test_upstream_down_is_503_with_retry_after(settings: GatewaySettings, dead_url: str, auth: dict[str, str]) -> None:
    with TestClient(create_app(settings.model_copy(update={"scoring_url": dead_url}))) as client:
        started = time.monotonic()
        response = client.get("/v1/customers/c-1/score", headers=auth)
        assert time.monotonic() - started < 2
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert "scoring" in response.json()["detail"]
        # the other upstreams are unaffected
        assert client.get("/v1/webhooks", headers=auth).status_code == 200
        metrics = client.get("/metrics").text
    assert 'churnguard_gateway_upstream_requests_total{outcome="unavailable",upstream="scoring"}' in metrics


def test_slow_upstream_is_504_within_the_timeout(settings: GatewaySettings, auth: dict[str, str]) -> None:
    with TestClient(create_app(settings.model_copy(update={"upstream_timeout_s": 0.5}))) as client:
        started = time.monotonic()
        response = client.get("/v1/models?sleep=5", headers=auth)
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert "0.5 s" in response.json()["detail"]
        assert 0.4 < elapsed < 1.5
        assert client.get("/v1/models", headers=auth).status_code == 200  # the pool still works


def test_internal_token_mismatch_is_a_gateway_fault_not_a_bad_key(
    settings: GatewaySettings, auth: dict[str, str]
) -> None:
    wrong = settings.model_copy(update={"internal": InternalAuthSettings(internal_token=SecretStr("nope"))})
    with TestClient(create_app(wrong)) as client:
        response = client.get("/v1/models", headers=auth)
    assert response.status_code == 502
    assert "internal token" in response.json()["detail"]


def test_proxied_requests_are_labelled_by_route_template(client: TestClient, auth: dict[str, str]) -> None:
    client.get("/v1/customers/c-42/score", headers=auth)
    client.delete("/v1/webhooks/w-42", headers=auth)
    metrics = client.get("/metrics").text
    assert 'route="/v1/customers/{customer_id}/score"' in metrics
    assert 'route="/v1/webhooks/{subpath:path}"' in metrics
    assert "c-42" not in metrics and "w-42" not in metrics
    assert 'churnguard_gateway_upstream_requests_total{outcome="2xx",upstream="scoring"}' in metrics
    assert 'churnguard_gateway_upstream_duration_seconds_count{upstream="actions"}' in metrics


def test_upstream_redirects_do_not_reveal_internal_addresses() -> None:
    assert public_location("http://10.0.0.7:8003/v1/webhooks?x=1", "http://10.0.0.7:8003") == "/v1/webhooks?x=1"
    assert public_location("http://10.0.0.7:8003", "http://10.0.0.7:8003") == "/"
    assert public_location("/v1/webhooks/w-1", "http://10.0.0.7:8003") == "/v1/webhooks/w-1"
    assert public_location("https://example.com/x", "http://10.0.0.7:8003") == "https://example.com/x"
