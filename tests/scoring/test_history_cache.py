"""The consumer's in-memory histories never change a feature: whatever the arrival order, the
batch split, redeliveries, rebalances, the cache bound, imports, purges or erasures, the stored
features are compute_features(the stored history, as_of), and the cache only holds what the
database holds. Real database (PostgreSQL when reachable), no broker: the consumer's
transaction (`ScoringConsumer.process`), or its two halves (`plan`, then `write`, with the next
batch planned before the previous one is written, as the consume loop runs them), is called
directly with the partitions records came on.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from sqlalchemy import Engine

from services.scoring import erasure, repository, service
from services.scoring.config import ScoringSettings
from services.scoring.consumer import EarlierWriteFailed, HistoryMismatch, ScoringConsumer
from services.scoring.features import HistoryEvent, compute_features
from services.scoring.history_cache import HistoryCache
from services.scoring.model import Predictor, TrainedModel
from services.scoring.retention import HistoryPurger
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.events import ErasureRecord, EventRecord, parse_event
from shared.kafka import Publisher
from shared.settings import DatabaseSettings, KafkaSettings

from .conftest import register

BASE = datetime(2026, 6, 1, tzinfo=timezone.utc)
PARTITIONS = 3


# --- a world: one database, a consumer, one tenant per example ------------------------------


class World:
    def __init__(self, engine: Engine, database_url: str, predictor: Predictor) -> None:
        self.engine = engine
        self.database_url = database_url
        self.predictor = predictor

    def consumer(self, cache_events: int, clock: ManualClock) -> ScoringConsumer:
        settings = ScoringSettings(database=DatabaseSettings(database_url=self.database_url),
                                   history_cache_events=cache_events)
        # the publisher starts lazily and is never used here: process() only touches the database
        return ScoringConsumer(settings, self.engine, Publisher(KafkaSettings(), "unused"), clock)

    def stored_history(self, tenant: str, customer: str) -> list[Any]:
        with session_scope(self.engine) as session:
            return repository.load_histories(session, tenant, [customer]).get(customer, [])

    def stored_features(self, tenant: str, customer: str) -> tuple[dict[str, float], datetime] | None:
        with session_scope(self.engine) as session:
            row = repository.customer_features(session, tenant, customer)
            return None if row is None else (dict(row.features), row.updated_at)


@pytest.fixture
def world(database_url: str, trained_model: TrainedModel) -> Iterator[World]:
    register(database_url, trained_model)
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            predictor = service.load_active_predictor(session)
        assert predictor is not None
        yield World(engine, database_url, predictor)
    finally:
        engine.dispose()


def partition_of(customer: str) -> int:
    return int(customer.rsplit("-", 1)[1]) % PARTITIONS


def record(tenant: str, customer: str, kind: str, at: datetime, data: dict[str, Any], event_id: str) -> EventRecord:
    event = parse_event({"id": event_id, "type": kind, "customer_id": customer, "occurred_at": at.isoformat(),
                         "source": "test", "data": data})
    return EventRecord(tenant_id=tenant, received_at=BASE, event=event)


def process(consumer: ScoringConsumer, world: World, records: list[Any]) -> service.BatchOutcome:
    customers = [r.customer_id if isinstance(r, ErasureRecord) else r.event.customer_id for r in records]
    outcome, _, _ = consumer.process(records, [partition_of(c) for c in customers], world.predictor)
    return outcome


def plan_and_write(consumer: ScoringConsumer, world: World, batches: list[list[EventRecord]]) -> None:
    """Each batch planned on top of the one before, not written yet (its histories in flight),
    then all written in order: how the consume loop overlaps a batch's computation with the
    previous one's write."""
    planned, in_flight = [], None
    for batch in batches:
        planned.append(consumer.plan(batch, [partition_of(r.event.customer_id) for r in batch], world.predictor,
                                     in_flight, consumer._write_epoch))
        in_flight = planned[-1].histories.pending
    for each in planned:
        consumer.write(each)


def assert_features_are_from_scratch(world: World, tenant: str, customer: str, as_of: datetime) -> None:
    stored = world.stored_features(tenant, customer)
    assert stored is not None, f"{customer} has no features"
    features, updated_at = stored
    assert updated_at == as_of
    assert features == compute_features(world.stored_history(tenant, customer), as_of)


