"""Tenant isolation through the public API, on real processes: tenant A builds up data in every
service (events, scores, decisions, offers, a webhook subscription and its deliveries, a policy
document, an erasure); tenant B then tries every read and write endpoint with A's ids. B always
gets 404 or its own empty answer, never A's data, and nothing of A changes."""

from __future__ import annotations

import httpx
import pytest

from services.gateway import manage as gateway_ops
from services.gateway import service as gateway_service
from shared.db import make_engine, session_scope
from tests.e2e.test_pipeline import Receiver, Stack, _event, _score, churner_history, e2e_model, receiver, stack  # noqa: F401
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

A_POLICIES = {
    "customer_cooldown_days": 30,
    "offers": {"a-discount": {"kind": "discount", "discount_percent": 15, "validity_days": 14, "cost": 8.0}},
    "policies": [{"name": "a-only-policy", "priority": 1, "triggers": ["score"], "when": {"score": {"min": 0.5}},
                  "offer": "a-discount", "cooldown_days": 30}],
}


def test_another_tenant_sees_and_changes_nothing_of_a_tenant(
    stack: Stack, receiver: Receiver, database_url: str  # noqa: F811
) -> None:
    a = httpx.Client(base_url=stack.gateway, headers=stack.headers(), timeout=15)
    b_tenant, b_key = gateway_ops.create_tenant(database_url, "tenant-b")
    b = httpx.Client(base_url=stack.gateway, headers={"Authorization": f"Bearer {b_key}"}, timeout=15)

    # Tenant A: a policy document, a subscription, a churner with consent, an offer delivered,
    # and an erased customer.
    assert a.put("/v1/policies", json=A_POLICIES).status_code == 200
    subscription = a.post("/v1/webhooks", json={"url": receiver.url}).json()
    churner = "c-isolated"
    consent = _event(churner, 99, "customer.consent_changed", 360, {"marketing": True})
    assert a.post("/v1/events", json=consent).status_code == 202
    wait_until(lambda: a.get(f"/v1/customers/{churner}/state").json().get("marketing_consent"), timeout_s=30)
    history = churner_history(churner)
    assert a.post("/v1/events/batch", json={"events": history}).json()["accepted"] == len(history)
    wait_until(lambda: _score(a, churner, history), timeout_s=60)
    offers = wait_until(lambda: a.get(f"/v1/customers/{churner}/offers").json(), timeout_s=60, what="an offer")
    wait_until(lambda: receiver.received, timeout_s=30, what="the webhook")
    delivery = a.get("/v1/deliveries").json()[0]
    gone = "c-gone"
    assert a.post("/v1/events", json=_event(gone, 1, "session.recorded", 1, {"duration_seconds": 5})).status_code == 202
    erasure = a.delete(f"/v1/customers/{gone}").json()
    a_before = {
        "score": a.get(f"/v1/customers/{churner}/score").json(),
        "offers": offers,
        "decisions": a.get(f"/v1/customers/{churner}/decisions").json(),
        "subscription": a.get(f"/v1/webhooks/{subscription['id']}").json(),
        "delivery": a.get(f"/v1/deliveries/{delivery['delivery_id']}").json(),
        "policies": a.get("/v1/policies").json(),
    }
    assert a_before["policies"]["source"] == "tenant" and a_before["delivery"]["status"] == "delivered"

    # Tenant B, with A's ids: 404 for anything that names one of A's objects ...
    not_found = [
        ("GET", f"/v1/customers/{churner}/score"),
        ("GET", f"/v1/customers/{churner}/export"),
        ("GET", f"/v1/customers/{churner}/erasure"),
        ("GET", f"/v1/erasures/{erasure['erasure_id']}"),
        ("GET", f"/v1/webhooks/{subscription['id']}"),
        ("DELETE", f"/v1/webhooks/{subscription['id']}"),
        ("POST", f"/v1/webhooks/{subscription['id']}/rotate-secret"),
        ("GET", f"/v1/deliveries/{delivery['delivery_id']}"),
        ("POST", f"/v1/deliveries/{delivery['delivery_id']}/replay"),
        ("GET", "/v1/policies/a-only-policy"),
        ("DELETE", "/v1/policies/a-only-policy"),
    ]
    for method, path in not_found:
        response = b.request(method, path)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert set(response.json()) == {"detail"} and receiver.url not in response.text  # an error, no data

    # ... and its own, empty answers where a list or a state is asked for.
    assert b.get(f"/v1/customers/{churner}/offers").json() == []
    assert b.get(f"/v1/customers/{churner}/decisions").json() == []
    assert b.get(f"/v1/customers/{churner}/state").json()["known"] is False
    assert b.get("/v1/webhooks").json() == []
    assert b.get("/v1/deliveries").json() == []
    replayed = b.post("/v1/deliveries/replay", json={"created_from": "2000-01-01T00:00:00Z",
                                                     "created_to": "2100-01-01T00:00:00Z"}).json()
    assert replayed["replayed"] == []
    assert b.get("/v1/policies").json()["source"] == "default"
    assert all(g["treated_customers"] == 0 == g["control_customers"]
               for g in b.get("/v1/reports/uplift").json()["groups"])
    # B's own writes with A's ids touch only B: an "erasure" of A's customer id, a policy document.
    assert b.delete(f"/v1/customers/{churner}").status_code == 202
    assert b.put("/v1/policies", json={**A_POLICIES, "policies": []}).status_code == 200

    # Nothing of A changed.
    wait_until(lambda: b.get(f"/v1/customers/{churner}/erasure").json().get("status") == "done", timeout_s=60,
               what="B's erasure of its own (non-existent) customer processed")
    assert a.get(f"/v1/customers/{churner}/score").json() == a_before["score"]
    assert a.get(f"/v1/customers/{churner}/offers").json() == a_before["offers"]
    assert a.get(f"/v1/customers/{churner}/decisions").json() == a_before["decisions"]
    assert a.get(f"/v1/webhooks/{subscription['id']}").json() == a_before["subscription"]
    assert a.get(f"/v1/deliveries/{delivery['delivery_id']}").json() == a_before["delivery"]
    assert a.get("/v1/policies").json() == a_before["policies"]
    assert a.get(f"/v1/customers/{churner}/export").status_code == 200

    # Every administrative change made through the gateway is in its audit log, with who and for
    # which tenant: A's policy document, subscription and erasure; B's erasure and document.
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            entries = [(e.tenant_id, e.action, e.actor) for e in gateway_service.audit_log(session, limit=100)]
    finally:
        engine.dispose()
    a_actions = {action for tenant, action, _ in entries if tenant != b_tenant}
    assert {"PUT /v1/policies", "POST /v1/webhooks", "DELETE /v1/customers/{customer_id}"} <= a_actions, entries
    # B's refused attempts (404) changed nothing and are not entries; its range replay (of
    # nothing) is, like any replay.
    assert {action for tenant, action, _ in entries if tenant == b_tenant} == {
        "DELETE /v1/customers/{customer_id}", "PUT /v1/policies", "POST /v1/deliveries"}, entries
    assert all(actor.startswith("k_") for _, _, actor in entries)
