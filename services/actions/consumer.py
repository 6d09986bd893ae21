"""Kafka transport of the actions service: churn-scores -> decide (one transaction per score)
-> wake the webhook worker -> publish ActionRecords on retention-actions -> commit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sqlalchemy import Engine

from services.actions import metrics, service
from services.actions.policies import OFFER_CREATED, Policy
from services.actions.service import DecisionResult
from shared.clock import Clock
from shared.db import session_scope
from shared.events import ScoreRecord
from shared.kafka import ConsumeLoop, Decoded, Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, RETENTION_ACTIONS


def decode_score(raw: bytes) -> ScoreRecord:
    return ScoreRecord.model_validate_json(raw)


class ScoreConsumer:
    def __init__(
        self,
        *,
        settings: KafkaSettings,
        group_id: str,
        client_id: str,
        engine: Engine,
        publisher: Publisher,
        policy: Policy,
        clock: Clock,
        on_deliveries: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._policy = policy
        self._clock = clock
        self._on_deliveries = on_deliveries
        self.loop: ConsumeLoop[ScoreRecord] = ConsumeLoop(
            settings=settings,
            topic=CHURN_SCORES,
            group_id=group_id,
            client_id=client_id,
            decode=decode_score,
            handle=self.handle,
            publisher=publisher,
            on_dead_letter=lambda _topic, reason: metrics.DEAD_LETTERS.labels(reason).inc(),
        )

    async def handle(self, batch: list[Decoded[ScoreRecord]]) -> None:
        results = await asyncio.to_thread(self._decide_all, [item.value for item in batch])
        if any(r.deliveries for r in results):
            self._on_deliveries()
        # After the commit. A crash before this line re-decides nothing on redelivery but
        # re-publishes the stored decisions, so retention-actions is at-least-once too.
        await self._publisher.publish_many(
            RETENTION_ACTIONS,
            [(r.record.key, r.record.model_dump_json().encode()) for r in results],
        )

    def _decide_all(self, scores: list[ScoreRecord]) -> list[DecisionResult]:
        results = []
        for score in scores:
            with session_scope(self._engine) as session:
                result = service.decide(session, score, self._policy, self._clock.now())
            results.append(result)
            if result.created:  # count committed facts only, once
                record = result.record
                metrics.DECISIONS.labels(
                    record.policy or "none", record.outcome, record.reason
                ).inc()
                if record.outcome == OFFER_CREATED:
                    metrics.OFFERS_CREATED.labels(record.policy or "none").inc()
        return results
