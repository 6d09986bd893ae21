"""The periodic re-score sweep: time alone moves risk (inactivity grows, a contract end nears).

Every `sweep_interval_s` one instance (the holder of a row lease in `scoring_sweep_leases`)
re-computes every scored customer's features from their stored history as of the clock's
now, scores them in pages of `sweep_batch` customers (one transaction and one vectorized
predict per page, off the event loop), and for those whose probability moved by more than
`sweep_delta` since their latest score, or whose band changed, stores the new score and
features and publishes a ScoreRecord with cause="sweep". Its score_id is deterministic from
tenant + customer + the sweep's time bucket, so a repeated round in the same bucket (a retry
after a failed publish, a second instance) publishes the same id and is deduplicated downstream.

Several instances: a lease row (name "sweep", holder, expires_at) taken with one conditional
UPDATE (free, expired or already ours); the holder renews it every round, a stopping holder
releases it, a crashed holder's lease expires after 1.5 intervals and another instance takes over.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from services.scoring import metrics, reasons, repository
from services.scoring.config import ScoringSettings
from services.scoring.features import compute_features
from services.scoring.model import Predictor
from services.scoring.service import Bands
from shared import leases
from shared.clock import Clock
from shared.db import session_scope
from shared.events import ScoreRecord, keyed_json
from shared.kafka import Publisher
from shared.topics import CHURN_SCORES

log = logging.getLogger(__name__)

LEASE_NAME = "sweep"
_SWEEP_NAMESPACE = uuid.UUID("5d0c6a53-2f8e-4b7a-9a61-1c3e8f2b7d40")


def time_bucket(now: datetime, interval_s: float) -> int:
    """Which sweep round `now` belongs to (rounds are `interval_s` wide, from the epoch)."""
    return int(now.timestamp() // interval_s)


def sweep_score_id(tenant_id: str, customer_id: str, bucket: int) -> str:
    """Deterministic per tenant + customer + round: a repeated round publishes the same id."""
    return uuid.uuid5(_SWEEP_NAMESPACE, f"{tenant_id}/{customer_id}/sweep/{bucket}").hex


def moved(probability: float, band: str, previous: tuple[str, float, str] | None, delta: float) -> bool:
    """Worth publishing: no earlier score, the probability moved by more than `delta`, or the band changed."""
    if previous is None:
        return True
    _, old_probability, old_band = previous
    return abs(probability - old_probability) > delta or band != old_band


def sweep_page(
    session: Session, tenant_id: str, customers: Sequence[str], predictor: Predictor, bands: Bands,
    now: datetime, bucket: int, delta: float,
) -> list[ScoreRecord]:
    """Re-score some customers of one tenant as of `now`; store and return the scores worth
    publishing (the caller publishes after the commit)."""
    histories = repository.load_histories(session, tenant_id, customers)
    vectors = [compute_features(histories.get(customer, []), now) for customer in customers]
    probabilities = predictor.predict(vectors)
    previous = repository.recent_scores(session, tenant_id, customers, per_customer=2)
    changed: list[tuple[str, str, float, dict[str, float]]] = []
    for customer, probability, vector in zip(customers, probabilities, vectors, strict=True):
        score_id = sweep_score_id(tenant_id, customer, bucket)
        # compare with the latest score that is not this round's own (a repeated round)
        baseline = next((s for s in previous.get(customer, []) if s[0] != score_id), None)
        if moved(probability, bands.band(probability), baseline, delta):
            changed.append((customer, score_id, probability, vector))
    if changed:
        # Only customers whose features row still exists (locked until the commit): a customer
        # erased since this page was read is neither re-created nor scored.
        present = repository.lock_features(session, tenant_id, [c[0] for c in changed])
        changed = [c for c in changed if c[0] in present]
    why = reasons.explain_scores(predictor, [c[3] for c in changed], [c[2] for c in changed]) if changed else []
    scores = [
        ScoreRecord(
            score_id=score_id, tenant_id=tenant_id, customer_id=customer, probability=probability,
            band=bands.band(probability), model_version=predictor.version, scored_at=now, cause="sweep",
            event_id=None, features=vector, reasons=texts,
        )
        for (customer, score_id, probability, vector), texts in zip(changed, why, strict=True)
    ]
    repository.upsert_features(session, tenant_id, {s.customer_id: s.features for s in scores}, now)
    repository.upsert_scores(session, [
        {
            "score_id": s.score_id, "tenant_id": s.tenant_id, "customer_id": s.customer_id,
            "probability": s.probability, "band": s.band, "model_version": s.model_version,
            "scored_at": s.scored_at, "event_id": None, "reasons": s.reasons,
        }
        for s in scores
    ])
    return scores


@dataclass
class SweepOutcome:
    skipped: str | None = None  # "no model", "lease held elsewhere", "stopping"
    rescored: int = 0
    published: list[ScoreRecord] = field(default_factory=list)


class Sweeper(leases.LeasedRounds):
    """Runs sweep rounds every `settings.sweep_interval_s` in the background (`start`/`stop`);
    tests call `run_once()` directly and move a ManualClock."""

    name = "scoring:sweep"

    def __init__(
        self, settings: ScoringSettings, engine: Engine, publisher: Publisher, clock: Clock,
        predictor: Callable[[], Predictor | None], holder: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.clock = clock
        self.predictor = predictor
        self.holder = holder or f"{settings.client_id}-{uuid.uuid4().hex[:12]}"
        self.bands = Bands(high=settings.high_threshold, medium=settings.medium_threshold)
        super().__init__(settings.sweep_interval_s)

    # -- one round ---------------------------------------------------------------------

    async def run_once(self) -> SweepOutcome:
        predictor = self.predictor()
        if predictor is None:
            metrics.SWEEP_ROUNDS.labels("skipped").inc()
            return SweepOutcome(skipped="no model")
        now = self.clock.now()
        if not await asyncio.to_thread(self._acquire, now):
            metrics.SWEEP_ROUNDS.labels("skipped").inc()
            return SweepOutcome(skipped="lease held elsewhere")
        outcome = SweepOutcome()
        bucket = time_bucket(now, self.settings.sweep_interval_s)
        try:
            for tenant_id in await asyncio.to_thread(self._tenants):
                after: str | None = None
                while True:
                    if self.stopping:
                        outcome.skipped = "stopping"
                        return outcome
                    customers, scores = await asyncio.to_thread(
                        self._page, tenant_id, after, predictor, now, bucket
                    )
                    if scores:  # after the commit
                        await self.publisher.publish_many(CHURN_SCORES, keyed_json(scores))
                    outcome.rescored += len(customers)
                    outcome.published.extend(scores)
                    metrics.SWEEP_RESCORED.inc(len(customers))
                    metrics.SWEEP_PUBLISHED.inc(len(scores))
                    for score in scores:
                        metrics.SCORES_PUBLISHED.labels(score.band).inc()
                    if len(customers) < self.settings.sweep_batch:
                        break
                    after = customers[-1]
        except Exception:
            metrics.SWEEP_ROUNDS.labels("failed").inc()
            raise
        metrics.SWEEP_ROUNDS.labels("done").inc()
        log.info("sweep: %d customers re-scored, %d scores published", outcome.rescored, len(outcome.published))
        return outcome

    def _acquire(self, now: datetime) -> bool:
        expires = now + timedelta(seconds=1.5 * self.settings.sweep_interval_s)
        with session_scope(self.engine) as session:
            return repository.acquire_lease(session, LEASE_NAME, self.holder, now, expires)

    def release_lease(self) -> None:
        with session_scope(self.engine) as session:
            repository.release_lease(session, LEASE_NAME, self.holder, self.clock.now())

    def _tenants(self) -> list[str]:
        with session_scope(self.engine) as session:
            return repository.feature_tenants(session)

    def _page(
        self, tenant_id: str, after: str | None, predictor: Predictor, now: datetime, bucket: int
    ) -> tuple[list[str], list[ScoreRecord]]:
        with session_scope(self.engine) as session:
            customers = repository.sweep_candidates(session, tenant_id, after, self.settings.sweep_batch)
            if not customers:
                return [], []
            return customers, sweep_page(
                session, tenant_id, customers, predictor, self.bands, now, bucket, self.settings.sweep_delta
            )

