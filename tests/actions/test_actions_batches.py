"""Decisions made a batch at a time (service.decide_many, as the consumers run them) on a real
database: the batch decides in order, its own offers count for the cooldowns and budgets of the
triggers after them, a trigger twice in a batch is decided once; and across concurrent
transactions (two consumers, or a redelivery racing the original) a trigger is decided once and
a budget is never overspent."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlmodel import select

from services.actions import service, webhooks
from services.actions.consumer import apply_events
from services.actions.policies import PolicyDocument
from services.actions.service import DecisionResult, Rules
from services.actions.tables import ActionsDecision, ActionsDelivery, ActionsOffer
from services.actions.url_guard import UrlPolicy
from shared.clock import ManualClock
from shared.db import session_scope
from shared.events import EventRecord, ScoreRecord, parse_event
from tests.actions.actions_support import START, TENANT
from tests.actions.test_actions_guardrails import MAX_AGE, DOCUMENT, World, engine, rules  # noqa: F401
from tests.helpers import wait_until


def _score(customer: str, probability: float, score_id: str | None = None) -> ScoreRecord:
    return ScoreRecord(
        score_id=score_id or f"s-{uuid.uuid4().hex}", tenant_id=TENANT, customer_id=customer,
        probability=probability, band="high" if probability >= 0.7 else "medium",
        model_version="m-1", scored_at=START,
    )


def _why(result: DecisionResult) -> tuple[str | None, str, str, bool]:
    return result.record.policy, result.record.outcome, result.record.reason, result.created


def test_a_batch_decides_in_order_and_its_own_offers_count(engine: Engine) -> None:  # noqa: F811
    clock = ManualClock(START)
    world = World(engine, clock, rules())
    for customer in ("a", "b", "c"):
        world.consent(customer, True)
    first = _score("a", 0.9)
    with session_scope(engine) as session:
        results = service.decide_many(session, [
            first,
            _score("a", 0.95),  # the same policy right after: cooldown
            first,  # the same trigger twice in one batch: decided once
            _score("b", 0.9),  # the second discount of the week (budget: 2)
            _score("c", 0.9),  # the third: over budget
        ], world.rules, clock.now())
    assert [_why(r) for r in results] == [
        ("discount", "offer_created", "matched", True),
        ("discount", "suppressed", "cooldown", True),
        ("discount", "offer_created", "matched", False),
        ("discount", "offer_created", "matched", True),
        ("discount", "suppressed", "budget", True),
    ]
    assert results[2].record == results[0].record
    with session_scope(engine) as session:
        assert len(session.exec(select(ActionsDecision)).all()) == 4
        assert len(session.exec(select(ActionsOffer)).all()) == 2
        # a redelivery of the whole batch decides nothing again
        again = service.decide_many(session, [first, _score("c", 0.9, results[4].record.score_id)],
                                    world.rules, clock.now())
    assert [r.created for r in again] == [False, False]
    assert again[0].record == results[0].record and again[1].record == results[4].record


def test_events_of_one_batch_are_folded_before_their_triggers_are_decided(engine: Engine) -> None:  # noqa: F811
    """A complaint and, later in the same batch, a consent withdrawal: the service message is
    still sent (no consent needed); a marketing policy would see the withdrawal."""
    clock = ManualClock(START)
    document = {**DOCUMENT, "policies": [
        {"name": "complaint-discount", "priority": 1, "offer": "d15", "triggers": ["complaint"]},
    ]}
    batch_rules = Rules(default_document=PolicyDocument.model_validate(document), holdout_percent=0.0)

    def event(customer: str, type_: str, data: dict[str, Any]) -> EventRecord:
        return EventRecord(tenant_id=TENANT, received_at=clock.now(), event=parse_event({
            "id": f"e-{uuid.uuid4().hex}", "type": type_, "customer_id": customer,
            "occurred_at": clock.now().isoformat(), "data": data}, now=clock.now()))

    results, _ = apply_events(engine, [
        event("a", "customer.consent_changed", {"marketing": True}),
        event("a", "support.complaint", {"severity": "high"}),
        event("a", "customer.consent_changed", {"marketing": False}),
        event("b", "customer.consent_changed", {"marketing": True}),
        event("b", "support.complaint", {"severity": "high"}),
    ], batch_rules, clock, MAX_AGE)
    assert [(r.record.customer_id, r.record.reason) for r in results] == [("a", "consent"), ("b", "matched")]


def _race(engine: Engine, first: Callable[[Any], Any], second: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Run `first` in a transaction that stays open until `second`, in another transaction and
    thread, is seen waiting for a lock (or has finished); then commit the first."""
    if engine.dialect.name != "postgresql":
        pytest.skip("concurrent writers: PostgreSQL (SQLite has one writer at a time)")
    results: dict[str, Any] = {}
    decided, release = threading.Event(), threading.Event()

    def run_first() -> None:
        with session_scope(engine) as session:
            results["first"] = first(session)
            decided.set()
            release.wait(30)

    def run_second() -> None:
        with session_scope(engine) as session:
            results["second"] = second(session)

    one = threading.Thread(target=run_first)
    one.start()
    assert decided.wait(30)
    two = threading.Thread(target=run_second)
    two.start()
    with engine.connect() as connection:
        def second_waits_or_finished() -> bool:
            waiting = connection.execute(text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid IN "
                "(SELECT pid FROM pg_stat_activity WHERE datname = current_database())")).scalar()
            connection.commit()
            return bool(waiting) or "second" in results

        wait_until(second_waits_or_finished, what="the second transaction waits or finishes")
    release.set()
    one.join(30)
    two.join(30)
    return results["first"], results["second"]


def test_a_budget_is_never_overspent_by_two_concurrent_consumers(engine: Engine) -> None:  # noqa: F811
    clock = ManualClock(START)
    document = {**DOCUMENT, "policies": [
        {"name": "discount", "priority": 1, "offer": "d15", "when": {"score": {"min": 0.5}},
         "budget": {"period": "week", "max_count": 1}},
    ]}
    tight = Rules(default_document=PolicyDocument.model_validate(document), consent_required=False,
                  holdout_percent=0.0)
    first, second = _race(
        engine,
        lambda session: service.decide(session, _score("a", 0.9), tight, clock.now()),
        lambda session: service.decide(session, _score("b", 0.9), tight, clock.now()),
    )
    assert first.record.outcome == "offer_created"
    assert (second.record.outcome, second.record.reason) == ("suppressed", "budget")
    with session_scope(engine) as session:
        assert len(session.exec(select(ActionsOffer)).all()) == 1


def test_a_redelivered_trigger_racing_the_original_is_decided_once(engine: Engine) -> None:  # noqa: F811
    clock = ManualClock(START)
    world = World(engine, clock, rules(consent_required=False))
    with session_scope(engine) as session:
        webhooks.create_subscription(session, TENANT, "http://127.0.0.1:9/hooks", clock.now(),
                                     UrlPolicy(allow_local=True))
    score = _score("a", 0.9)
    first, second = _race(
        engine,
        lambda session: service.decide_many(session, [score], world.rules, clock.now())[0],
        lambda session: service.decide_many(session, [score], world.rules, clock.now())[0],
    )
    assert first.created and first.deliveries == 1 and first.record.outcome == "offer_created"
    assert not second.created and second.deliveries == 0 and second.record == first.record
    with session_scope(engine) as session:
        assert len(session.exec(select(ActionsOffer)).all()) == 1
        assert len(session.exec(select(ActionsDelivery)).all()) == 1
