"""The webhook subscription and deliveries API: secret rotation verified by the independent
`standardwebhooks` library, the SSRF guard at creation and at connect time (with the local-URL
development setting off), tenant isolation and bad inputs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from services.actions.app import create_app
from services.actions.config import ActionsSettings
from services.actions.webhooks import generate_secret
from shared.clock import ManualClock
from shared.db import make_engine
from shared.secret_box import TOKEN_PREFIX
from tests.actions.actions_support import OTHER_TENANT, START, headers, make_score, wait_until
from tests.actions.webhook_support import ScriptedReceiver, deliveries, subscribe, when


async def test_secret_rotation_signs_with_both_secrets_during_the_overlap_then_only_the_new(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
    database_url: str,
) -> None:
    old_secret = generate_secret()
    settings = make_settings(secret_rotation_overlap_s=3_600)
    with TestClient(create_app(settings, clock)) as client:
        subscription = subscribe(client, scripted.url(), secret=old_secret)
        await publish(make_score("s-1", "c-1", 0.9))
        await wait_until(lambda: len(scripted.requests()) == 1, what="before the rotation")

        rotated = client.post(
            f"/v1/webhooks/{subscription['id']}/rotate-secret", headers=headers()
        )
        assert rotated.status_code == 200, rotated.text
        new_secret = rotated.json()["secret"]
        assert new_secret.startswith("whsec_") and new_secret != old_secret
        assert when(rotated.json()["previous_secret_expires_at"]) == clock.now() + timedelta(hours=1)
        assert "secret" not in client.get("/v1/webhooks", headers=headers()).json()[0]
        # At rest both secrets are Fernet tokens, never the secret itself (shared.secret_box).
        engine = make_engine(database_url)
        with engine.connect() as connection:
            stored = [row[0] for table in ("actions_webhook_subscriptions", "actions_webhook_secrets")
                      for row in connection.exec_driver_sql(f"SELECT secret FROM {table}")]
        engine.dispose()
        assert len(stored) == 2 and all(value.startswith(TOKEN_PREFIX) for value in stored)
        assert not any(old_secret in value or new_secret in value for value in stored)

        await publish(make_score("s-2", "c-2", 0.9))
        await wait_until(lambda: len(scripted.requests()) == 2, what="during the overlap")
        # The worker books a delivery after the receiver answered: moving the clock an hour before
        # that would expire its lease and race the booking (the delivery is then sent again).
        await wait_until(lambda: len(deliveries(client, status="delivered")) == 2, what="both booked")
        clock.advance(timedelta(hours=1))  # the overlap ends
        await publish(make_score("s-3", "c-3", 0.9))
        await wait_until(lambda: len(scripted.requests()) == 3, what="after the overlap")

        before, during, after = scripted.requests()
        assert len(before.headers["webhook-signature"].split(" ")) == 1
        Webhook(old_secret).verify(before.body, before.headers)

        assert len(during.headers["webhook-signature"].split(" ")) == 2
        # a receiver still on the old secret and one already on the new both accept it
        assert Webhook(old_secret).verify(during.body, during.headers)["data"]["customer_id"] == "c-2"
        assert Webhook(new_secret).verify(during.body, during.headers)["data"]["customer_id"] == "c-2"

        assert len(after.headers["webhook-signature"].split(" ")) == 1
        Webhook(new_secret).verify(after.body, after.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(old_secret).verify(after.body, after.headers)

        # A chosen secret; bad ones and unknown ids are refused clearly.
        chosen = generate_secret()
        response = client.post(
            f"/v1/webhooks/{subscription['id']}/rotate-secret",
            json={"secret": chosen},
            headers=headers(),
        )
        assert response.status_code == 200 and response.json()["secret"] == chosen
        bad = client.post(
            f"/v1/webhooks/{subscription['id']}/rotate-secret",
            json={"secret": "not-a-secret"},
            headers=headers(),
        )
        assert bad.status_code == 422 and "whsec_" in bad.text
        same = client.post(
            f"/v1/webhooks/{subscription['id']}/rotate-secret",
            json={"secret": chosen},
            headers=headers(),
        )
        assert same.status_code == 422 and "must differ" in same.text
        assert client.post("/v1/webhooks/nope/rotate-secret", headers=headers()).status_code == 404
        other = client.post(
            f"/v1/webhooks/{subscription['id']}/rotate-secret", headers=headers(OTHER_TENANT)
        )
        assert other.status_code == 404


UNSAFE_URLS = [
    ("http://crm.example.com/hooks", "must use https"),
    ("https://localhost/hooks", "'localhost' resolves to 127.0.0.1; a loopback address"),
    ("https://127.0.0.1/hooks", "a loopback address"),
    ("https://[::1]/hooks", "a loopback address"),
    ("https://10.1.2.3/hooks", "a private address"),
    ("https://192.168.0.10/hooks", "a private address"),
    ("https://169.254.10.10/hooks", "a link-local address"),
    ("https://169.254.169.254/latest/meta-data", "a cloud metadata address"),
    ("https://[fd00:ec2::254]/", "a cloud metadata address"),
    ("https://[::ffff:10.0.0.1]/hooks", "a private address"),
    ("https://224.0.0.1/hooks", "a multicast address"),
    ("https://240.0.0.1/hooks", "a reserved address"),
    ("https://100.64.0.1/hooks", "not a public address"),
    ("https://0.0.0.0/hooks", "an unspecified address"),
    ("https://user:pw@8.8.8.8/hooks", "must not carry credentials"),
]


def test_unsafe_webhook_urls_are_refused_at_creation_naming_the_reason(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock
) -> None:
    with TestClient(create_app(make_settings(webhook_allow_local_urls=False), clock)) as client:
        for url, reason in UNSAFE_URLS:
            response = client.post("/v1/webhooks", json={"url": url}, headers=headers())
            assert response.status_code == 422, (url, response.text)
            [error] = response.json()["detail"]
            assert error["loc"] == ["body", "url"] and error["type"] == "unsafe_url"
            assert reason in error["msg"], (url, error["msg"])
        assert client.get("/v1/webhooks", headers=headers()).json() == []


def test_public_https_urls_are_accepted_and_metadata_is_refused_even_in_development(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock
) -> None:
    with TestClient(create_app(make_settings(webhook_allow_local_urls=False), clock)) as client:
        ok = client.post("/v1/webhooks", json={"url": "https://8.8.8.8/hooks"}, headers=headers())
        assert ok.status_code == 201, ok.text
    with TestClient(create_app(make_settings(webhook_allow_local_urls=True), clock)) as client:
        local = client.post(
            "/v1/webhooks", json={"url": "http://127.0.0.1:9/hooks"}, headers=headers()
        )
        assert local.status_code == 201
        metadata = client.post(
            "/v1/webhooks", json={"url": "http://169.254.169.254/"}, headers=headers()
        )
        assert metadata.status_code == 422 and "cloud metadata" in metadata.text


async def test_the_connect_time_guard_refuses_a_name_that_now_resolves_to_loopback(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    """Subscriptions made while local URLs were allowed (as a name that resolved elsewhere at
    creation would be after DNS rebinding) are refused before connecting once the setting is
    off: `localhost` resolves to 127.0.0.1, checked by the worker's own resolver."""
    development = make_settings(webhook_allow_local_urls=True)
    with TestClient(create_app(development, clock)) as client:
        by_name = subscribe(client, scripted.url(host="localhost", scheme="https"))
        by_address = subscribe(client, scripted.url(scheme="https"))
        plain_http = subscribe(client, scripted.url())

    production = development.model_copy(
        update={"webhook_allow_local_urls": False, "group_id": development.group_id + "-prod"}
    )
    with TestClient(create_app(production, clock)) as client:
        await publish(make_score("s-1", "c-1", 0.9))
        named = await wait_until(
            lambda: (
                (d := deliveries(client, subscription_id=by_name["id"]))
                and d[0]["attempt_log"]
                and d[0]
            ),
            what="attempt to the name booked",
        )
        assert named["status"] == "pending" and named["attempt_log"][0]["outcome"] == "error"
        assert "refused at connect time" in named["last_error"]
        assert "'localhost' -> 127.0.0.1 is a loopback address" in named["last_error"]
        literal = await wait_until(
            lambda: (
                (d := deliveries(client, subscription_id=by_address["id"]))
                and d[0]["attempt_log"]
                and d[0]
            ),
            what="attempt to the address booked",
        )
        assert "refused at connect time: 127.0.0.1 is a loopback address" in literal["last_error"]
        insecure = await wait_until(
            lambda: (
                (d := deliveries(client, subscription_id=plain_http["id"]))
                and d[0]["attempt_log"]
                and d[0]
            ),
            what="attempt over http booked",
        )
        assert "https only" in insecure["last_error"]
        assert scripted.requests() == []  # nothing reached the receiver


