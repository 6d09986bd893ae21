"""Scoring's business logic: store events, recompute features, score, train, register.

No FastAPI, no aiokafka here; the caller (consumer, route, CLI) owns the transaction.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlmodel import Session

from services.scoring import reasons, repository
from services.scoring.features import (
    FLAGGABLE_TYPES,
    MAIN_CURRENCY,
    HistoryEvent,
    as_utc,
    event_flags,
    features_as_of,
    with_events,
)
from services.scoring.history_cache import BatchHistories
from services.scoring.model import (
    ModelLoadError,
    Predictor,
    TrainedModel,
    TrainReport,
    ValidationData,
    dump_artifact,
    load_predictor,
    serving_arrays,
    train,
)
from services.scoring.serving import ServingModel
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


_SCORE_NAMESPACE_BYTES = _SCORE_NAMESPACE.bytes


def score_id_for(tenant_id: str, event_id: str) -> str:
    """Deterministic: a redelivered event gets the same score_id, and consumers dedup on it.

    uuid.uuid5(_SCORE_NAMESPACE, "tenant/event").hex, computed as uuid5 does (SHA-1 of namespace
    and name, first 16 bytes, version 5 and RFC 4122 variant bits) without building the UUID
    object: a third of the cost, once per scored event."""
    digest = bytearray(hashlib.sha1(_SCORE_NAMESPACE_BYTES + f"{tenant_id}/{event_id}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    return digest.hex()


@dataclass
class BatchOutcome:
    scores: list[ScoreRecord]
    events_by_type: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    scoring_seconds: float = 0.0
    suppressed: int = 0  # events of erased customers (services.scoring.erasure)


def _event_row(record: EventRecord) -> dict[str, Any]:
    event = record.event
    return {
        "tenant_id": record.tenant_id, "event_id": event.id, "customer_id": event.customer_id,
        "type": event.type, "occurred_at": as_utc(event.occurred_at), "received_at": as_utc(record.received_at),
        "payload": event.data.model_dump(mode="json"),
    }


def _history_event(row: Mapping[str, Any]) -> HistoryEvent:
    """The stored row as load_histories would read it back."""
    return HistoryEvent(type=row["type"], occurred_at=row["occurred_at"], data=row["payload"], id=row["event_id"])


@dataclass
class BatchPlan:
    """What a batch of events produces, computed before any of it is written (plan_batch):
    the event rows to store, which of them are new to the stored history, the customers'
    features and the scores. write_batch stores the features and scores."""

    rows: list[dict[str, Any]]  # one per distinct (tenant, event id)
    new: set[tuple[str, str]]  # (tenant_id, event_id) of the rows the stored history lacks
    features: dict[str, dict[str, dict[str, float]]]  # tenant -> customer -> vector
    as_of: datetime
    outcome: BatchOutcome


def plan_batch(
    session: Session, records: Sequence[EventRecord], predictor: Predictor, bands: Bands, as_of: datetime,
    *, histories: BatchHistories | None = None, partitions: Sequence[int] | None = None, store_first: bool = False,
) -> BatchPlan:
    """Recompute the affected customers' features from their history as of `as_of` and score
    them: one score per distinct event; a duplicate event is re-scored under its original
    score_id.

    A customer's history comes from `histories` (the consumer's cache and the batch in flight,
    by the partition the record came on: `partitions`, parallel to `records`), or else from
    the database; either way it is the stored history, and the features are
    compute_features(stored history + this batch's new events, as_of). The histories used are
    left in `histories` for the caller to keep once the batch is committed.

    `store_first`: insert the events first (insert-if-absent), and the database says which are
    new. Otherwise nothing is written, and an event is new when its customer's stored history
    does not hold its id; the caller stores `rows` later and checks that the database agrees."""
    histories = histories if histories is not None else BatchHistories()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    partition_of: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        key = (record.tenant_id, record.event.id)
        if key not in rows:
            rows[key] = _event_row(record)
        partition_of.setdefault((record.tenant_id, record.event.customer_id), partitions[i] if partitions else -1)
    inserted = repository.insert_events(session, list(rows.values())) if store_first else None

    started = time.perf_counter()
    customers = sorted(partition_of)
    stored: dict[tuple[str, str], list[HistoryEvent]] = {}
    missing: dict[str, list[str]] = defaultdict(list)
    for key in customers:
        cached = histories.get(key, partition_of[key])
        if cached is None:
            missing[key[0]].append(key[1])
        else:
            stored[key] = cached
    for tenant_id, ids in missing.items():
        loaded = repository.load_histories(session, tenant_id, ids)
        for customer in ids:
            stored[(tenant_id, customer)] = sorted(loaded.get(customer, []), key=HistoryEvent.sort_key)
    # histories read from the database after store_first's insert already hold the batch's events
    holds_batch = {(t, c) for t, ids in missing.items() for c in ids} if store_first else set()
    if inserted is None:
        inserted = set()
        stored_ids: dict[tuple[str, str], set[str]] = {}
        for key, row in rows.items():
            owner = (row["tenant_id"], row["customer_id"])
            ids_of_owner = stored_ids.get(owner)
            if ids_of_owner is None:
                ids_of_owner = stored_ids[owner] = {event.id for event in stored[owner]}
            if row["event_id"] not in ids_of_owner:
                inserted.add(key)
    new_events: dict[tuple[str, str], list[HistoryEvent]] = defaultdict(list)
    for key in inserted:
        row = rows[key]
        owner = (row["tenant_id"], row["customer_id"])
        if owner not in holds_batch:
            new_events[owner].append(_history_event(row))

    vectors: list[dict[str, float]] = []
    for key in customers:
        current = stored[key]
        if key in new_events:
            current = with_events(current, new_events[key])
        histories.put(key, partition_of[key], current)
        vectors.append(features_as_of(current, as_of))
    # one model call for the scores and their reasons (= predictor.predict, then reasons.explain)
    probabilities, explanations = reasons.score_and_explain(
        predictor.estimator, predictor.feature_names, vectors, reference=reasons.reference_of(predictor))
    outcome = BatchOutcome(
        scores=[], events_by_type=Counter(r.event.type for r in records), duplicates=len(records) - len(inserted),
        scoring_seconds=time.perf_counter() - started,
    )
    scored = {key: (p, v, r) for key, p, v, r in zip(customers, probabilities, vectors, explanations, strict=True)}

    features: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (tenant_id, customer), (_, vector, _) in scored.items():
        features[tenant_id][customer] = vector
    for (tenant_id, event_id), row in rows.items():
        probability, vector, why = scored[(tenant_id, row["customer_id"])]
        outcome.scores.append(ScoreRecord(
            score_id=score_id_for(tenant_id, event_id), tenant_id=tenant_id,
            customer_id=row["customer_id"], probability=probability, band=bands.band(probability),
            model_version=predictor.version, scored_at=as_of, cause="event", event_id=event_id,
            features=vector, reasons=why,
        ))
    return BatchPlan(rows=list(rows.values()), new=inserted, features=dict(features), as_of=as_of, outcome=outcome)


def write_batch(session: Session, plan: BatchPlan) -> None:
    """Store a planned batch's features and scores (its events are stored by the caller)."""
    for tenant_id, features in plan.features.items():
        repository.upsert_features(session, tenant_id, features, plan.as_of)
    repository.upsert_scores(session, [
        {
            "score_id": s.score_id, "tenant_id": s.tenant_id, "customer_id": s.customer_id,
            "probability": s.probability, "band": s.band, "model_version": s.model_version,
            "scored_at": s.scored_at, "event_id": s.event_id, "reasons": s.reasons,
        }
        for s in plan.outcome.scores
    ])


def process_batch(
    session: Session, records: Sequence[EventRecord], predictor: Predictor, bands: Bands, as_of: datetime,
    *, histories: BatchHistories | None = None, partitions: Sequence[int] | None = None,
) -> BatchOutcome:
    """Store the events (insert-if-absent), recompute the affected customers' features, score
    them, store features and scores, in the caller's transaction (plan_batch, write_batch)."""
    plan = plan_batch(session, records, predictor, bands, as_of, histories=histories, partitions=partitions,
                      store_first=True)
    write_batch(session, plan)
    return plan.outcome


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
    reasons: list[str] = field(default_factory=list)


def latest_score(session: Session, tenant_id: str, customer_id: str) -> CustomerScore | None:
    score = repository.latest_score(session, tenant_id, customer_id)
    if score is None:
        return None
    features = repository.customer_features(session, tenant_id, customer_id)
    return CustomerScore(
        customer_id=score.customer_id, probability=score.probability, band=score.band,
        model_version=score.model_version, scored_at=as_utc(score.scored_at), score_id=score.score_id,
        event_id=score.event_id, features=dict(features.features) if features else {},
        reasons=list(score.reasons or []),
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


class ModelNotFound(LookupError):
    """No model with this version in the registry."""


class RegistryConflict(ValueError):
    """The registry cannot do this now (nothing to roll back to, a model that cannot load)."""


def train_for_tenant(
    session: Session, tenant_id: str, horizon_days: int = 90, *, clock: Clock | None = None, **options: Any
) -> TrainedModel:
    histories = repository.load_tenant_history(session, tenant_id)
    return train(histories, horizon_days, clock=clock, **options)


def register_model(session: Session, trained: TrainedModel, tenant_id: str, activate: bool) -> TrainReport:
    """Store the model with its training window, validation metrics and chart data."""
    report = trained.report
    cutoffs = [datetime.fromisoformat(c) for c in report.train_cutoffs]
    repository.add_model(session, ScoringModel(
        version=report.version, algorithm=report.algorithm, candidate=report.candidate, roc_auc=report.roc_auc,
        baseline_auc=report.baseline_auc, runner_up_auc=report.runner_up_auc,
        pr_auc=_finite(report.pr_auc), brier=_finite(report.brier), lift_top_decile=_finite(report.lift_top_decile),
        calibration=[dict(b) for b in report.calibration],
        candidates=[{"name": c.name, "algorithm": c.algorithm, "roc_auc": c.roc_auc, "winner": c.winner}
                    for c in report.candidates],
        importance=[dict(i) for i in report.importance],
        validation=report.validation.as_json() if report.validation else {},
        feature_names=list(report.feature_names), n_train=report.n_train, n_holdout=report.n_holdout,
        horizon_days=report.horizon_days, first_cutoff=min(cutoffs) if cutoffs else None,
        last_cutoff=max(cutoffs) if cutoffs else None,
        validation_cutoff=datetime.fromisoformat(report.holdout_cutoff) if report.holdout_cutoff else None,
        trained_on_tenant=tenant_id, trained_at=report.trained_at, active=activate,
        reasons_reference=dict(report.reference),
        artifact=dump_artifact(trained.estimator), serving=serving_arrays(trained.estimator),
    ))
    return replace(report, activated=activate)


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)  # NaN -> None (JSON has no NaN)


def active_version(session: Session) -> str | None:
    return repository.active_model_version(session)


def _predictor(row: ScoringModel) -> Predictor:
    """Raises model.ModelLoadError (a ValueError with the version and the cause). A model
    registered before serving arrays existed is read from its artifact, and its serving arrays
    are written into its row (committed with the caller's session), so later loads need no
    sklearn: upgrading needs no retraining and no step of its own."""
    validation = ValidationData.from_json(row.validation)
    predictor = load_predictor(row.version, list(row.feature_names), row.artifact, row.roc_auc,
                               trained_at=as_utc(row.trained_at) if row.trained_at else None,
                               reference_scores=validation.probabilities if validation else (),
                               reference=row.reasons_reference or None, serving=row.serving)
    if row.serving is None and not isinstance(predictor.estimator, ServingModel):
        try:
            arrays = serving_arrays(predictor.estimator)
            served = ServingModel.from_bytes(arrays) if arrays is not None else None
        except Exception:  # an estimator whose internals this code does not know: keep the artifact
            log.exception("model %s: no serving arrays could be made; it is served from its artifact", row.version)
            return predictor
        if served is not None:
            row.serving = arrays
            log.info("model %s: serving arrays written beside its artifact", row.version)
            predictor = replace(predictor, estimator=served)
    return predictor


def load_active_predictor(session: Session) -> Predictor | None:
    """The active model, ready to score; ModelLoadError if it is corrupt or incompatible
    (the caller keeps the model it has)."""
    row = repository.active_model(session)
    return _predictor(row) if row is not None else None


def _model_out(row: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(row)
    result["served_from"] = "arrays" if result.pop("has_serving_arrays", False) else "artifact"
    for name in ("trained_at", "activated_at", "first_cutoff", "last_cutoff", "validation_cutoff"):
        if result.get(name) is not None:
            result[name] = as_utc(result[name])
    return result


def list_models(session: Session) -> list[dict[str, Any]]:
    return [_model_out(row) for row in repository.list_models(session)]


def model_detail(session: Session, version: str, with_validation: bool = False) -> dict[str, Any]:
    row = repository.model_info(session, version, with_validation)
    if row is None:
        raise ModelNotFound(f"no model {version!r} in the registry")
    return _model_out(row)


def resolve_version(session: Session, version: str | None) -> str:
    """`version`, or the active model's, or the newest model's."""
    if version is not None:
        return version
    chosen = repository.active_model_version(session) or repository.newest_model_version(session)
    if chosen is None:
        raise ModelNotFound("the model registry is empty; train a model first")
    return chosen


def promote_model(session: Session, version: str, now: datetime) -> dict[str, Any]:
    """Make `version` the active model once its artifact has proven it loads and fits this
    code. The model active before becomes its previous_version (what rollback returns to).
    Promoting the active model changes nothing."""
    repository.lock_registry(session)
    row = repository.get_model(session, version)
    if row is None:
        raise ModelNotFound(f"no model {version!r} in the registry")
    if not row.active:
        try:
            _predictor(row)
        except ModelLoadError as exc:
            raise RegistryConflict(f"model {version} cannot be promoted: {exc}") from exc
        repository.set_active(session, version, now, previous_version=repository.active_model_version(session))
    return model_detail(session, version)


def rollback_model(session: Session, now: datetime) -> dict[str, Any]:
    """Re-activate the model that was active before the current one. Like an undo: the
    re-activated model keeps its own previous_version, so a second rollback goes one further."""
    repository.lock_registry(session)
    current = repository.active_model(session)
    if current is None:
        raise RegistryConflict("no model is active, so there is nothing to roll back from")
    if not current.previous_version:
        raise RegistryConflict(
            f"model {current.version} has no previously active model to roll back to"
        )
    target = repository.get_model(session, current.previous_version)
    if target is None:
        raise RegistryConflict(f"the previously active model {current.previous_version} is no longer in the registry")
    try:
        _predictor(target)
    except ModelLoadError as exc:
        raise RegistryConflict(f"cannot roll back to model {target.version}: {exc}") from exc
    repository.set_active(session, target.version, now, previous_version=target.previous_version)
    return model_detail(session, target.version)


def activate_model(session: Session, version: str, now: datetime) -> bool:
    """Operator's activate (CLI), without the load check: False if there is no such version."""
    repository.lock_registry(session)
    previous = repository.active_model_version(session)
    if previous == version:
        return repository.get_model(session, version) is not None
    return repository.set_active(session, version, now, previous_version=previous)


def set_report_path(session: Session, version: str, path: str) -> None:
    repository.set_report_path(session, version, path)


# --- data features cannot use ---------------------------------------------------------------


def flag_events(
    session: Session, records: Sequence[EventRecord], flagged_at: datetime, currency: str = MAIN_CURRENCY
) -> list[str]:
    """Record why some of these events' data is unusable for features (features.event_flags);
    the events themselves are stored as usual. Returns the reasons newly recorded (one per
    flagged event and reason; a redelivered event adds nothing)."""
    rows = []
    for record in records:
        event = record.event
        if event.type not in FLAGGABLE_TYPES:
            continue
        for reason in event_flags(event.type, event.data.model_dump(mode="json"), currency):
            rows.append({
                "tenant_id": record.tenant_id, "event_id": event.id, "reason": reason,
                "customer_id": event.customer_id, "flagged_at": flagged_at,
            })
    return repository.insert_event_flags(session, rows)
