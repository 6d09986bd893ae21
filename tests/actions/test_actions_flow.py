"""Scores on the real broker -> decisions, offers, signed webhooks to a real HTTP receiver,
ActionRecords on retention-actions; redelivery, cooldown, tenant isolation, dead letters."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from standardwebhooks import Webhook

from services.actions.app import create_app
from services.actions.config import ActionsSettings
from shared.clock import ManualClock
from shared.events import ActionRecord
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, RETENTION_ACTIONS, dead_letter
from tests.actions.actions_support import (
    OTHER_TENANT,
    Receiver,
    headers,
    make_score,
    read_partitions,
    wait_until,
)


def _decisions(
    client: TestClient, customer: str, tenant: str | None = None
) -> list[dict[str, Any]]:
    return client.get(
        f"/v1/customers/{customer}/decisions", headers=headers(*(tenant,) if tenant else ())
    ).json()


def _offers(client: TestClient, customer: str, tenant: str | None = None) -> list[dict[str, Any]]:
    return client.get(
        f"/v1/customers/{customer}/offers", headers=headers(*(tenant,) if tenant else ())
    ).json()


def _delivered(client: TestClient) -> list[dict[str, Any]]:
    return client.get("/v1/deliveries?status=delivered", headers=headers()).json()


async def test_high_score_gets_one_signed_offer_low_none_redelivery_and_cooldown_respected(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    receiver: Receiver,
    publish: Callable[..., Any],
    kafka_settings: KafkaSettings,
) -> None:
    with TestClient(create_app(make_settings(), clock)) as client:
        created = client.post(
            "/v1/webhooks", json={"url": receiver.url("/hooks/a")}, headers=headers()
        )
        assert created.status_code == 201, created.text
        secret = created.json()["secret"]
        # Another tenant's endpoint must never hear about tenant A's customers.
        assert (
            client.post(
                "/v1/webhooks",
                json={"url": receiver.url("/hooks/b")},
                headers=headers(OTHER_TENANT),
            ).status_code
            == 201
        )

        first = make_score("s-1", "c-1", 0.91, reasons=["no order for 74 days", "last NPS 2 of 10"])
        await publish(first)
        [delivery] = await wait_until(lambda: _delivered(client), what="first offer delivered")
        [request] = receiver.received("/hooks/a")
        payload = Webhook(secret).verify(request.body, request.headers)
        [offer] = _offers(client, "c-1")
        assert payload == {
            "type": "offer.created",
            "timestamp": clock.now().isoformat(),
            "data": {
                "offer_id": offer["offer_id"],
                "customer_id": "c-1",
                "kind": "discount",
                "discount_percent": 15,
                "valid_until": (clock.now() + timedelta(days=14)).isoformat(),
                "policy": "high-risk-discount",
                "churn_probability": 0.91,
                "band": "high",
                "model_version": "m-test-1",
                # copied from the ScoreRecord, so the marketing tool can personalise the offer
                "reasons": ["no order for 74 days", "last NPS 2 of 10"],
                "trigger": "score",
                "service": False,
                "offer": {
                    "kind": "discount",
                    "currency": "EUR",
                    "service": False,
                    "validity_days": 14,
                    "discount_percent": 15,
                },
            },
        }
        assert request.headers["webhook-id"] == delivery["delivery_id"]
        assert request.headers["content-type"] == "application/json"
        assert delivery["attempts"] == 1 and delivery["last_status_code"] == 200
        assert offer["score_id"] == "s-1" and offer["policy"] == "high-risk-discount"
        assert secret not in request.body.decode() and "tenant" not in request.body.decode()

        # A low score, the same high score again (redelivery), then a second high score for c-1
        # within the cooldown. Same key -> same partition -> handled in this order.
        await publish(make_score("s-2", "c-2", 0.2), first, make_score("s-3", "c-1", 0.97))
        await wait_until(
            lambda: len(_decisions(client, "c-1")) == 2 and _decisions(client, "c-2"),
            what="decisions for s-2 and s-3",
        )
        [low] = _decisions(client, "c-2")
        assert (low["outcome"], low["reason"], low["offer_id"]) == (
            "suppressed",
            "no_match",
            None,
        )
        assert _offers(client, "c-2") == []
        # (Both were decided at the same frozen instant, so compare by score, not by position.)
        by_score = {d["score_id"]: d for d in _decisions(client, "c-1")}
        assert (by_score["s-1"]["outcome"], by_score["s-1"]["reason"]) == (
            "offer_created",
            "matched",
        )
        assert by_score["s-1"]["offer_id"] == offer["offer_id"]
        assert (
            by_score["s-3"]["outcome"],
            by_score["s-3"]["reason"],
            by_score["s-3"]["offer_id"],
        ) == ("suppressed", "cooldown", None)
        assert len(_offers(client, "c-1")) == 1  # the redelivered s-1 created nothing

        # Past the cooldown (domain time, not sleeping) a new high score gets a new offer.
        clock.advance(timedelta(days=30, seconds=1))
        await publish(make_score("s-4", "c-1", 0.88))
        await wait_until(lambda: len(_delivered(client)) == 2, what="second offer delivered")
        newest, _ = _offers(client, "c-1")
        assert newest["score_id"] == "s-4"
        assert newest["created_at"] == clock.now().isoformat().replace("+00:00", "Z")

        received = receiver.received("/hooks/a")
        assert (
            len(received) == 2
        )  # exactly one per offer: nothing for the low score or the redelivery
        offers_sent = [
            Webhook(secret).verify(r.body, r.headers)["data"]["offer_id"] for r in received
        ]
        assert offers_sent == [offer["offer_id"], newest["offer_id"]]
        assert len({r.headers["webhook-id"] for r in received}) == 2
        assert receiver.received("/hooks/b") == []
        assert _offers(client, "c-1", OTHER_TENANT) == []
        assert _decisions(client, "c-1", OTHER_TENANT) == []

    # One ActionRecord per decision on retention-actions (the redelivery may re-publish s-1's,
    # with the same decision id, which is what consumers dedup on).
    records = [
        ActionRecord.model_validate_json(r.value)
        for r in await read_partitions(kafka_settings, RETENTION_ACTIONS, 4)
    ]
    by_score = {r.score_id: r for r in records}
    assert {s: (r.outcome, r.reason) for s, r in by_score.items()} == {
        "s-1": ("offer_created", "matched"),
        "s-2": ("suppressed", "no_match"),
        "s-3": ("suppressed", "cooldown"),
        "s-4": ("offer_created", "matched"),
    }
    assert len({r.decision_id for r in records}) == 4
    assert by_score["s-1"].offer_id == offer["offer_id"]


async def test_undecodable_score_goes_to_the_dead_letter_topic_and_the_next_is_handled(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    publish: Callable[..., Any],
    kafka_settings: KafkaSettings,
) -> None:
    def dead_letters() -> float:
        return (
            REGISTRY.get_sample_value(
                "churnguard_actions_dead_letters_total", {"reason": "undecodable"}
            )
            or 0.0
        )

    before = dead_letters()
    good = make_score("s-ok", "c-9", 0.95)
    invalid = json.loads(good.model_dump_json()) | {"probability": 1.7}
    with TestClient(create_app(make_settings(), clock)) as client:
        await publish((good.key, b"\xff not json"), (good.key, json.dumps(invalid).encode()), good)
        [decision] = await wait_until(
            lambda: _decisions(client, "c-9"), what="the good score decided"
        )
        assert decision["score_id"] == "s-ok" and decision["outcome"] == "offer_created"

    dead = await read_partitions(kafka_settings, dead_letter(CHURN_SCORES), 2)
    reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
    assert len(reasons) == 2 and all(r.startswith("undecodable:") for r in reasons)
    assert any("probability" in r for r in reasons)
    assert dead_letters() - before == 2