async def test_subscriptions_and_deliveries_are_tenant_isolated(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    scripted: ScriptedReceiver,
    publish: Callable[..., Any],
) -> None:
    with TestClient(create_app(make_settings(), clock)) as client:
        subscription = subscribe(client, scripted.url())
        await publish(make_score("s-1", "c-1", 0.9))
        [delivery] = await wait_until(
            lambda: deliveries(client, status="delivered"), what="delivered"
        )
        other = headers(OTHER_TENANT)
        sid, did = subscription["id"], delivery["delivery_id"]
        assert client.get("/v1/webhooks", headers=other).json() == []
        assert client.get(f"/v1/webhooks/{sid}", headers=other).status_code == 404
        assert client.delete(f"/v1/webhooks/{sid}", headers=other).status_code == 404
        assert client.post(f"/v1/webhooks/{sid}/rotate-secret", headers=other).status_code == 404
        assert deliveries(client, tenant=OTHER_TENANT) == []
        assert deliveries(client, tenant=OTHER_TENANT, subscription_id=sid) == []
        assert client.get(f"/v1/deliveries/{did}", headers=other).status_code == 404
        assert client.post(f"/v1/deliveries/{did}/replay", headers=other).status_code == 404
        everything = {
            "created_from": (START - timedelta(days=1)).isoformat(),
            "created_to": (START + timedelta(days=1)).isoformat(),
        }
        replayed = client.post("/v1/deliveries/replay", json=everything, headers=other).json()
        assert replayed == {"replayed": [], "skipped_inactive_subscription": []}

        # The owner sees it all, with filters.
        one = client.get(f"/v1/deliveries/{did}", headers=headers()).json()
        assert one["delivery_id"] == did and one["attempt_log"][0]["status_code"] == 200
        assert [d["delivery_id"] for d in deliveries(client, subscription_id=sid)] == [did]
        window = {"created_from": START.isoformat(), "created_to": (START + timedelta(seconds=1)).isoformat()}
        assert [d["delivery_id"] for d in deliveries(client, **window)] == [did]
        later = {"created_from": (START + timedelta(seconds=1)).isoformat()}
        assert deliveries(client, **later) == []


