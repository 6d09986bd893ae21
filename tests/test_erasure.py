"""Erasure (GDPR Art. 17) and export (Art. 15/20) across the four services, in-process on real
parts: the real broker, one real database for all services, real HTTP through the gateway and a
real webhook receiver. The proof: after the erasure, no row of any table of any service holds
the customer's id or personal data, except the tombstones and the erasure record; another
customer of the tenant and the same customer id of another tenant are untouched."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, LargeBinary, select

from services.actions.app import create_app as actions_app
from services.actions.config import ActionsSettings
from services.actions.tables import TABLES as ACTIONS_TABLES
from services.gateway.app import create_app as gateway_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant
from services.gateway.tables import TABLES as GATEWAY_TABLES
from services.ingest.app import create_app as ingest_app
from services.ingest.config import IngestSettings
from services.ingest.tables import TABLES as INGEST_TABLES
from services.scoring.app import create_app as scoring_app
from services.scoring.config import ScoringSettings
from services.scoring.model import TrainedModel
from services.scoring.tables import TABLES as SCORING_TABLES
from shared.clock import ManualClock
from shared.db import make_engine
from shared.events import ErasureRecord, EventRecord, ScoreRecord, parse_event
from shared.kafka import Publisher
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS
from tests.actions.actions_support import Receiver
from tests.helpers import INTERNAL_TOKEN, ServerThread, wait_until
from tests.scoring.conftest import register, trained_model  # noqa: F401  (the session's model)

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
VICTIM = "cust-victim-9q"
OTHER = "cust-other-4k"
VICTIM_EMAIL = "victim.person@example.org"
ALL_TABLES = (*GATEWAY_TABLES, *INGEST_TABLES, *SCORING_TABLES, *ACTIONS_TABLES)


@dataclass
class World:
    gateway: str
    ports: dict[str, str]
    keys: dict[str, str]  # tenant name -> api key
    tenants: dict[str, str]  # tenant name -> tenant id
    engine: Engine
    kafka: KafkaSettings

    def client(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.gateway, headers={"Authorization": f"Bearer {self.keys[tenant]}"},
                            timeout=15)

    def metric(self, service: str, name: str, **labels: str) -> float:
        """From a real scrape of the service's /metrics (one process here, one registry)."""
        text = httpx.get(f"{self.ports[service]}/metrics", timeout=5).text
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture
def world(
    kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel  # noqa: F811
) -> Iterator[World]:
    register(database_url, trained_model)
    clock = ManualClock(NOW)
    database = DatabaseSettings(database_url=database_url)
    internal = InternalAuthSettings(internal_token=SecretStr(INTERNAL_TOKEN))
    suffix = uuid.uuid4().hex[:8]
    servers = {
        "ingest": ServerThread(ingest_app(IngestSettings(kafka=kafka_settings, database=database, internal=internal),
                                          clock)),
        "scoring": ServerThread(scoring_app(ScoringSettings(
            kafka=kafka_settings, database=database, internal=internal, group_id=f"scoring-{suffix}",
            model_refresh_s=0.2, sweep_enabled=False, retention_enabled=False), clock)),
        "actions": ServerThread(actions_app(ActionsSettings(
            kafka=kafka_settings, database=database, internal=internal, group_id=f"actions-{suffix}",
            delivery_poll_s=0.05, webhook_timeout_s=2.0, holdout_percent=0.0, consent_required=False,
            contract_sweep_enabled=False, webhook_allow_local_urls=True), clock)),  # the receiver is http on 127.0.0.1
    }
    for server in servers.values():
        server.start()
    gateway = ServerThread(gateway_app(GatewaySettings(
        database=database, internal=internal, ingest_url=servers["ingest"].url,
        scoring_url=servers["scoring"].url, actions_url=servers["actions"].url, upstream_timeout_s=10.0,
    ), clock)).start()
    tenants, keys = {}, {}
    for name in ("shop-a", "shop-b"):
        tenants[name], keys[name] = create_tenant(database_url, f"{name}-{suffix}")
    engine = make_engine(database_url)
    try:
        for name in ("ingest", "scoring", "actions"):
            wait_until(lambda name=name: httpx.get(f"{servers[name].url}/readyz", timeout=5).status_code == 200,
                       timeout_s=60, what=f"{name} ready")
        yield World(gateway.url, {n: s.url for n, s in servers.items()}, keys, tenants, engine, kafka_settings)
    finally:
        gateway.stop()
        for server in servers.values():
            server.stop()
        engine.dispose()


