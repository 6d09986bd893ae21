"""The actions HTTP API with its lifespan running (real broker, real database): webhook
subscriptions, bad input (422 naming the field), tenant isolation (404), internal auth (401),
readiness."""

from __future__ import annotations

import base64
import gc
from collections.abc import Callable

from fastapi.testclient import TestClient

from services.actions.app import create_app
from services.actions.config import ActionsSettings
from shared.app import YOUNG_GC_THRESHOLD
from shared.clock import ManualClock
from tests.actions.actions_support import OTHER_TENANT, START, headers, wait_until


def _field(response, name: str) -> None:  # noqa: ANN001
    assert response.status_code == 422, response.text
    assert any(name in error["loc"] for error in response.json()["detail"]), response.text


async def test_webhook_subscriptions_bad_input_isolation_and_readiness(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock
) -> None:
    with TestClient(create_app(make_settings(), clock)) as client:
        ready = await wait_until(
            lambda: client.get("/readyz").status_code == 200 and client.get("/readyz"),
            what="readyz 200",
        )
        assert ready.json()["checks"] == {
            "database": True,
            "broker": True,
            "consumer": True,
            "events_consumer": True,
            "delivery_worker": True,
        }
        # Serving on the settled heap (shared.app.settled_heap), as the other services do.
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == YOUNG_GC_THRESHOLD

        # Only the gateway may call: the internal token is checked.
        assert client.get("/v1/webhooks", headers=headers(token=None)).status_code == 401
        assert client.get("/v1/webhooks", headers=headers(token="wrong")).status_code == 401
        assert (
            client.post(
                "/v1/webhooks", json={"url": "https://x.example"}, headers=headers(token=None)
            ).status_code
            == 401
        )

        # Bad input -> 422 naming the field.
        _field(client.post("/v1/webhooks", json={"url": "not a url"}, headers=headers()), "url")
        _field(
            client.post("/v1/webhooks", json={"url": "ftp://files.example/in"}, headers=headers()),
            "url",
        )
        _field(client.post("/v1/webhooks", json={}, headers=headers()), "url")
        for secret in ("abc", "whsec_%%%", "whsec_" + base64.b64encode(b"short").decode()):
            _field(
                client.post(
                    "/v1/webhooks",
                    json={"url": "https://x.example", "secret": secret},
                    headers=headers(),
                ),
                "secret",
            )
        _field(
            client.post(
                "/v1/webhooks",
                json={"url": "https://x.example", "event_types": ["order.created"]},
                headers=headers(),
            ),
            "event_types",
        )
        _field(
            client.post(
                "/v1/webhooks",
                json={"url": "https://x.example", "event_types": []},
                headers=headers(),
            ),
            "event_types",
        )
        _field(
            client.post(
                "/v1/webhooks",
                json={"url": "https://x.example", "colour": "red"},
                headers=headers(),
            ),
            "colour",
        )
        _field(client.get("/v1/deliveries?status=lost", headers=headers()), "status")
        _field(client.get("/v1/customers/c-1/decisions?limit=0", headers=headers()), "limit")

        # A generated secret, shown once; a given secret is kept as given.
        generated = client.post(
            "/v1/webhooks", json={"url": "https://crm.example/hooks"}, headers=headers()
        )
        assert generated.status_code == 201, generated.text
        body = generated.json()
        assert body["secret"].startswith("whsec_")
        assert len(base64.b64decode(body["secret"].removeprefix("whsec_"))) == 32
        assert body["event_types"] == ["offer.created"]
        assert body["active"] is True
        assert body["created_at"] == START.isoformat().replace("+00:00", "Z")
        given_secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
        given = client.post(
            "/v1/webhooks",
            json={"url": "http://127.0.0.1:9/in", "secret": given_secret},
            headers=headers(),
        )
        assert given.status_code == 201 and given.json()["secret"] == given_secret

        listed = client.get("/v1/webhooks", headers=headers()).json()
        assert sorted(w["id"] for w in listed) == sorted([body["id"], given.json()["id"]])
        assert all("secret" not in w for w in listed)
        assert given_secret not in client.get("/v1/webhooks", headers=headers()).text

        # Tenant isolation: the other tenant sees nothing and cannot delete or replay our ids.
        assert client.get("/v1/webhooks", headers=headers(OTHER_TENANT)).json() == []
        other = client.delete(f"/v1/webhooks/{body['id']}", headers=headers(OTHER_TENANT))
        assert other.status_code == 404
        assert body["id"] in other.json()["detail"]
        unknown = client.delete("/v1/webhooks/does-not-exist", headers=headers())
        assert unknown.status_code == 404 and "not found" in unknown.json()["detail"]
        assert client.post("/v1/deliveries/msg_nope/replay", headers=headers()).status_code == 404

        # Delete: gone from the list; a second delete is a 404.
        assert client.delete(f"/v1/webhooks/{body['id']}", headers=headers()).status_code == 204
        assert [w["id"] for w in client.get("/v1/webhooks", headers=headers()).json()] == [
            given.json()["id"]
        ]
        assert client.delete(f"/v1/webhooks/{body['id']}", headers=headers()).status_code == 404

        # Reads of unknown customers are empty lists, not errors.
        assert client.get("/v1/customers/nobody/offers", headers=headers()).json() == []
        assert client.get("/v1/customers/nobody/decisions", headers=headers()).json() == []
        assert client.get("/v1/deliveries", headers=headers()).json() == []

        metrics = client.get("/metrics").text
        assert "churnguard_actions_outbox_depth" in metrics
        assert "churnguard_actions_http_requests_total" in metrics
