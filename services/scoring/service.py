"""Scoring's business logic: store events, recompute features, score, train, register.

No FastAPI, no aiokafka here; the caller (consumer, route, CLI) owns the transaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlmodel import Session

from services.scoring import repository
from services.scoring.features import FEATURE_NAMES, as_utc, compute_features
from services.scoring.model import Predictor, TrainedModel, TrainReport, dump_artifact, load_artifact, train
from services.scoring.tables import ScoringModel
from shared.clock import Clock
from shared.events import EventRecord, RiskBand, ScoreRecord, parse_event

log = logging.getLogger(__name__)

_SCORE_NAMESPACE = uuid.UUID("0b7f2d84-5c1e-4f0e-8a53-2b9c4b1f6e27")


@dataclass(frozen=True)
class Bands:
    high: float = 0.6
    medium: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.medium < self.high <= 1.0:
            raise ValueError("need 0 <= medium threshold < high threshold <= 1")

    def band(self, probability: float) -> RiskBand:
        if probability >= self.high:
            return "high"
        if probability >= self.medium:
            return "medium"
        return "low"


def score_id_for(tenant_id: str, event_id: str) -> str:
    """Deterministic: a redelivered event gets the same score_id, and consumers dedup on it."""
    return uuid.uuid5(_SCORE_NAMESPACE, f"{tenant_id}/{event_id}").hex


@dataclass
class BatchOutcome:
    scores: list[ScoreRecord]
    events_by_type: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    scoring_seconds: float = 0.0


def _event_row(record: EventRecord) -> dict[str, Any]:
    event = record.event
    return {
        "tenant_id": record.tenant_id, "event_id": event.id, "customer_id": event.customer_id,
        "type": event.type, "occurred_at": event.occurred_at, "received_at": record.received_at,
        "payload": event.data.model_dump(mode="json"),
    }


def process_batch(
    session: Session, records: Sequence[EventRecord], predictor: Predictor, bands: Bands, as_of: datetime
) -> BatchOutcome:
    """Store the events (insert-if-absent), recompute the affected customers' features from
    their history as of `as_of`, score them, store features and scores. Returns one score
    per distinct event; a duplicate event is re-scored under its original score_id."""
    distinct: dict[tuple[str, str], EventRecord] = {}
    for record in records:
        distinct.setdefault((record.tenant_id, record.event.id), record)
    inserted = repository.insert_events(session, [_event_row(r) for r in distinct.values()])
    outcome = BatchOutcome(
        scores=[],
        events_by_type=Counter(r.event.type for r in records),
        duplicates=len(records) - len(inserted),
    )

    affected: dict[str, set[str]] = defaultdict(set)
    for (tenant_id, _), record in distinct.items():
        affected[tenant_id].add(record.event.customer_id)

    started = time.perf_counter()
    keys: list[tuple[str, str]] = []
    vectors: list[dict[str, float]] = []
    for tenant_id, customers in sorted(affected.items()):
        histories = repository.load_histories(session, tenant_id, customers)
        for customer in sorted(customers):
            keys.append((tenant_id, customer))
            vectors.append(compute_features(histories.get(customer, []), as_of))
    probabilities = predictor.predict(vectors)
    outcome.scoring_seconds = time.perf_counter() - started
    scored = {key: (p, v) for key, p, v in zip(keys, probabilities, vectors, strict=True)}

    for tenant_id, customers in affected.items():
        repository.upsert_features(session, tenant_id, {c: scored[(tenant_id, c)][1] for c in customers}, as_of)
    for (tenant_id, event_id), record in distinct.items():
        probability, vector = scored[(tenant_id, record.event.customer_id)]
        outcome.scores.append(ScoreRecord(
            score_id=score_id_for(tenant_id, event_id), tenant_id=tenant_id,
            customer_id=record.event.customer_id, probability=probability, band=bands.band(probability),
            model_version=predictor.version, scored_at=as_of, cause="event", event_id=event_id,
            features=vector,
        ))
    repository.upsert_scores(session, [
        {
            "score_id": s.score_id, "tenant_id": s.tenant_id, "customer_id": s.customer_id,
            "probability": s.probability, "band": s.band, "model_version": s.model_version,
            "scored_at": s.scored_at, "event_id": s.event_id,
        }
        for s in outcome.scores
    ])
    return outcome


@dataclass(frozen=True)
class CustomerScore:
    customer_id: str
    probability: float
    band: str
    model_version: str
    scored_at: datetime
    score_id: str
    event_id: str | None
    features: dict[str, float]


def latest_score(session: Session, tenant_id: str, customer_id: str) -> CustomerScore | None:
    score = repository.latest_score(session, tenant_id, customer_id)
    if score is None:
        return None
    features = repository.customer_features(session, tenant_id, customer_id)
    return CustomerScore(
        customer_id=score.customer_id, probability=score.probability, band=score.band,
        model_version=score.model_version, scored_at=as_utc(score.scored_at), score_id=score.score_id,
        event_id=score.event_id, features=dict(features.features) if features else {},
    )


# --- history import (simulation, backfill) -------------------------------------------


def store_history(
    session: Session, tenant_id: str, events: Iterable[Mapping[str, Any]], received_at: datetime | None = None,
    *, chunk: int = 2000,
) -> int:
    """Validate events (shared.events contract) and store them in the scoring history,
    insert-if-absent (an id already stored for the tenant changes nothing). `received_at`
    defaults to each event's occurred_at. Returns the number of events seen."""
    seen = 0
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        repository.import_events(session, rows)
        rows.clear()

    for raw in events:
        event = parse_event(raw)
        rows.append({
            "tenant_id": tenant_id, "event_id": event.id, "customer_id": event.customer_id,
            "type": event.type, "occurred_at": event.occurred_at,
            "received_at": received_at or event.occurred_at, "payload": event.data.model_dump(mode="json"),
        })
        seen += 1
        if len(rows) >= chunk:
            flush()
    flush()
    return seen