def _event(customer: str, kind: str, days_ago: float, data: dict[str, Any]) -> dict[str, Any]:
    # Opaque ids: ingest keeps event ids (no customer column), so they must not carry the customer.
    return {"id": uuid.uuid4().hex, "type": kind, "customer_id": customer,
            "occurred_at": (NOW - timedelta(days=days_ago)).isoformat(), "source": "shop", "data": data}


def history(customer: str, email: str) -> list[dict[str, Any]]:
    today = NOW.date()
    return [
        _event(customer, "customer.profile_updated", 400, {"email": email, "name": "Kim Doe", "segment": "b2c",
                                                            "attributes": {"clv": 900}}),
        _event(customer, "subscription.started", 300, {
            "contract_id": f"k-{customer}", "plan": "basic", "price": "19.90", "currency": "EUR",
            "start_date": str(today - timedelta(days=300)), "end_date": str(today + timedelta(days=20)),
            "auto_renew": False}),
        _event(customer, "order.completed", 200, {"order_id": f"o-{customer}", "amount": "35.00", "currency": "EUR"}),
        _event(customer, "offer.declined", 50, {"offer_id": f"offer-of-{customer}"}),
        _event(customer, "feedback.nps", 2, {"score": 1, "comment": f"terrible, write to {email}"}),
        _event(customer, "support.complaint", 1, {"severity": "high", "category": "billing"}),
    ]


def _rows(engine: Engine) -> Iterator[tuple[str, dict[str, Any]]]:
    with engine.connect() as connection:
        for model in ALL_TABLES:
            table = model.__table__  # type: ignore[attr-defined]
            for row in connection.execute(select(table)):
                yield table.name, {
                    column.name: value for column, value in zip(table.columns, row, strict=True)
                    if not isinstance(column.type, LargeBinary)
                }


def _mentions(row: dict[str, Any], needle: str) -> bool:
    return any(needle in str(value) for value in row.values())


