"""Guardrails and customer state on a real database (decide() and apply_event() in real
transactions, a ManualClock): cooldown per policy and per customer, budget caps per period,
consent (marketing suppressed, service allowed, opt-in default), value gate, holdout, erased
customers, idempotent and out-of-order customer events, the contract-end sweep at 30 and 7 days
(once each, one lease holder)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from services.actions import customers, service
from services.actions.policies import PolicyDocument
from services.actions.service import Rules, TriggerInput
from services.actions.sweeps import ContractSweeper
from services.actions.tables import TABLES, ActionsDecision, ActionsOffer
from shared.clock import ManualClock
from shared.db import create_tables, make_engine, session_scope
from shared.events import ActionRecord, EventRecord, ScoreRecord, parse_event
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import RETENTION_ACTIONS
from sqlmodel import select
from tests.actions.actions_support import START, TENANT, read_partitions

MAX_AGE = timedelta(hours=48)

DOCUMENT: dict[str, Any] = {
    "customer_cooldown_days": 30,
    "offers": {
        "d15": {"kind": "discount", "discount_percent": 15, "cost": 10.0},
        "points": {"kind": "loyalty_bonus", "bonus_points": 200, "cost": 2.0},
        "sorry": {"kind": "service_recovery", "service": True, "cost": 1.0},
        "call": {"kind": "personal_call", "call_within_hours": 24, "cost": 30.0},
        "renew": {"kind": "renewal_offer", "renewal_months": 12, "cost": 5.0},
    },
    "policies": [
        {"name": "vip-call", "priority": 10, "offer": "call",
         "when": {"score": {"min": 0.8}, "segments": ["business"]},
         "value_gate": {"expected_uplift": 0.2}},
        {"name": "discount", "priority": 20, "offer": "d15", "when": {"score": {"min": 0.5}},
         "cooldown_days": 30, "budget": {"period": "week", "max_count": 2}},
        {"name": "points", "priority": 30, "offer": "points",
         "when": {"score": {"min": 0.3}}, "cooldown_days": 7},
        {"name": "recovery", "priority": 40, "offer": "sorry", "triggers": ["complaint"],
         "cooldown_days": 14},
        {"name": "renewal", "priority": 50, "offer": "renew", "triggers": ["contract_end"],
         "days_before_end": [30, 7], "cooldown_days": 0, "respect_customer_cooldown": False,
         "when": {"auto_renew": False}},
    ],
}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    create_tables(engine, TABLES)
    try:
        yield engine
    finally:
        engine.dispose()


def rules(**overrides: Any) -> Rules:
    options: dict[str, Any] = {
        "default_document": PolicyDocument.model_validate(DOCUMENT),
        "consent_required": True,
        "holdout_percent": 0.0,
    }
    options.update(overrides)
    return Rules(**options)


class World:
    """Customer events and scores into real transactions, at the clock's time."""

    def __init__(self, engine: Engine, clock: ManualClock, rules: Rules) -> None:
        self.engine, self.clock, self.rules = engine, clock, rules
        self._n = 0

    def event(self, customer: str, type_: str, data: dict[str, Any], at: datetime | None = None,
              event_id: str | None = None, tenant: str = TENANT) -> Any:
        self._n += 1
        record = EventRecord(
            tenant_id=tenant,
            received_at=self.clock.now(),
            event=parse_event({
                "id": event_id or f"e-{uuid.uuid4().hex}", "type": type_, "customer_id": customer,
                "occurred_at": (at or self.clock.now()).isoformat(), "data": data,
            }, now=self.clock.now()),
        )
        with session_scope(self.engine) as session:
            raised = customers.apply_event(session, record, self.clock.now(), MAX_AGE)
            if raised is None:
                return None
            trigger = TriggerInput(raised.trigger, raised.tenant_id, raised.customer_id,
                                   service.trigger_id(raised.trigger, tenant, raised.event_id))
            return service.decide(session, trigger, self.rules, self.clock.now()).record

    def consent(self, customer: str, marketing: bool, at: datetime | None = None) -> None:
        self.event(customer, "customer.consent_changed", {"marketing": marketing}, at)

    def score(self, customer: str, probability: float, tenant: str = TENANT,
              features: dict[str, float] | None = None) -> ActionRecord:
        self._n += 1
        record = ScoreRecord(
            score_id=f"s-{uuid.uuid4().hex}", tenant_id=tenant, customer_id=customer,
            probability=probability,
            band="high" if probability >= 0.7 else "medium" if probability >= 0.4 else "low",
            model_version="m-1", scored_at=self.clock.now(), features=features or {},
        )
        with session_scope(self.engine) as session:
            return service.decide(session, record, self.rules, self.clock.now()).record

    def offers(self, customer: str) -> list[ActionsOffer]:
        with session_scope(self.engine) as session:
            return list(session.exec(select(ActionsOffer).where(
                ActionsOffer.customer_id == customer)).all())