# --- models -----------------------------------------------------------------------------


def train_for_tenant(
    session: Session, tenant_id: str, horizon_days: int = 90, *, clock: Clock | None = None, **options: Any
) -> TrainedModel:
    histories = repository.load_tenant_history(session, tenant_id)
    return train(histories, horizon_days, clock=clock, **options)


def register_model(session: Session, trained: TrainedModel, tenant_id: str, activate: bool) -> TrainReport:
    report = trained.report
    repository.add_model(session, ScoringModel(
        version=report.version, algorithm=report.algorithm, roc_auc=report.roc_auc,
        baseline_auc=report.baseline_auc, feature_names=list(report.feature_names), n_train=report.n_train,
        n_holdout=report.n_holdout, horizon_days=report.horizon_days, trained_on_tenant=tenant_id,
        trained_at=report.trained_at, active=activate, artifact=dump_artifact(trained.estimator),
    ))
    return replace(report, activated=activate)


def active_version(session: Session) -> str | None:
    return repository.active_model_version(session)


def load_active_predictor(session: Session) -> Predictor | None:
    row = repository.active_model(session)
    if row is None:
        return None
    unknown = sorted(set(row.feature_names) - set(FEATURE_NAMES))
    if unknown:
        raise ValueError(f"model {row.version} needs features this code does not compute: {', '.join(unknown)}")
    return Predictor(
        version=row.version, feature_names=tuple(row.feature_names),
        estimator=load_artifact(row.artifact), roc_auc=row.roc_auc,
    )


def list_models(session: Session) -> list[dict[str, Any]]:
    return [{**row, "trained_at": as_utc(row["trained_at"])} for row in repository.list_models(session)]


def activate_model(session: Session, version: str) -> bool:
    return repository.activate_model(session, version)
