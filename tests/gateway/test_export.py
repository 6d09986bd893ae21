"""The export fan-out's failure answers, against real (fake) upstream processes: an export that
misses a service's data is never passed off as complete. The whole document on the real
services is tested in tests/test_erasure.py."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings


def test_export_needs_a_key_and_a_valid_customer_id(client: TestClient, auth: dict[str, str]) -> None:
    assert client.get("/v1/customers/c-1/export").status_code == 401
    too_long = client.get(f"/v1/customers/{'c' * 129}/export", headers=auth)
    assert too_long.status_code == 422 and "customer_id" in too_long.text


def test_a_service_that_cannot_answer_makes_the_export_fail_with_503(
    settings: GatewaySettings, auth: dict[str, str], dead_url: str
) -> None:
    with TestClient(create_app(settings.model_copy(update={"scoring_url": dead_url}))) as client:
        response = client.get("/v1/customers/c-1/export", headers=auth)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "scoring is unavailable" in response.json()["detail"]


def test_a_service_answering_something_else_than_an_export_makes_it_fail(
    client: TestClient, auth: dict[str, str]
) -> None:
    # The fake upstreams echo the request instead of answering an export section.
    response = client.get("/v1/customers/c-1/export", headers=auth)
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert all(f"{name} answered an unexpected document" in detail for name in ("ingest", "scoring", "actions"))