def _why(record: ActionRecord) -> tuple[str | None, str, str]:
    return record.policy, record.outcome, record.reason


def test_cooldown_per_policy_and_per_customer_and_budget_per_week(engine: Engine) -> None:
    clock = ManualClock(START)  # a Sunday: the week turns after one day
    world = World(engine, clock, rules())
    for customer in ("a", "b", "c", "d"):
        world.consent(customer, True)

    assert _why(world.score("a", 0.9)) == ("discount", "offer_created", "matched")
    # Same policy within its 30 days: cooldown.
    assert _why(world.score("a", 0.95)) == ("discount", "suppressed", "cooldown")
    # Another policy (points, 7-day policy cooldown) is still held back by the customer-wide
    # 30-day cooldown of marketing offers: first match wins, then the guardrails speak.
    assert _why(world.score("a", 0.35)) == ("points", "suppressed", "cooldown")
    # A service message is not held back by the customer-wide cooldown.
    complaint = world.event("a", "support.complaint", {"severity": "high"})
    assert _why(complaint) == ("recovery", "offer_created", "matched") and complaint.service

    # Budget: two discounts per week for the whole tenant; the third is suppressed.
    assert _why(world.score("b", 0.9)) == ("discount", "offer_created", "matched")
    assert _why(world.score("c", 0.9)) == ("discount", "suppressed", "budget")
    clock.advance(timedelta(days=1))  # Monday: a new budget week
    assert _why(world.score("c", 0.9)) == ("discount", "offer_created", "matched")
    assert _why(world.score("d", 0.9)) == ("discount", "offer_created", "matched")
    assert _why(world.score("d", 0.3)) == ("points", "suppressed", "cooldown")

    # Past 30 days both cooldowns are over for a.
    clock.advance(timedelta(days=30))
    assert _why(world.score("a", 0.9)) == ("discount", "offer_created", "matched")
    assert len(world.offers("a")) == 3  # discount, recovery, discount
    with session_scope(engine) as session:
        reasons = sorted(d.reason for d in session.exec(select(ActionsDecision)).all())
    assert reasons.count("budget") == 1 and reasons.count("cooldown") == 3


def test_consent_opt_in_by_default_marketing_suppressed_service_allowed(engine: Engine) -> None:
    clock = ManualClock(START)
    world = World(engine, clock, rules())
    # No consent event: opt-in required, so no marketing offer ...
    assert _why(world.score("silent", 0.9)) == ("discount", "suppressed", "consent")
    # ... but a service message is allowed.
    sorry = world.event("silent", "support.complaint", {"severity": "low"})
    assert _why(sorry) == ("recovery", "offer_created", "matched")
    # Explicit refusal suppresses marketing; consent given later allows it.
    world.consent("no", False)
    assert _why(world.score("no", 0.9)) == ("discount", "suppressed", "consent")
    clock.advance(timedelta(minutes=1))
    world.consent("no", True)
    # An older refusal arriving late (out of order) does not override the newer consent.
    world.consent("no", False, at=START)
    assert _why(world.score("no", 0.9)) == ("discount", "offer_created", "matched")

    # With consent_required off, the absence of a consent event is not a refusal.
    lenient = World(engine, clock, rules(consent_required=False))
    assert _why(lenient.score("fresh", 0.9)) == ("discount", "offer_created", "matched")
    lenient.consent("refuser", False)
    assert _why(lenient.score("refuser", 0.9)) == ("discount", "suppressed", "consent")


