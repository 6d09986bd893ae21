"""Pure logic of the actions service: the threshold/cooldown policy, the retry schedule,
webhook secrets, the webhook body and its signature."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest
from standardwebhooks import Webhook

from services.actions.config import DEFAULT_RETRY_SCHEDULE_S, ActionsSettings
from services.actions.delivery import signed_headers
from services.actions.service import (
    AttemptResult,
    ClaimedDelivery,
    check_secret,
    generate_secret,
    offer_payload,
    retry_delay,
)
from services.actions.tables import ActionsOffer
from shared.clock import ManualClock, SystemClock

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)


def test_retry_schedule_follows_the_standard_webhooks_backoff_for_more_than_a_day() -> None:
    delays = [retry_delay(n, DEFAULT_RETRY_SCHEDULE_S) for n in range(1, 9)]
    assert delays[:7] == [timedelta(seconds=s) for s in (5, 300, 1800, 7200, 18000, 36000, 36000)]
    assert delays[7] is None  # the 8th failed attempt parks the delivery
    assert sum(DEFAULT_RETRY_SCHEDULE_S) > 24 * 3600
    assert ActionsSettings().retry_schedule_s == DEFAULT_RETRY_SCHEDULE_S
    with pytest.raises(ValueError):
        retry_delay(0, DEFAULT_RETRY_SCHEDULE_S)


def test_settings_reject_a_bad_retry_schedule_and_holdout() -> None:
    with pytest.raises(ValueError, match="retry_schedule_s"):
        ActionsSettings(retry_schedule_s=[])
    with pytest.raises(ValueError, match="retry_schedule_s"):
        ActionsSettings(retry_schedule_s=[5, -1])
    with pytest.raises(ValueError, match="holdout_percent"):
        ActionsSettings(holdout_percent=150)


def test_attempt_result_is_ok_only_for_2xx() -> None:
    assert AttemptResult(status_code=204).ok
    assert not AttemptResult(status_code=302).ok
    assert not AttemptResult(status_code=500).ok
    assert not AttemptResult(error="ConnectError").ok


def test_generated_secrets_are_valid_and_distinct() -> None:
    first, second = generate_secret(), generate_secret()
    assert first != second
    assert check_secret(first) == first
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("abc", "must start with 'whsec_'"),
        ("whsec_", "base64"),
        ("whsec_!!!notbase64!!!", "base64"),
        ("whsec_" + base64.b64encode(b"x" * 16).decode(), "24 to 64 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24 to 64 bytes"),
    ],
)
def test_malformed_secrets_are_rejected(secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_secret(secret)


def _offer() -> ActionsOffer:
    return ActionsOffer(
        offer_id="o-1",
        tenant_id="tenant-secret-name",
        customer_id="c-1",
        policy="high-risk-discount",
        kind="discount",
        discount_percent=15,
        valid_until=NOW + timedelta(days=14),
        churn_probability=0.9,
        band="high",
        model_version="m-1",
        score_id="s-1",
        created_at=NOW,
    )


def test_webhook_body_carries_the_offer_and_not_the_tenant() -> None:
    body = json.loads(offer_payload(_offer()))
    assert body["type"] == "offer.created"
    assert body["timestamp"] == NOW.isoformat()
    assert body["data"] == {
        "offer_id": "o-1",
        "customer_id": "c-1",
        "kind": "discount",
        "discount_percent": 15,
        "valid_until": (NOW + timedelta(days=14)).isoformat(),
        "policy": "high-risk-discount",
        "churn_probability": 0.9,
        "band": "high",
        "model_version": "m-1",
        "reasons": [],
        "trigger": "score",
        "service": False,
        "offer": {},
    }
    assert "tenant-secret-name" not in offer_payload(_offer())
    with_reasons = json.loads(offer_payload(_offer(), ["2 complaints in the last 90 days"]))
    assert with_reasons["data"]["reasons"] == ["2 complaints in the last 90 days"]


def test_signed_headers_verify_with_standardwebhooks_and_use_the_wall_clock() -> None:
    secret = generate_secret()
    claimed = ClaimedDelivery(
        "msg_1", "http://example.invalid/", secret, offer_payload(_offer()), 0
    )
    sent = signed_headers(claimed, SystemClock())
    assert sent["webhook-id"] == "msg_1"
    assert Webhook(secret).verify(claimed.payload, sent)["data"]["offer_id"] == "o-1"
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(generate_secret()).verify(claimed.payload, sent)
    # A timestamp far from the receiver's clock is rejected, so signing must not use domain time.
    stale = signed_headers(claimed, ManualClock(datetime(2020, 1, 1, tzinfo=timezone.utc)))
    with pytest.raises(Exception, match="too old"):
        Webhook(secret).verify(claimed.payload, stale)
