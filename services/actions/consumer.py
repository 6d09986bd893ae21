"""Kafka transport of the actions service.

churn-scores -> decide (one transaction per batch) -> wake the webhook worker -> publish
ActionRecords on retention-actions -> commit.
customer-events (its own consumer group) -> fold each event into the customer state, and for a
recent cancellation notice, complaint or feedback answer decide at once, in the same
transaction -> wake the worker -> publish -> commit.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from services.actions import customers, metrics, service
from services.actions.policies import OFFER_CREATED
from services.actions.service import DecisionResult, Rules, TriggerInput
from services.actions.tables import ActionsCustomer, ActionsDecision
from shared.clock import Clock
from shared.db import session_scope
from shared.events import (
    CustomerRecord,
    ErasureRecord,
    EventRecord,
    ScoreRecord,
    broken_invariant,
    decode_customer_record,
    erasures_done,
    keyed_json,
)
from shared.kafka import ConsumeLoop, Decoded, FollowUp, Publisher, Unprocessable
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS, ERASURE_STATUS, RETENTION_ACTIONS


# The longest model version actions can store (its decisions and customers keep it); scoring's
# registry never names a model longer than 64 characters.
MODEL_VERSION_MAX = min(ActionsDecision.__table__.c.model_version.type.length,  # type: ignore[attr-defined]
                        ActionsCustomer.__table__.c.last_model_version.type.length)  # type: ignore[attr-defined]


def decode_score(raw: bytes) -> ScoreRecord:
    return ScoreRecord.model_validate_json(raw)


def check_score(score: ScoreRecord) -> None:
    """A score scoring could not have published: refused with the reason, instead of failing
    against the database (PostgreSQL refuses the value; SQLite would keep it whole)."""
    if len(score.model_version) > MODEL_VERSION_MAX:
        raise Unprocessable(
            f"model_version is {len(score.model_version)} characters; actions stores at most "
            f"{MODEL_VERSION_MAX} and scoring's registry never names a model longer than 64"
        )


def decode_event(raw: bytes) -> CustomerRecord:
    """An event, or an erasure control record."""
    return decode_customer_record(raw)


def check_event(record: CustomerRecord) -> None:
    """An event ingest could not have published (shared.events.broken_invariant) is not folded
    into the customer state: a future occurred_at would pin the customer's last activity, consent
    or contract there, since an older event never overwrites a newer one."""
    if isinstance(record, EventRecord) and (problem := broken_invariant(record)):
        raise Unprocessable(problem)


def count_decisions(results: Sequence[DecisionResult]) -> None:
    """Count committed facts only, once (a redelivered trigger is not counted again)."""
    for result in results:
        if not result.stored:
            metrics.ERASED_SUPPRESSED.labels("trigger").inc()
        if not result.created:
            continue
        record = result.record
        metrics.DECISIONS.labels(record.policy or "none", record.outcome, record.reason).inc()
        metrics.TRIGGERS.labels(record.trigger).inc()
        if record.outcome == OFFER_CREATED:
            metrics.OFFERS_CREATED.labels(record.policy or "none").inc()


async def publish_decisions(
    publisher: Publisher, results: Sequence[DecisionResult], on_deliveries: Callable[[], None]
) -> None:
    if any(r.deliveries for r in results):
        on_deliveries()
    results = [r for r in results if r.stored]  # an erased customer's suppression stays unsaid
    if results:
        # After the commit. A crash before this line re-decides nothing on redelivery but
        # re-publishes the stored decisions, so retention-actions is at-least-once too.
        await publisher.publish_many(RETENTION_ACTIONS, keyed_json(r.record for r in results))


class _Consumer:
    """What both consumers share: the wiring, and a ConsumeLoop on their topic whose batches go
    to `_handle_all` (in a thread: one database transaction) and then are published (the
    batch's follow-up: the loop publishes it while it handles the next batch)."""

    topic = ""

    def __init__(
        self,
        *,
        settings: KafkaSettings,
        group_id: str,
        client_id: str,
        engine: Engine,
        publisher: Publisher,
        rules: Rules,
        clock: Clock,
        on_deliveries: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._rules = rules
        self._clock = clock
        self._on_deliveries = on_deliveries
        self.loop: ConsumeLoop[Any] = ConsumeLoop(
            settings=settings,
            topic=self.topic,
            group_id=group_id,
            client_id=client_id,
            decode=self.decode,
            check=self.check,
            handle=self.handle,
            publisher=publisher,
            on_dead_letter=lambda topic, reason: metrics.DEAD_LETTERS.labels(reason).inc(),
            on_batch=metrics.CONSUMER.on_batch,
            # One transaction (and one publish, one commit) per fetch rather than per partition:
            # the decisions are set-based, so the bigger batch costs little more than a small one.
            whole_poll=True,
        )

    @staticmethod
    def decode(raw: bytes) -> Any:
        raise NotImplementedError

    @staticmethod
    def check(value: Any) -> None:
        """Raises Unprocessable for a decoded record its producer could not have written."""

    async def handle(self, batch: list[Decoded[Any]]) -> FollowUp:
        results = await asyncio.to_thread(self._handle_all, [item.value for item in batch])
        return functools.partial(publish_decisions, self._publisher, results, self._on_deliveries)

    def _handle_all(self, values: list[Any]) -> list[DecisionResult]:
        raise NotImplementedError


def decide_scores(
    engine: Engine, scores: Sequence[ScoreRecord], rules: Rules, clock: Clock
) -> list[DecisionResult]:
    """A batch of scores in one transaction, decided set-based (service.decide_many). If any
    score of the batch fails, nothing of it is committed and the consume loop retries the
    scores one by one (each then in its own transaction)."""
    with session_scope(engine) as session:
        results = service.decide_many(session, scores, rules, clock.now())
    count_decisions(results)
    return results


def apply_events(
    engine: Engine,
    records: Sequence[CustomerRecord],
    rules: Rules,
    clock: Clock,
    trigger_max_age: timedelta,
) -> tuple[list[DecisionResult], list[ErasureRecord]]:
    """A batch of customer events in one transaction: the events between two erasure records
    are folded into the customer state together (customers.fold_events), then the triggers
    they raised are decided together (service.decide_many), then the erasure is applied. So
    a trigger is decided knowing everything its batch says about the customer up to the next
    erasure (a consent withdrawal right after a complaint, say)."""
    results: list[DecisionResult] = []
    erased: list[ErasureRecord] = []
    suppressed: list[bool] = []
    with session_scope(engine) as session:  # one transaction per batch, as for scores
        segment: list[EventRecord] = []

        def flush_segment() -> None:
            if not segment:
                return
            now = clock.now()
            folded = customers.fold_events(session, segment, now, trigger_max_age)
            suppressed.extend(f.suppressed for f in folded)
            triggers = [
                TriggerInput(
                    raised.trigger,
                    raised.tenant_id,
                    raised.customer_id,
                    service.trigger_id(raised.trigger, raised.tenant_id, raised.event_id),
                )
                for raised in (f.trigger for f in folded)
                if raised is not None
            ]
            results.extend(service.decide_many(session, triggers, rules, now))
            segment.clear()

        for record in records:
            if isinstance(record, ErasureRecord):
                flush_segment()
                service.mark_erased(session, record.tenant_id, record.customer_id, clock.now())
                erased.append(record)
            else:
                segment.append(record)
        flush_segment()
    events = [record for record in records if not isinstance(record, ErasureRecord)]
    for record, was_suppressed in zip(events, suppressed, strict=True):
        if was_suppressed:
            metrics.ERASED_SUPPRESSED.labels("event").inc()
        else:
            metrics.CUSTOMER_EVENTS.labels(record.event.type).inc()
    count_decisions(results)
    if erased:
        # decisions of this batch about customers erased later in it are deleted already
        gone = {(r.tenant_id, r.customer_id) for r in erased}
        results = [r for r in results if (r.record.tenant_id, r.record.customer_id) not in gone]
    return results, erased


class ScoreConsumer(_Consumer):
    topic = CHURN_SCORES
    decode = staticmethod(decode_score)
    check = staticmethod(check_score)

    def _handle_all(self, scores: list[ScoreRecord]) -> list[DecisionResult]:
        return decide_scores(self._engine, scores, self._rules, self._clock)


class EventConsumer(_Consumer):
    """customer-events -> customer state (+ decisions on event triggers); an erasure control
    record erases the customer (and is reported on erasure-status after the commit)."""

    topic = CUSTOMER_EVENTS
    decode = staticmethod(decode_event)
    check = staticmethod(check_event)

    def __init__(self, *, trigger_max_age: timedelta, **wiring: Any) -> None:
        super().__init__(**wiring)
        self._trigger_max_age = trigger_max_age

    async def handle(self, batch: list[Decoded[CustomerRecord]]) -> FollowUp:
        results, erased = await asyncio.to_thread(self._apply_all, [item.value for item in batch])
        return functools.partial(self._publish, results, erased)

    async def _publish(self, results: list[DecisionResult], erased: list[ErasureRecord]) -> None:
        await publish_decisions(self._publisher, results, self._on_deliveries)
        if erased:  # after the commit: ingest marks actions' part of each erasure done
            await self._publisher.publish_many(ERASURE_STATUS, erasures_done(erased, "actions", self._clock.now()))
            metrics.ERASURES.inc(len(erased))

    def _apply_all(self, records: list[CustomerRecord]) -> tuple[list[DecisionResult], list[ErasureRecord]]:
        return apply_events(self._engine, records, self._rules, self._clock, self._trigger_max_age)