def test_value_gate_holdout_erased_and_no_match_are_recorded(engine: Engine) -> None:
    clock = ManualClock(START)
    world = World(engine, clock, rules())
    for customer in ("big", "small", "gone"):
        world.consent(customer, True)
        world.event(customer, "customer.profile_updated", {"segment": "business"})
    world.event("big", "customer.profile_updated",
                {"segment": "business", "attributes": {"clv": 1000}}, at=clock.now() + timedelta(seconds=1))
    # vip-call: 0.9 x 1000 x 0.2 = 180 > 30: sent. 0.9 x spend 100 x 0.2 = 18 < 30: value_gate.
    assert _why(world.score("big", 0.9)) == ("vip-call", "offer_created", "matched")
    gated = world.score("small", 0.9, features={"spend_365d": 100.0})
    assert _why(gated) == ("vip-call", "suppressed", "value_gate")
    assert _why(world.score("small", 0.1)) == (None, "suppressed", "no_match")

    with session_scope(engine) as session:
        service.mark_erased(session, TENANT, "gone", clock.now())
    assert _why(world.score("gone", 0.99)) == (None, "suppressed", "erased")
    assert world.event("gone", "support.complaint", {}) is None  # no state rebuilt, no trigger
    assert world.offers("gone") == []

    control = World(engine, clock, rules(holdout_percent=100.0))
    control.consent("held", True)
    assert _why(control.score("held", 0.9)) == ("discount", "suppressed", "holdout")
    assert control.offers("held") == []


def test_customer_events_are_idempotent_and_keep_the_latest_by_occurred_at(engine: Engine) -> None:
    clock = ManualClock(START)
    world = World(engine, clock, rules())
    old, new = START - timedelta(days=2), START - timedelta(days=1)
    world.event("c", "customer.profile_updated", {"segment": "vip", "attributes": {"plan": "pro"}},
                at=new, event_id="p2")
    world.event("c", "customer.profile_updated", {"segment": "old"}, at=old, event_id="p1")
    world.event("c", "loyalty.tier_changed", {"tier": "gold"}, at=new)
    world.event("c", "loyalty.tier_changed", {"tier": "silver"}, at=old)
    started = {"contract_id": "k1", "plan": "basic", "price": "9.90", "currency": "EUR",
               "start_date": "2025-04-01", "end_date": "2026-04-01", "auto_renew": False}
    world.event("c", "subscription.started", started, at=old, event_id="k-start")
    world.event("c", "subscription.started", started, at=old, event_id="k-start")  # redelivery
    world.event("c", "offer.redeemed", {"offer_id": "o-1"}, event_id="r1")
    world.event("c", "offer.redeemed", {"offer_id": "o-1"}, event_id="r1")  # redelivery
    with session_scope(engine) as session:
        state, contracts = customers.profile(session, TENANT, "c")
        from services.actions import repository
        redeemed = repository.redeemed_offers(session, TENANT, ["o-1"])
    assert state is not None
    assert (state.segment, state.attributes, state.loyalty_tier) == ("vip", {"plan": "pro"}, "gold")
    assert [(k.contract_id, k.status, str(k.end_date), k.auto_renew) for k in contracts] == [
        ("k1", "active", "2026-04-01", False)
    ]
    assert state.last_activity_at == clock.now() and redeemed == {"o-1"}
    # An old complaint (a backfill) updates the state but triggers nothing.
    assert world.event("c", "support.complaint", {}, at=START - timedelta(days=3)) is None


