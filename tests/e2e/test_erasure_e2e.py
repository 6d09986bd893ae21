"""Erasure end to end on real processes (broker, four services, a webhook receiver): the churner
gets an offer, is erased through the gateway, each service reports done, and afterwards nothing
about them is served but the erasure record."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.test_pipeline import Receiver, Stack, _event, _score, churner_history, e2e_model, receiver, stack  # noqa: F401
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e


def test_the_churner_is_erased_in_every_service_after_the_offer(stack: Stack, receiver: Receiver) -> None:  # noqa: F811
    client = httpx.Client(base_url=stack.gateway, headers=stack.headers(), timeout=15)
    assert client.post("/v1/webhooks", json={"url": receiver.url}).status_code == 201
    churner = "c-erase-me"
    consent = _event(churner, 99, "customer.consent_changed", 360, {"marketing": True})
    assert client.post("/v1/events", json=consent).status_code == 202
    wait_until(lambda: client.get(f"/v1/customers/{churner}/state").json().get("marketing_consent"), timeout_s=30)
    history = churner_history(churner)
    assert client.post("/v1/events/batch", json={"events": history}).json()["accepted"] == len(history)
    wait_until(lambda: _score(client, churner, history), timeout_s=60)
    wait_until(lambda: client.get(f"/v1/customers/{churner}/offers").json(), timeout_s=60, what="an offer")
    wait_until(lambda: receiver.received, timeout_s=30, what="the webhook")
    before = client.get(f"/v1/customers/{churner}/export")
    assert before.status_code == 200 and before.json()["scoring"]["events"] and before.json()["actions"]["offers"]

    erased = client.delete(f"/v1/customers/{churner}")
    assert erased.status_code == 202, erased.text
    assert erased.json()["requested_by"].startswith("k_")  # the gateway names the key that asked
    status_url = erased.json()["status_url"]
    done = wait_until(lambda: (r := client.get(status_url).json())["status"] == "done" and r, timeout_s=60,
                      what="every service done")
    assert {name: s["status"] for name, s in done["services"].items()} == {
        "ingest": "done", "scoring": "done", "actions": "done"}

    assert client.get(f"/v1/customers/{churner}/score").status_code == 404
    assert client.get(f"/v1/customers/{churner}/offers").json() == []
    assert client.get(f"/v1/customers/{churner}/decisions").json() == []
    assert client.get(f"/v1/customers/{churner}/state").json()["known"] is False
    after = client.get(f"/v1/customers/{churner}/export").json()
    assert after["ingest"]["erasure"]["erasure_id"] == erased.json()["erasure_id"]
    assert after["scoring"]["events"] == [] and after["actions"]["offers"] == []
    late = client.post("/v1/events", json=_event(churner, 100, "order.completed", 0,
                                                 {"order_id": "o-late", "amount": "1.00", "currency": "EUR"}))
    assert late.status_code == 202 and late.json()["suppressed"] == 1
    assert "churnguard_ingest_events_suppressed_total 1.0" in stack.metrics("ingest")
    assert "churnguard_ingest_erasures_completed_total 1.0" in stack.metrics("ingest")