def assert_cache_holds_the_stored_histories(world: World, tenant: str, cache: HistoryCache | None) -> None:
    if cache is None:
        return
    for (cached_tenant, customer), entry in list(cache._entries.items()):
        if cached_tenant != tenant:
            continue
        stored = sorted(world.stored_history(tenant, customer), key=lambda e: e.sort_key())
        assert entry.events == stored, f"the cache holds another history of {customer} than the database"


# --- random histories ------------------------------------------------------------------------


def _day(value: datetime) -> str:
    return value.date().isoformat()


@st.composite
def events(draw: st.DrawFn) -> tuple[str, str, datetime, dict[str, Any]]:
    """(customer, type, occurred_at, data): every type features read, coarse times (so events
    share instants and type ranks decide), some after the clock, some unusable data."""
    customer = f"c-{draw(st.integers(0, 4))}"
    at = BASE - timedelta(days=draw(st.integers(0, 500)), hours=draw(st.sampled_from([0, 0, 6, 12])))
    kind = draw(st.sampled_from([
        "order.completed", "order.refunded", "support.complaint", "support.ticket_opened",
        "support.ticket_resolved", "feedback.nps", "session.recorded", "subscription.started",
        "subscription.renewed", "subscription.cancellation_notice", "subscription.ended",
        "customer.profile_updated", "loyalty.points_earned",
    ]))
    money = {"amount": draw(st.sampled_from(["0", "9.99", "59.90", "120.5"])),
             "currency": draw(st.sampled_from(["EUR", "EUR", "USD"]))}
    ticket = draw(st.sampled_from(["t1", "t2", "t3"]))
    start = at.date() - timedelta(days=draw(st.integers(0, 30)))
    end = draw(st.one_of(st.none(), st.integers(-60, 400).map(lambda d: start + timedelta(days=d))))
    data: dict[str, Any] = {
        "order.completed": {"order_id": f"o-{draw(st.integers(0, 99))}", **money},
        "order.refunded": {"order_id": "o-1", **money},
        "support.complaint": {"severity": "high"},
        "support.ticket_opened": {"ticket_id": ticket},
        "support.ticket_resolved": {"ticket_id": ticket},
        "feedback.nps": {"score": draw(st.integers(0, 10))},
        "session.recorded": {"duration_seconds": 30},
        "subscription.started": {"contract_id": "k1", "plan": "plus", "price": "9.90", "currency": "EUR",
                                 "start_date": start.isoformat(), "end_date": end.isoformat() if end else None,
                                 "auto_renew": draw(st.booleans())},
        "subscription.cancellation_notice": {
            "contract_id": "k1", "notice_period_days": draw(st.integers(0, 90)),
            "effective_date": draw(st.one_of(st.none(), st.just(_day(at + timedelta(days=30)))))},
        "subscription.ended": {"contract_id": "k1", "end_date": _day(at)},
        "customer.profile_updated": {"signed_up_at": draw(st.one_of(
            st.none(), st.just((at - timedelta(days=draw(st.integers(0, 900)))).isoformat())))},
        "loyalty.points_earned": {"points": 5},
    }[kind.replace("renewed", "started")]
    return customer, kind, at, data


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    history = draw(st.lists(events(), min_size=1, max_size=40))
    arrival = draw(st.permutations(range(len(history))))
    # redeliveries: some events arrive again later (at-least-once)
    again = draw(st.lists(st.integers(0, len(history) - 1), max_size=6))
    deliveries = list(arrival) + again
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(deliveries) - 1)), max_size=6))))
    steps = []
    for _ in range(len(cuts) + 1):
        steps.append({
            "advance_h": draw(st.integers(0, 24 * 40)),
            "rebalance": draw(st.sampled_from([None, None, None, 0, 1, 2, "restart"])),
        })
    return {"history": history, "deliveries": deliveries, "cuts": cuts, "steps": steps,
            "cache_events": draw(st.sampled_from([0, 6, 25, 100_000])),
            "pipelined": draw(st.booleans()),
            "start": BASE - timedelta(days=draw(st.integers(0, 200)))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(scenario=scenarios())
def test_features_with_the_history_cache_are_compute_features_of_the_stored_history(
    world: World, scenario: dict[str, Any]
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:10]}"  # each example its own tenant in the one database
    clock = ManualClock(scenario["start"])
    consumer = world.consumer(scenario["cache_events"], clock)
    ids = [f"e-{i}" for i in range(len(scenario["history"]))]
    delivered = [record(tenant, c, kind, at, data, ids[i]) for i, (c, kind, at, data) in
                 ((i, scenario["history"][i]) for i in scenario["deliveries"])]
    bounds = [0, *scenario["cuts"], len(delivered)]
    seen: dict[str, dict[str, Any]] = {}
    for step, (lo, hi) in zip(scenario["steps"], zip(bounds, bounds[1:], strict=False), strict=False):
        batch = delivered[lo:hi]
        if not batch:
            continue
        clock.advance(timedelta(hours=step["advance_h"]))
        if consumer.cache is not None and step["rebalance"] == "restart":
            consumer.cache.clear()
        elif consumer.cache is not None and step["rebalance"] is not None:
            consumer.cache.partitions_revoked([step["rebalance"]])
            consumer.cache.partitions_assigned([step["rebalance"]])
        if scenario["pipelined"]:  # the batch in two halves, the second planned before the first is written
            plan_and_write(consumer, world, [part for part in (batch[: len(batch) // 2], batch[len(batch) // 2:])
                                             if part])
        else:
            process(consumer, world, batch)
        as_of = clock.now()
        for r in batch:
            seen.setdefault(r.event.customer_id, {}).setdefault(r.event.id, r.event)
        for customer in {r.event.customer_id for r in batch}:
            assert_features_are_from_scratch(world, tenant, customer, as_of)
            # ... which is also the features of exactly the events delivered so far, in any order
            assert world.stored_features(tenant, customer)[0] == compute_features(seen[customer].values(), as_of)
        assert_cache_holds_the_stored_histories(world, tenant, consumer.cache)
        if consumer.cache is not None:
            assert consumer.cache.events <= scenario["cache_events"]


# --- the cache is used, and each way a history changes elsewhere is seen ------------------------


def order(tenant: str, customer: str, days_ago: int, event_id: str | None = None) -> EventRecord:
    return record(tenant, customer, "order.completed", BASE - timedelta(days=days_ago),
                  {"order_id": f"o-{days_ago}", "amount": "10.00", "currency": "EUR"},
                  event_id or uuid.uuid4().hex)


def lookups(before: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
    """(hits, misses) of the consumer's history cache since `before`, from its metrics."""
    now = tuple(REGISTRY.get_sample_value("churnguard_scoring_history_cache_lookups_total", {"outcome": o}) or 0.0
                for o in ("hit", "miss"))
    return now[0] - before[0], now[1] - before[1]


def test_a_customer_seen_before_is_served_from_memory_with_the_same_features(world: World) -> None:
    tenant, clock = f"t-{uuid.uuid4().hex[:10]}", ManualClock(BASE)
    consumer = world.consumer(1000, clock)
    assert consumer.cache is not None
    before = lookups()
    process(consumer, world, [order(tenant, "c-1", 50), order(tenant, "c-1", 20)])
    assert lookups(before) == (0, 1)
    clock.advance(timedelta(days=3))
    before = lookups()
    process(consumer, world, [order(tenant, "c-1", 1), order(tenant, "c-2", 1)])
    assert lookups(before) == (1, 1)  # c-1 from memory, c-2 new
    assert_features_are_from_scratch(world, tenant, "c-1", clock.now())
    assert world.stored_features(tenant, "c-1")[0]["orders_90d"] == 3.0


def test_an_import_or_a_purge_elsewhere_makes_the_consumer_reread_the_tenants_histories(world: World) -> None:
    tenant, clock = f"t-{uuid.uuid4().hex[:10]}", ManualClock(BASE)
    consumer = world.consumer(1000, clock)
    assert consumer.cache is not None
    process(consumer, world, [order(tenant, "c-1", 400), order(tenant, "c-1", 10)])
    # a history import through another process (services.scoring.cli_ops): not the consumer's write
    with session_scope(world.engine) as session:
        service.store_history(session, tenant, [{
            "id": "imported-1", "type": "order.completed", "customer_id": "c-1", "source": "import",
            "occurred_at": (BASE - timedelta(days=5)).isoformat(),
            "data": {"order_id": "o-x", "amount": "99.00", "currency": "EUR"}}])
    process(consumer, world, [order(tenant, "c-1", 1)])
    assert_features_are_from_scratch(world, tenant, "c-1", clock.now())
    assert world.stored_features(tenant, "c-1")[0]["orders_30d"] == 3.0

    # the retention purge (in whichever instance holds its lease) deletes the 400-day-old order
    settings = ScoringSettings(database=DatabaseSettings(database_url=world.database_url),
                               history_retention_days=365)
    outcome = asyncio.run(HistoryPurger(settings, world.engine, clock).run_once())
    assert outcome.purged == {tenant: 1}
    process(consumer, world, [order(tenant, "c-1", 2)])
    assert_features_are_from_scratch(world, tenant, "c-1", clock.now())
    assert world.stored_features(tenant, "c-1")[0]["orders_365d"] == 4.0
    assert_cache_holds_the_stored_histories(world, tenant, consumer.cache)


def test_an_erasure_in_the_batch_drops_the_history_and_later_events_are_not_cached(world: World) -> None:
    tenant, clock = f"t-{uuid.uuid4().hex[:10]}", ManualClock(BASE)
    consumer = world.consumer(1000, clock)
    assert consumer.cache is not None
    process(consumer, world, [order(tenant, "c-1", 30), order(tenant, "c-2", 30)])
    gone = ErasureRecord(erasure_id="er-1", tenant_id=tenant, customer_id="c-1", requested_at=BASE)
    outcome = process(consumer, world, [order(tenant, "c-1", 3), gone, order(tenant, "c-1", 2), order(tenant, "c-2", 2)])
    assert {s.customer_id for s in outcome.scores} == {"c-2"}
    assert (tenant, "c-1") not in consumer.cache._entries
    assert world.stored_history(tenant, "c-1") == [] and world.stored_features(tenant, "c-1") is None
    process(consumer, world, [order(tenant, "c-1", 1)])  # suppressed: the tombstone stays
    assert world.stored_history(tenant, "c-1") == [] and (tenant, "c-1") not in consumer.cache._entries
    plan_and_write(consumer, world, [[order(tenant, "c-1", 1)]])  # computed beside a write: suppressed too
    assert world.stored_history(tenant, "c-1") == [] and (tenant, "c-1") not in consumer.cache._entries
    with session_scope(world.engine) as session:
        assert erasure.drop_erased(session, [order(tenant, "c-1", 1)])[1] == 1
    assert_features_are_from_scratch(world, tenant, "c-2", clock.now())


def test_a_batch_that_committed_while_its_partition_changed_hands_leaves_the_cache_alone() -> None:
    cache = HistoryCache(100)
    lease = cache.lease([1])
    cache.partitions_revoked([1])
    cache.partitions_assigned([1])  # and back: another member may have written meanwhile
    assert cache.apply(lease, {("t", "c-1"): (1, [])}) is False
    assert cache.customers == 0
    lease = cache.lease([1])
    cache.clear()  # the consumer was rebuilt
    assert cache.apply(lease, {("t", "c-1"): (1, [])}) is False
    lease = cache.lease([1])
    assert cache.apply(lease, {("t", "c-1"): (1, [])}) is True
    assert cache.get(("t", "c-1"), 1) == [] and cache.get(("t", "c-1"), 2) is None  # another partition: untrusted


def test_the_cache_keeps_at_most_its_bound_dropping_the_least_recently_used() -> None:
    def history(n: int) -> list[HistoryEvent]:
        return [HistoryEvent(type="session.recorded", occurred_at=BASE + timedelta(minutes=i), id=str(i))
                for i in range(n)]

    cache = HistoryCache(10)
    assert cache.apply(cache.lease([0]), {("t", "a"): (0, history(4)), ("t", "b"): (0, history(4))})
    assert cache.get(("t", "a"), 0) is not None  # a is now the most recently used
    assert cache.apply(cache.lease([0]), {("t", "c"): (0, history(4))})
    assert cache.events == 8 and cache.get(("t", "b"), 0) is None and cache.get(("t", "a"), 0) is not None
    assert cache.apply(cache.lease([0]), {("t", "huge"): (0, history(11))})  # larger than the bound: not kept
    assert cache.get(("t", "huge"), 0) is None and cache.events <= 10


def test_dates_in_the_future_of_the_clock_stay_in_the_history_but_not_in_the_features(world: World) -> None:
    tenant, clock = f"t-{uuid.uuid4().hex[:10]}", ManualClock(BASE - timedelta(days=10))
    consumer = world.consumer(1000, clock)
    process(consumer, world, [order(tenant, "c-1", 20), order(tenant, "c-1", 0)])  # the second: 10 days ahead
    assert world.stored_features(tenant, "c-1")[0]["orders_30d"] == 1.0
    clock.advance(timedelta(days=11))
    process(consumer, world, [record(tenant, "c-1", "session.recorded", BASE, {}, "s-1")])
    assert world.stored_features(tenant, "c-1")[0]["orders_30d"] == 2.0
    assert_features_are_from_scratch(world, tenant, "c-1", clock.now())


def test_a_batch_planned_on_a_write_that_fails_is_not_written_and_is_redone_in_one_transaction(world: World) -> None:
    tenant, clock = f"t-{uuid.uuid4().hex[:10]}", ManualClock(BASE)
    consumer = world.consumer(1000, clock)
    assert consumer.cache is not None
    process(consumer, world, [order(tenant, "c-1", 40)])
    first = [order(tenant, "c-1", 20, "e-20"), order(tenant, "c-2", 20)]
    second = [order(tenant, "c-1", 10), order(tenant, "c-3", 10)]
    in_flight = consumer.plan(first, [partition_of("c-1"), partition_of("c-2")], world.predictor, None, 0)
    on_top = consumer.plan(second, [partition_of("c-1"), partition_of("c-3")], world.predictor,
                           in_flight.histories.pending, 0)
    assert on_top.plan.features[tenant]["c-1"]["orders_30d"] == 2.0  # sees the batch in flight
    # meanwhile someone else stores one of the first batch's events (not through the consumer)
    with session_scope(world.engine) as session:
        repository.insert_events(session, [in_flight.plan.rows[0]])
    with pytest.raises(HistoryMismatch):
        consumer.write(in_flight)
    with pytest.raises(EarlierWriteFailed):
        consumer.write(on_top)
    assert [e.id for e in world.stored_history(tenant, "c-3")] == []  # nothing of the second batch
    assert consumer._careful and consumer.cache.customers == 0  # the cache was wrong: dropped
    # the consume loop rewinds; the batches are redone in one transaction each, after the writes before
    for batch in (first, second):
        consumer._process_in_turn(batch, [partition_of(r.event.customer_id) for r in batch], world.predictor,
                                  consumer._write_epoch)
    assert not consumer._careful  # a batch went through: the next ones are pipelined again
    for customer in ("c-1", "c-2", "c-3"):
        assert_features_are_from_scratch(world, tenant, customer, clock.now())
    assert world.stored_features(tenant, "c-1")[0]["orders_30d"] == 2.0
    assert_cache_holds_the_stored_histories(world, tenant, consumer.cache)


def test_a_purge_while_a_batch_is_in_flight_keeps_its_stale_histories_out_of_the_cache(world: World) -> None:
    tenant, clock = f"t-{uuid.uuid4().hex[:10]}", ManualClock(BASE)
    consumer = world.consumer(1000, clock)
    assert consumer.cache is not None
    process(consumer, world, [order(tenant, "c-1", 400)])
    in_flight = consumer.plan([order(tenant, "c-1", 5)], [partition_of("c-1")], world.predictor, None, 0)
    settings = ScoringSettings(database=DatabaseSettings(database_url=world.database_url),
                               history_retention_days=365)
    assert asyncio.run(HistoryPurger(settings, world.engine, clock).run_once()).purged == {tenant: 1}
    # the next batch is planned while the one in flight is written, and sees the purge: it waits for
    # that write and reads the database; the history in flight (with the purged order) stays out
    # of the cache
    with ThreadPoolExecutor(max_workers=1) as writer:
        writing = writer.submit(consumer.write, in_flight)
        on_top = consumer.plan([order(tenant, "c-1", 1)], [partition_of("c-1")], world.predictor,
                               in_flight.histories.pending, 0, writing)
        writing.result()
    consumer.write(on_top)
    assert_features_are_from_scratch(world, tenant, "c-1", clock.now())
    assert world.stored_features(tenant, "c-1")[0]["orders_365d"] == 2.0
    assert_cache_holds_the_stored_histories(world, tenant, consumer.cache)