def _field_error(response: Any, field: str) -> str:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    matching = [e for e in errors if field in [str(p) for p in e["loc"]]]
    assert matching, errors
    return matching[0]["msg"]


def test_bad_inputs_get_clear_errors_and_unknown_ids_404(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock
) -> None:
    with TestClient(create_app(make_settings(), clock)) as client:
        post = lambda body: client.post("/v1/webhooks", json=body, headers=headers())  # noqa: E731
        assert "URL" in _field_error(post({"url": "not a url"}), "url")
        assert "scheme" in _field_error(post({"url": "ftp://example.com/x"}), "url")
        _field_error(post({"url": "https://8.8.8.8/", "event_types": ["offer.deleted"]}), "event_types")
        _field_error(post({"url": "https://8.8.8.8/", "event_types": []}), "event_types")
        _field_error(post({"url": "https://8.8.8.8/", "secret": "whsec_short"}), "secret")

        _field_error(client.get("/v1/deliveries?status=lost", headers=headers()), "status")
        _field_error(
            client.get("/v1/deliveries?created_from=2026-03-01T00:00:00", headers=headers()),
            "created_from",
        )  # no timezone
        assert "after" in _field_error(
            client.get(
                "/v1/deliveries",
                params={
                    "created_from": "2026-03-02T00:00:00Z",
                    "created_to": "2026-03-01T00:00:00Z",
                },
                headers=headers(),
            ),
            "created_to",
        )
        backwards = client.post(
            "/v1/deliveries/replay",
            json={"created_from": "2026-03-02T00:00:00Z", "created_to": "2026-03-01T00:00:00Z"},
            headers=headers(),
        )
        assert backwards.status_code == 422 and "created_to must be after created_from" in backwards.text
        _field_error(
            client.post("/v1/deliveries/replay", json={"created_from": "2026-03-01T00:00:00Z"}, headers=headers()),
            "created_to",
        )

        for method, path in (
            ("GET", "/v1/webhooks/nope"),
            ("DELETE", "/v1/webhooks/nope"),
            ("POST", "/v1/webhooks/nope/rotate-secret"),
            ("GET", "/v1/deliveries/nope"),
            ("POST", "/v1/deliveries/nope/replay"),
        ):
            response = client.request(method, path, headers=headers())
            assert response.status_code == 404, (method, path)
            assert "nope" in response.json()["detail"]
