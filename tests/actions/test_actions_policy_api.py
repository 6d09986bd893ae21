"""The policy API, customer events through the real broker, per-customer decisions with their
reasons (tenant-isolated), signed webhooks for event-triggered policies, the uplift report over
HTTP, and the new metrics on a real /metrics scrape."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from services.actions.app import create_app
from services.actions.config import ActionsSettings
from services.actions.tables import (
    ActionsActivityDay,
    ActionsContract,
    ActionsDecision,
    ActionsOfferResponse,
)
from services.actions.uplift import newcombe_difference
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.events import ActionRecord, EventRecord, parse_event
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS, RETENTION_ACTIONS
from tests.actions.actions_support import (
    OTHER_TENANT,
    TENANT,
    Receiver,
    headers,
    make_score,
    read_partitions,
    wait_until,
)


def _detail(response: Any) -> str:
    assert response.status_code == 422, response.text
    return json.dumps(response.json()["detail"])


async def test_policy_api_crud_validation_and_tenant_isolation(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock, publish: Callable[..., Any]
) -> None:
    with TestClient(create_app(make_settings(), clock)) as client:
        assert client.get("/v1/policies", headers=headers(token=None)).status_code == 401
        default = client.get("/v1/policies", headers=headers()).json()
        assert default["source"] == "default"
        names = [p["name"] for p in default["document"]["policies"]]
        assert names[0] == "high-risk-discount" and "win-back" in names

        # Whole-document validation: the path of the bad field and the reason.
        bad = json.loads(json.dumps(default["document"]))
        bad["policies"][0]["offer"] = "no-such-offer"
        detail = _detail(client.put("/v1/policies", json=bad, headers=headers()))
        assert "policies[0].offer: 'no-such-offer' is not in the offers catalog" in detail
        bad = json.loads(json.dumps(default["document"]))
        bad["offers"]["discount-15"]["discount_percent"] = 150
        detail = _detail(client.put("/v1/policies", json=bad, headers=headers()))
        assert '"offers", "discount-15", "discount_percent"' in detail

        vip = {"name": "vip-call", "priority": 50, "offer": "renewal-call",
               "when": {"segments": ["business"], "customer_value": {"min": 1000}},
               "value_gate": {"expected_uplift": 0.1}}
        assert "must equal the path" in _detail(
            client.put("/v1/policies/other-name", json=vip, headers=headers())
        )
        assert "not in the offers catalog" in _detail(
            client.put("/v1/policies/vip-call", json=vip | {"offer": "nope"}, headers=headers())
        )
        assert "priority 50" not in json.dumps(default)  # (the clash below is ours)
        clash = vip | {"priority": 100}
        assert "priority 100 is used twice" in _detail(
            client.put("/v1/policies/vip-call", json=clash, headers=headers())
        )
        assert '"when", "segments"' in _detail(client.put(
            "/v1/policies/vip-call", json=vip | {"when": {"segments": []}}, headers=headers()
        ))
        # Nothing invalid was stored.
        assert client.get("/v1/policies", headers=headers()).json()["source"] == "default"

        created = client.put("/v1/policies/vip-call", json=vip, headers=headers())
        assert created.status_code == 200, created.text
        mine = client.get("/v1/policies", headers=headers()).json()
        assert mine["source"] == "tenant"
        assert [p["name"] for p in mine["document"]["policies"]] == names + ["vip-call"]
        assert client.get("/v1/policies/vip-call", headers=headers()).json()["priority"] == 50
        # The other tenant still has the default and cannot see or delete ours.
        assert client.get("/v1/policies", headers=headers(OTHER_TENANT)).json()["source"] == "default"
        assert client.get("/v1/policies/vip-call", headers=headers(OTHER_TENANT)).status_code == 404
        assert client.delete("/v1/policies/vip-call", headers=headers(OTHER_TENANT)).status_code == 404

        assert client.delete("/v1/policies/vip-call", headers=headers()).status_code == 204
        assert client.delete("/v1/policies/vip-call", headers=headers()).status_code == 404
        assert client.get("/v1/policies/nope", headers=headers()).status_code == 404

        document = {"offers": {"survey": {"kind": "feedback_survey", "service": True}},
                    "policies": [{"name": "ask", "priority": 1, "offer": "survey",
                                  "triggers": ["feedback"], "when": {"max_csat": 2}}]}
        replaced = client.put("/v1/policies", json=document, headers=headers())
        assert replaced.status_code == 200 and replaced.json()["source"] == "tenant"
        assert [p["name"] for p in client.get("/v1/policies", headers=headers()).json()
                ["document"]["policies"]] == ["ask"]
        assert client.delete("/v1/policies", headers=headers()).status_code == 204
        assert client.get("/v1/policies", headers=headers()).json()["source"] == "default"
        assert client.delete("/v1/policies", headers=headers()).status_code == 404

        # A tenant's document decides for it at once (the decision cache is invalidated), and
        # only for it: the other tenant's equal score still goes by the default file.
        await publish(make_score("s-warm", "c-warm", 0.2))  # caches "default" for the tenant
        await wait_until(lambda: client.get("/v1/customers/c-warm/decisions",
                                            headers=headers()).json(), what="warm-up decision")
        everyone = {"offers": {"ship": {"kind": "free_shipping", "cost": 4.9}},
                    "policies": [{"name": "everyone", "priority": 1, "offer": "ship",
                                  "when": {"score": {"min": 0.1}}}]}
        assert client.put("/v1/policies", json=everyone, headers=headers()).status_code == 200
        await publish(make_score("s-a", "c-1", 0.2), make_score("s-b", "c-1", 0.2, OTHER_TENANT))
        mine_decided = await wait_until(
            lambda: client.get("/v1/customers/c-1/decisions", headers=headers()).json(),
            what="tenant's decision")
        theirs = await wait_until(
            lambda: client.get("/v1/customers/c-1/decisions", headers=headers(OTHER_TENANT)).json(),
            what="other tenant's decision")
        assert [(d["policy"], d["reason"], d["offer_kind"]) for d in mine_decided] == [
            ("everyone", "matched", "free_shipping")
        ]
        assert [(d["policy"], d["reason"]) for d in theirs] == [(None, "no_match")]


def _event_record(tenant: str, customer: str, type_: str, data: dict[str, Any], at: Any,
                  event_id: str) -> EventRecord:
    return EventRecord(
        tenant_id=tenant, received_at=at,
        event=parse_event({"id": event_id, "type": type_, "customer_id": customer,
                           "occurred_at": at.isoformat(), "data": data}),
    )


async def test_customer_events_and_scores_decide_with_reasons_and_webhooks(
    make_settings: Callable[..., ActionsSettings],
    clock: ManualClock,
    receiver: Receiver,
    publish: Callable[..., Any],
    kafka_settings: KafkaSettings,
) -> None:
    now = clock.now()
    contract = {"contract_id": "k-1", "plan": "basic", "price": "19.90", "currency": "EUR",
                "start_date": "2025-06-01", "end_date": "2026-06-01", "auto_renew": False}
    events = [
        _event_record(TENANT, "c-ok", "customer.consent_changed", {"marketing": True}, now, "e1"),
        _event_record(TENANT, "c-cancel", "customer.consent_changed", {"marketing": True}, now, "e2"),
        _event_record(TENANT, "c-cancel", "subscription.started", contract, now - timedelta(days=200), "e3"),
        _event_record(TENANT, "c-cancel", "subscription.cancellation_notice",
                      {"contract_id": "k-1", "effective_date": "2026-06-01"}, now, "e4"),
        _event_record(TENANT, "c-complain", "support.complaint", {"severity": "high"}, now, "e5"),
        # The same complaint redelivered: no second decision.
        _event_record(TENANT, "c-complain", "support.complaint", {"severity": "high"}, now, "e5"),
    ]
    events_publisher = Publisher(kafka_settings, "actions-events-test")
    settings = make_settings(consent_required=True)  # the production default: opt-in
    try:
        with TestClient(create_app(settings, clock)) as client:
            created = client.post("/v1/webhooks", json={"url": receiver.url()}, headers=headers())
            secret = created.json()["secret"]
            await events_publisher.publish_many(
                CUSTOMER_EVENTS, [(e.key, e.model_dump_json().encode()) for e in events]
            )
            state = await wait_until(
                lambda: (s := client.get("/v1/customers/c-cancel/state", headers=headers()).json())
                and s["contracts"] and s["contracts"][0]["status"] == "notice" and s,
                what="c-cancel's notice in the customer state",
            )
            assert state["marketing_consent"] is True
            assert state["contracts"][0]["end_date"] == "2026-06-01"
            assert client.get("/v1/customers/c-cancel/state", headers=headers(OTHER_TENANT)).json() == {
                **client.get("/v1/customers/nobody/state", headers=headers(OTHER_TENANT)).json(),
                "customer_id": "c-cancel",
            }
            await wait_until(
                lambda: client.get("/v1/customers/c-ok/state", headers=headers()).json()["known"],
                what="c-ok's consent",
            )
            await publish(make_score("s-ok", "c-ok", 0.9), make_score("s-no", "c-no", 0.9))

            def decisions(customer: str, tenant: str = TENANT) -> list[dict[str, Any]]:
                return client.get(f"/v1/customers/{customer}/decisions", headers=headers(tenant)).json()

            await wait_until(
                lambda: all(decisions(c) for c in ("c-ok", "c-no", "c-cancel", "c-complain")),
                what="every customer decided",
            )
            why = {c: [(d["trigger"], d["policy"], d["outcome"], d["reason"]) for d in decisions(c)]
                   for c in ("c-ok", "c-no", "c-cancel", "c-complain")}
            assert why == {
                "c-ok": [("score", "high-risk-discount", "offer_created", "matched")],
                "c-no": [("score", "high-risk-discount", "suppressed", "consent")],
                "c-cancel": [("cancellation", "win-back", "offer_created", "matched")],
                "c-complain": [("complaint", "service-recovery", "offer_created", "matched")],
            }
            assert decisions("c-complain")[0]["service"] is True
            assert decisions("c-ok", OTHER_TENANT) == [] and decisions("c-cancel", OTHER_TENANT) == []

            await wait_until(lambda: len(receiver.received()) == 3, what="three webhooks")
            sent = {p["data"]["customer_id"]: p["data"] for p in
                    (Webhook(secret).verify(r.body, r.headers) for r in receiver.received())}
            assert {c: (d["trigger"], d["kind"], d["service"]) for c, d in sent.items()} == {
                "c-ok": ("score", "discount", False),
                "c-cancel": ("cancellation", "discount", False),
                "c-complain": ("complaint", "service_recovery", True),
            }
            assert sent["c-cancel"]["offer"]["discount_percent"] == 25
            assert sent["c-cancel"]["churn_probability"] is None  # never scored: no probability

            metrics = client.get("/metrics").text
            for line in (
                'churnguard_actions_decisions_total{outcome="suppressed",policy="high-risk-discount",reason="consent"} 1.0',
                'churnguard_actions_decisions_total{outcome="offer_created",policy="win-back",reason="matched"} 1.0',
            ):
                assert line in metrics, line
            assert 'churnguard_actions_triggers_total{trigger="cancellation"}' in metrics
            assert 'churnguard_actions_customer_events_total{type="support.complaint"}' in metrics
            assert "churnguard_actions_contract_sweep_rounds_total" in metrics
    finally:
        await events_publisher.close()

    # The redelivered complaint re-publishes its stored decision (same decision id).
    records = {
        record.decision_id: record
        for record in (ActionRecord.model_validate_json(r.value) for r in await read_partitions(
            kafka_settings, RETENTION_ACTIONS, until=lambda rs: len({
                ActionRecord.model_validate_json(r.value).decision_id for r in rs}) >= 4))
    }.values()
    assert sorted((r.customer_id, r.trigger, r.reason, r.offer_kind) for r in records) == [
        ("c-cancel", "cancellation", "matched", "discount"),
        ("c-complain", "complaint", "matched", "service_recovery"),
        ("c-no", "score", "consent", "discount"),
        ("c-ok", "score", "matched", "discount"),
    ]


def test_uplift_report_over_http_on_a_constructed_scenario(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock, database_url: str
) -> None:
    with TestClient(create_app(make_settings(), clock)) as client:
        now = clock.now()
        decided = now - timedelta(days=100)  # horizon (90 days) over
        engine = make_engine(database_url)
        rows: list[Any] = []

        def decision(customer: str, treated: bool, band: str = "high", at: Any = decided,
                     tenant: str = TENANT) -> None:
            rows.append(ActionsDecision(
                decision_id=f"d-{tenant}-{customer}-{len(rows)}", tenant_id=tenant,
                score_id=f"s-{customer}-{len(rows)}", customer_id=customer, policy="p",
                outcome="offer_created" if treated else "suppressed",
                reason="matched" if treated else "holdout",
                offer_id=f"o-{customer}" if treated else None, offer_cost=10.0 if treated else 8.0,
                customer_value=200.0, churn_probability=0.8, band=band, decided_at=at,
            ))

        # Treated: t1..t4 (t1, t2 stay active; t3 silent; t4's contract ends); t1 redeemed.
        # Control: h1..h3 (h1 active; h2, h3 silent). One later decision for t1 is ignored.
        for customer in ("t1", "t2", "t3", "t4"):
            decision(customer, True)
        for customer in ("h1", "h2", "h3"):
            decision(customer, False)
        decision("t1", True, at=decided + timedelta(days=5))
        decision("late", True, at=now - timedelta(days=10))  # horizon not over: not counted
        decision("x", True, tenant=OTHER_TENANT)
        active = decided.date() + timedelta(days=30)
        rows += [ActionsActivityDay(tenant_id=TENANT, customer_id=c, day=active)
                 for c in ("t1", "t2", "t4", "h1")]
        rows.append(ActionsContract(tenant_id=TENANT, contract_id="k-t4", customer_id="t4",
                                    status="ended", ended_at=decided + timedelta(days=60),
                                    updated_at=decided + timedelta(days=60)))
        rows.append(ActionsOfferResponse(tenant_id=TENANT, event_id="r-1", customer_id="t1",
                                         offer_id="o-t1", response="redeemed", occurred_at=now))
        with session_scope(engine) as session:
            session.add_all(rows)
        engine.dispose()

        report = client.get("/v1/reports/uplift", headers=headers())
        assert report.status_code == 200, report.text
        body = report.json()
        assert body["horizon_days"] == 90 and "Newcombe" in body["interval"]
        groups = {(g["policy"], g["band"]): g for g in body["groups"]}
        assert set(groups) == {("p", "all"), ("p", "high")}
        high = groups[("p", "high")]
        assert (high["treated_customers"], high["control_customers"]) == (4, 3)
        assert (high["treated_churned"], high["control_churned"]) == (2, 2)  # t3, t4 | h2, h3
        assert high["treated_churn_rate"] == 0.5
        assert abs(high["control_churn_rate"] - 2 / 3) < 1e-12
        _, low, high_ci = newcombe_difference(2, 3, 2, 4)
        assert abs(high["uplift"] - (2 / 3 - 0.5)) < 1e-12
        assert (high["uplift_ci_low"], high["uplift_ci_high"]) == (low, high_ci)
        assert high["redemptions"] == 1
        assert high["offer_cost"] == 40.0  # four treated customers' first offers x 10
        assert abs(high["retained_revenue"] - (2 / 3 - 0.5) * 4 * 200.0) < 1e-3
        assert abs(high["roi"] - (high["retained_revenue"] - 40.0) / 40.0) < 1e-9

        assert client.get("/v1/reports/uplift", headers=headers(OTHER_TENANT)).json()["groups"][0][
            "treated_customers"] == 1
        assert client.get("/v1/reports/uplift?horizon_days=0", headers=headers()).status_code == 422
        # A 5-day horizon counts the late decision too (its 10 days are over).
        short = client.get("/v1/reports/uplift?horizon_days=5", headers=headers()).json()
        assert {(g["band"], g["treated_customers"]) for g in short["groups"]} == {("all", 5), ("high", 5)}

        # The contract sweep exports the same figures, summed over tenants, for dashboards.
        client.portal.call(client.app_state["contract_sweeper"].run_once)
        scraped = client.get("/metrics").text
        for line in ('churnguard_actions_uplift_customers{group="treated",policy="p"} 5.0',  # + x of the other tenant
                     'churnguard_actions_uplift_customers{group="control",policy="p"} 3.0',
                     'churnguard_actions_uplift_churned_customers{group="treated",policy="p"} 3.0',
                     'churnguard_actions_uplift_churned_customers{group="control",policy="p"} 2.0'):
            assert line in scraped, line


async def test_readiness_includes_the_contract_sweep_when_it_runs(
    make_settings: Callable[..., ActionsSettings], clock: ManualClock
) -> None:
    with TestClient(create_app(make_settings(contract_sweep_enabled=True), clock)) as client:
        ready = await wait_until(
            lambda: (r := client.get("/readyz")).status_code == 200 and r, what="readyz 200"
        )
        assert ready.json()["checks"]["contract_sweep"] is True