async def test_contract_end_sweep_fires_at_30_and_7_days_once_each(
    engine: Engine, kafka_settings: KafkaSettings
) -> None:
    clock = ManualClock(START)
    world = World(engine, clock, rules())
    today = START.date()
    for customer, end_in, auto in (("renewing", 40, False), ("auto", 40, True), ("leaving", 20, False)):
        world.consent(customer, True)
        world.event(customer, "subscription.started", {
            "contract_id": f"k-{customer}", "plan": "basic", "price": "9.90", "currency": "EUR",
            "start_date": str(today - timedelta(days=300)),
            "end_date": str(today + timedelta(days=end_in)), "auto_renew": auto,
        })
    # A cancellation notice takes a contract out of the renewal playbook.
    world.event("leaving", "subscription.cancellation_notice",
                {"contract_id": "k-leaving", "effective_date": str(today + timedelta(days=20))})

    publisher = Publisher(kafka_settings, "actions-sweep-test")
    woken: list[int] = []
    sweeper = ContractSweeper(engine=engine, publisher=publisher, rules=world.rules, clock=clock,
                              interval_s=3600, batch=1, on_deliveries=lambda: woken.append(1))
    other = ContractSweeper(engine=engine, publisher=publisher, rules=world.rules, clock=clock,
                            interval_s=3600, batch=1, on_deliveries=lambda: None)
    try:
        assert (await sweeper.run_once()).decisions == []  # 40 days left: no step reached
        clock.advance(timedelta(days=10))  # 30 days left
        first = await sweeper.run_once()
        assert (await other.run_once()).skipped == "lease held elsewhere"
        # 'auto' renews itself: its step is decided (and recorded) as no_match.
        assert sorted((d.record.customer_id, d.record.policy, d.record.reason, d.record.trigger)
                      for d in first.decisions) == [
            ("auto", None, "no_match", "contract_end"),
            ("renewing", "renewal", "matched", "contract_end"),
        ]
        assert first.contracts == 2  # 'leaving' gave notice: not in the playbook
        assert (await sweeper.run_once()).decisions == []  # not twice
        clock.advance(timedelta(days=1))
        assert (await sweeper.run_once()).decisions == []  # 29 days: still the 30-day step
        clock.advance(timedelta(days=22))  # 7 days left
        seven = await sweeper.run_once()
        assert sorted((d.record.customer_id, d.record.policy) for d in seven.decisions) == [
            ("auto", None), ("renewing", "renewal")
        ]
        assert (await sweeper.run_once()).decisions == []
    finally:
        await publisher.close()

    offers = world.offers("renewing")
    assert [o.trigger for o in offers] == ["contract_end", "contract_end"]
    assert woken == []  # no webhook subscriptions: nothing for the worker
    records = [ActionRecord.model_validate_json(r.value)
               for r in await read_partitions(kafka_settings, RETENTION_ACTIONS, 4)]
    assert sorted((r.customer_id, r.trigger, r.reason) for r in records) == [
        ("auto", "contract_end", "no_match"), ("auto", "contract_end", "no_match"),
        ("renewing", "contract_end", "matched"), ("renewing", "contract_end", "matched"),
    ]


def test_score_change_compares_with_the_previous_score_of_the_customer(engine: Engine) -> None:
    clock = ManualClock(START)
    jump = PolicyDocument.model_validate({
        "offers": {"call": {"kind": "personal_call", "cost": 1.0}},
        "policies": [{"name": "jump", "priority": 1, "offer": "call", "cooldown_days": 0,
                      "respect_customer_cooldown": False, "when": {"score_change": {"min": 0.3}}}],
    })
    world = World(engine, clock, rules(default_document=jump, consent_required=False))
    assert _why(world.score("j", 0.2)) == (None, "suppressed", "no_match")  # no previous score
    assert _why(world.score("j", 0.4)) == (None, "suppressed", "no_match")  # +0.2
    assert _why(world.score("j", 0.75)) == ("jump", "offer_created", "matched")  # +0.35
    assert _why(world.score("j", 0.8)) == (None, "suppressed", "no_match")  # +0.05