def leftovers(world: World, tenant: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of `tenant` (or of no tenant) that mention the victim's id or e-mail address."""
    tenant_id = world.tenants[tenant]
    return [
        (name, row) for name, row in _rows(world.engine)
        if row.get("tenant_id", tenant_id) == tenant_id and (_mentions(row, VICTIM) or _mentions(row, VICTIM_EMAIL))
    ]


def bystanders(world: World) -> Counter[tuple[str, str]]:
    """Rows per table of the other tenant, and of the other customer of the victim's tenant."""
    counts: Counter[tuple[str, str]] = Counter()
    for name, row in _rows(world.engine):
        if row.get("tenant_id") == world.tenants["shop-b"]:
            counts[(name, "shop-b")] += 1
        elif row.get("tenant_id") == world.tenants["shop-a"] and _mentions(row, OTHER):
            counts[(name, "shop-a/other")] += 1
    return counts


def is_tombstone(name: str, row: dict[str, Any]) -> bool:
    if name in ("ingest_erasures", "scoring_erasures"):
        return row["customer_id"] == VICTIM
    if name == "actions_customers":
        blank = {"tenant_id", "customer_id", "erased_at", "attributes"}
        return (row["erased_at"] is not None and not row["attributes"]
                and all(v is None for k, v in row.items() if k not in blank))
    return False


def _settled(client: httpx.Client, customer: str, events: list[dict[str, Any]]) -> bool:
    score = client.get(f"/v1/customers/{customer}/score")
    return score.status_code == 200 and score.json()["event_id"] == events[-1]["id"]


def _publish(world: World, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    import asyncio

    async def send() -> None:
        publisher = Publisher(world.kafka, "test-erasure")
        try:
            await publisher.publish_many(topic, messages)
        finally:
            await publisher.close()

    asyncio.run(send())


def test_an_erased_customer_leaves_nothing_but_tombstones_in_any_table(world: World) -> None:
    receiver = Receiver()
    receiver.start()
    try:
        _erase_and_prove(world, receiver)
    finally:
        receiver.stop()


def _erase_and_prove(world: World, receiver: Receiver) -> None:
    a, b = world.client("shop-a"), world.client("shop-b")
    for client in (a, b):
        assert client.post("/v1/webhooks", json={"url": receiver.url()}).status_code == 201
    histories = {(a, VICTIM): history(VICTIM, VICTIM_EMAIL), (a, OTHER): history(OTHER, "other@example.org"),
                 (b, VICTIM): history(VICTIM, VICTIM_EMAIL)}
    for (client, _), events in histories.items():
        response = client.post("/v1/events/batch", json={"events": events})
        assert response.status_code == 202 and response.json()["accepted"] == len(events), response.text
    for (client, customer), events in histories.items():
        wait_until(lambda c=client, cu=customer, e=events: _settled(c, cu, e), timeout_s=60, what="scored")
        # the complaint and the NPS answer each trigger a decision at once (service messages)
        wait_until(lambda c=client, cu=customer: len(c.get(f"/v1/customers/{cu}/decisions").json()) >= 2,
                   timeout_s=60, what="decided")
    wait_until(lambda: len(receiver.received()) >= 3, timeout_s=30, what="webhooks delivered")
    wait_until(lambda: a.get("/v1/deliveries?status=pending").json() == [] and
               b.get("/v1/deliveries?status=pending").json() == [], timeout_s=30, what="outbox drained")

    # Export (Art. 15/20): one document with every service's data; another tenant gets nothing.
    export = a.get(f"/v1/customers/{VICTIM}/export")
    assert export.status_code == 200, export.text
    document = export.json()
    assert document["customer_id"] == VICTIM
    assert len(document["scoring"]["events"]) == len(histories[(a, VICTIM)])
    assert {e["id"] for e in document["scoring"]["events"]} == {e["id"] for e in histories[(a, VICTIM)]}
    assert document["scoring"]["scores"] and document["scoring"]["features"]["values"]
    assert document["actions"]["state"]["attributes"] == {"clv": 900}
    assert document["actions"]["contracts"][0]["contract_id"] == f"k-{VICTIM}"
    assert document["actions"]["decisions"] and document["actions"]["offers"]
    assert document["actions"]["deliveries"][0]["payload"]["data"]["customer_id"] == VICTIM
    assert "secret" not in str(document["actions"]["deliveries"])
    assert document["ingest"] == {"erasure": None, "source_orders": []}
    assert b.get(f"/v1/customers/{OTHER}/export").status_code == 404  # shop-a's customer, asked by shop-b
    assert a.get("/v1/customers/nobody-here/export").status_code == 404
    assert a.get(f"/v1/customers/{'x' * 129}/export").status_code == 422
    assert leftovers(world, "shop-a"), "the victim's data is in the tables before the erasure"
    before = bystanders(world)
    assert before[("scoring_events", "shop-b")] == len(histories[(b, VICTIM)])

    # Erase; a repeated DELETE returns the same erasure.
    webhooks_before = len(receiver.received())
    suppressed_before = world.metric("ingest", "churnguard_ingest_events_suppressed_total")
    erased = a.delete(f"/v1/customers/{VICTIM}")
    assert erased.status_code == 202, erased.text
    erasure = erased.json()
    assert erasure["status_url"] == f"/v1/erasures/{erasure['erasure_id']}"
    assert erased.headers["location"] == erasure["status_url"]
    assert erasure["requested_by"].startswith("k_")  # the gateway names the API key that asked
    assert erasure["services"]["ingest"]["status"] == "done"
    again = a.delete(f"/v1/customers/{VICTIM}")
    assert again.status_code in (200, 202) and again.json()["erasure_id"] == erasure["erasure_id"]

    done = wait_until(lambda: (r := a.get(erasure["status_url"]).json())["status"] == "done" and r,
                      timeout_s=60, what="erasure done in every service")
    assert {name: s["status"] for name, s in done["services"].items()} == {
        "ingest": "done", "scoring": "done", "actions": "done"}
    assert done["completed_at"] is not None
    assert a.get(f"/v1/customers/{VICTIM}/erasure").json()["erasure_id"] == erasure["erasure_id"]
    assert b.get(erasure["status_url"]).status_code == 404  # another tenant's erasure id
    assert b.get(f"/v1/customers/{VICTIM}/erasure").status_code == 404
    assert a.get("/v1/erasures/er_unknown").status_code == 404
    assert a.delete(f"/v1/customers/{VICTIM}").status_code == 200  # complete: nothing more to do

    # The proof: nothing of the victim remains in any table of any service but the tombstones.
    remaining = leftovers(world, "shop-a")
    assert {name for name, _ in remaining} == {"ingest_erasures", "scoring_erasures", "actions_customers"}, remaining
    assert all(is_tombstone(name, row) for name, row in remaining), remaining
    assert bystanders(world) == before  # the other customer and the other tenant are untouched
    assert _settled(b, VICTIM, histories[(b, VICTIM)])

    # Later events are suppressed: at the door (counted), and downstream for a record another
    # ingest instance might let through before it refreshes, or a score already under way.
    late = _event(VICTIM, "order.completed", 0, {"order_id": "late", "amount": "9.00", "currency": "EUR"})
    answer = a.post("/v1/events", json=late)
    assert answer.status_code == 202 and answer.json() == {"accepted": 0, "duplicates": 0, "suppressed": 1,
                                                            "id": late["id"]}
    batch = a.post("/v1/events/batch", json={"events": [late, _event(OTHER, "session.recorded", 0, {})]})
    assert (batch.json()["accepted"], batch.json()["suppressed"]) == (1, 1)
    assert world.metric("ingest", "churnguard_ingest_events_suppressed_total") == suppressed_before + 2

    scoring_suppressed = world.metric("scoring", "churnguard_scoring_events_suppressed_total")
    actions_events = world.metric("actions", "churnguard_actions_erased_suppressed_total", source="event")
    actions_triggers = world.metric("actions", "churnguard_actions_erased_suppressed_total", source="trigger")
    scoring_erasures = world.metric("scoring", "churnguard_scoring_erasures_total")
    actions_erasures = world.metric("actions", "churnguard_actions_erasures_total")
    tenant_a = world.tenants["shop-a"]
    sneaked = EventRecord(tenant_id=tenant_a, received_at=NOW, event=parse_event(
        _event(VICTIM, "support.complaint", 0, {"severity": "high"}), now=NOW))
    control = ErasureRecord(erasure_id=erasure["erasure_id"], tenant_id=tenant_a, customer_id=VICTIM,
                            requested_at=NOW)
    _publish(world, CUSTOMER_EVENTS, [(sneaked.key, sneaked.model_dump_json().encode()),
                                      (control.key, control.to_json())])  # the control record, again
    late_score = ScoreRecord(score_id=uuid.uuid4().hex, tenant_id=tenant_a, customer_id=VICTIM, probability=0.99,
                             band="high", model_version="m-late", scored_at=NOW)
    _publish(world, CHURN_SCORES, [(late_score.key, late_score.model_dump_json().encode())])
    wait_until(lambda: world.metric("scoring", "churnguard_scoring_events_suppressed_total") == scoring_suppressed + 1
               and world.metric("scoring", "churnguard_scoring_erasures_total") == scoring_erasures + 1
               and world.metric("actions", "churnguard_actions_erasures_total") == actions_erasures + 1
               and world.metric("actions", "churnguard_actions_erased_suppressed_total", source="event")
               == actions_events + 1
               and world.metric("actions", "churnguard_actions_erased_suppressed_total", source="trigger")
               == actions_triggers + 1, timeout_s=30, what="late records suppressed, control record handled again")
    remaining = leftovers(world, "shop-a")
    assert {name for name, _ in remaining} == {"ingest_erasures", "scoring_erasures", "actions_customers"}, remaining
    assert all(is_tombstone(name, row) for name, row in remaining), remaining
    assert a.get(erasure["status_url"]).json() == done  # handled twice: the record is unchanged
    assert not [r for r in receiver.received()[webhooks_before:] if VICTIM.encode() in r.body]

    # What is still held: the erasure record and the tombstones' times, nothing else.
    after = a.get(f"/v1/customers/{VICTIM}/export").json()
    assert after["ingest"]["erasure"]["erasure_id"] == erasure["erasure_id"]
    assert after["scoring"]["events"] == after["scoring"]["scores"] == [] and after["scoring"]["features"] is None
    assert after["scoring"]["erased_at"] and after["actions"]["erased_at"]
    assert all(not after["actions"][k] for k in ("state", "contracts", "activity_days", "offer_responses",
                                                 "decisions", "offers", "deliveries"))
