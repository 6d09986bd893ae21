"""Webhook delivery against a real HTTP receiver: retry with backoff (moved by the ManualClock,
never slept), the same webhook-id on every attempt, parking after the schedule, replay,
network errors, deleted subscriptions."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from services.actions.app import create_app
from services.actions.config import ActionsSettings
from shared.broker import free_port
from shared.clock import ManualClock
from tests.actions.actions_support import OTHER_TENANT, Receiver, headers, make_score, wait_until


def _deliveries(client: TestClient, status: str | None = None) -> list[dict[str, Any]]:
    query = f"?status={status}" if status else ""
    return client.get(f"/v1/deliveries{query}", headers=headers()).json()


def _one(client: TestClient, subscription_id: str) -> dict[str, Any]:
    [delivery] = [d for d in _deliveries(client) if d["subscription_id"] == subscription_id]
    return delivery


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _attempts(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("churnguard_actions_webhook_attempts_total", {"outcome": outcome})
        or 0.0
    )


async def test_failed_delivery_is_retried_after_the_backoff_with_the_same_webhook_id(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    receiver: Receiver,
    publish: Callable[..., Any],
) -> None:
    receiver.statuses = [500]  # then 200
    with TestClient(create_app(make_settings(), clock)) as client:
        subscription = client.post(
            "/v1/webhooks", json={"url": receiver.url()}, headers=headers()
        ).json()
        # A second endpoint where nothing listens: a network error, retried the same way.
        dead = client.post(
            "/v1/webhooks", json={"url": f"http://127.0.0.1:{free_port()}/gone"}, headers=headers()
        ).json()
        failed_before, errors_before = _attempts("failed"), _attempts("error")
        await publish(make_score("s-1", "c-1", 0.9))

        first = await wait_until(
            lambda: (
                (d := _one(client, subscription["id"]) if _deliveries(client) else None)
                and d["attempts"] == 1
                and d
            ),
            what="first attempt booked",
        )
        assert first["status"] == "pending"
        assert first["last_status_code"] == 500
        assert "HTTP 500" in first["last_error"]
        assert _when(first["next_attempt_at"]) == clock.now() + timedelta(seconds=5)
        unreachable = await wait_until(
            lambda: _one(client, dead["id"])["attempts"] == 1 and _one(client, dead["id"]),
            what="unreachable attempt booked",
        )
        assert unreachable["status"] == "pending" and unreachable["last_status_code"] is None
        assert "cannot connect to 127.0.0.1:" in unreachable["last_error"]
        assert _attempts("failed") - failed_before == 1 and _attempts("error") - errors_before == 1
        assert len(receiver.received()) == 1

        # Not due yet: nothing happens until the clock passes the backoff.
        clock.advance(timedelta(seconds=5))
        delivered = await wait_until(
            lambda: (
                _one(client, subscription["id"])["status"] == "delivered"
                and _one(client, subscription["id"])
            ),
            what="retry delivered",
        )
        assert delivered["attempts"] == 2 and delivered["last_status_code"] == 200
        assert delivered["last_error"] is None
        assert _when(delivered["delivered_at"]) == clock.now()

        requests = receiver.received()
        assert [r.status for r in requests] == [500, 200]
        assert {r.headers["webhook-id"] for r in requests} == {delivered["delivery_id"]}
        assert requests[0].body == requests[1].body
        for r in requests:
            Webhook(subscription["secret"]).verify(r.body, r.headers)

        # The unreachable endpoint failed again and waits for the next step of the schedule.
        second = await wait_until(
            lambda: _one(client, dead["id"])["attempts"] == 2 and _one(client, dead["id"]),
            what="second unreachable attempt",
        )
        assert _when(second["next_attempt_at"]) == clock.now() + timedelta(minutes=5)

        # Deleting its subscription parks what is pending; it cannot be replayed any more.
        assert client.delete(f"/v1/webhooks/{dead['id']}", headers=headers()).status_code == 204
        parked = _one(client, dead["id"])
        assert parked["status"] == "parked" and parked["last_error"] == "subscription deleted"
        replay = client.post(f"/v1/deliveries/{parked['delivery_id']}/replay", headers=headers())
        assert replay.status_code == 409 and "deleted" in replay.json()["detail"]
        done = client.post(f"/v1/deliveries/{delivered['delivery_id']}/replay", headers=headers())
        assert done.status_code == 409 and "already delivered" in done.json()["detail"]


async def test_exhausted_schedule_parks_the_delivery_and_replay_delivers_it(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    receiver: Receiver,
    publish: Callable[..., Any],
) -> None:
    receiver.default_status = 503
    with TestClient(create_app(make_settings(retry_schedule_s=[1, 2]), clock)) as client:
        subscription = client.post(
            "/v1/webhooks", json={"url": receiver.url()}, headers=headers()
        ).json()
        parked_before = _attempts("parked")
        await publish(make_score("s-1", "c-1", 0.9))

        for attempt, backoff in ((1, 1), (2, 2)):
            pending = await wait_until(
                lambda n=attempt: (d := _deliveries(client)) and d[0]["attempts"] == n and d[0],
                what=f"attempt {attempt} booked",
            )
            assert pending["status"] == "pending"
            assert _when(pending["next_attempt_at"]) == clock.now() + timedelta(seconds=backoff)
            clock.advance(timedelta(seconds=backoff))

        parked = await wait_until(lambda: _deliveries(client, "parked"), what="delivery parked")
        [delivery] = parked
        assert delivery["attempts"] == 3
        assert "retry schedule exhausted after 3 attempts" in delivery["last_error"]
        assert "HTTP 503" in delivery["last_error"]
        assert _deliveries(client, "pending") == []
        assert _attempts("parked") - parked_before == 1
        await wait_until(
            lambda: "churnguard_actions_parked_deliveries 1.0" in client.get("/metrics").text,
            what="parked gauge",
        )

        # Another tenant cannot replay it; the owner can, and it goes out at once.
        assert (
            client.post(
                f"/v1/deliveries/{delivery['delivery_id']}/replay", headers=headers(OTHER_TENANT)
            ).status_code
            == 404
        )
        receiver.default_status = 204
        replayed = client.post(
            f"/v1/deliveries/{delivery['delivery_id']}/replay", headers=headers()
        )
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["status"] == "pending" and replayed.json()["attempts"] == 0
        assert _when(replayed.json()["next_attempt_at"]) == clock.now()
        [done] = await wait_until(lambda: _deliveries(client, "delivered"), what="replay delivered")
        assert done["last_status_code"] == 204

        requests = receiver.received()
        assert [r.status for r in requests] == [503, 503, 503, 204]
        assert {r.headers["webhook-id"] for r in requests} == {delivery["delivery_id"]}
        Webhook(subscription["secret"]).verify(requests[-1].body, requests[-1].headers)
