"""Training, evaluation, the model registry's artifacts and the online predictor.

Training examples come from stored history: at several cutoff dates, features are computed
as of the cutoff (only events before it), and the label says whether the customer churned
within the horizon after it. Evaluation is time-based: the model is fitted on the earlier
cutoffs and scored on the latest cutoff whose horizon lies fully inside the history, next
to a recency-only baseline, so the report says honestly whether the model earns its keep.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import skops.io as sio
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from services.scoring.features import FEATURE_NAMES, HistoryEvent, feature_vector, features_from_sorted
from shared.clock import Clock, SystemClock

log = logging.getLogger(__name__)

CHURN_EVENT_TYPES = frozenset({"subscription.ended", "subscription.cancellation_notice"})
_CONTRACT_TYPES = frozenset({"subscription.started", "subscription.renewed", "subscription.ended"})
ALGORITHM = "CalibratedClassifierCV(sigmoid, cv=3) over Pipeline(StandardScaler, LogisticRegression)"
MIN_PER_CLASS = 50
MIN_HOLDOUT_PER_CLASS = 5


class InsufficientData(ValueError):
    """Not enough history to train or evaluate a model honestly."""


class UntrustedArtifact(ValueError):
    """A model artifact contains types outside sklearn/numpy: refuse to load it."""


@dataclass(frozen=True)
class Examples:
    X: np.ndarray
    y: np.ndarray
    cutoffs: tuple[datetime, ...]

    @property
    def positives(self) -> int:
        return int(self.y.sum())

    @property
    def negatives(self) -> int:
        return int(len(self.y) - self.y.sum())


@dataclass(frozen=True)
class TrainReport:
    version: str
    algorithm: str
    roc_auc: float
    baseline_auc: float
    horizon_days: int
    n_train: int
    n_holdout: int
    positives: int
    negatives: int
    holdout_positives: int
    holdout_negatives: int
    n_customers: int
    train_cutoffs: tuple[str, ...]
    holdout_cutoff: str
    trained_at: datetime
    duration_s: float
    feature_names: tuple[str, ...] = FEATURE_NAMES
    activated: bool = False

    def summary(self) -> str:
        verdict = "beats" if self.roc_auc > self.baseline_auc else "does NOT beat"
        return (
            f"model {self.version}{' (active)' if self.activated else ''}: holdout ROC AUC {self.roc_auc:.3f}, "
            f"{verdict} the recency-only baseline {self.baseline_auc:.3f}\n"
            f"  {self.n_customers} customers; {self.n_train} training examples ({self.positives} churned) "
            f"from {len(self.train_cutoffs)} cutoffs; holdout {self.n_holdout} ({self.holdout_positives} churned) "
            f"at {self.holdout_cutoff[:10]}; horizon {self.horizon_days} days; {self.duration_s:.1f}s"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trained_at"] = self.trained_at.isoformat()
        return data


@dataclass
class TrainedModel:
    estimator: Any
    report: TrainReport


@dataclass(frozen=True)
class Predictor:
    """The loaded active model, as the consumer uses it."""

    version: str
    feature_names: tuple[str, ...]
    estimator: Any
    roc_auc: float

    def predict(self, rows: Sequence[Mapping[str, float]]) -> list[float]:
        if not rows:
            return []
        matrix = np.array([feature_vector(row, self.feature_names) for row in rows], dtype=float)
        probabilities = self.estimator.predict_proba(matrix)[:, 1]
        return [float(min(1.0, max(0.0, p))) for p in probabilities]


# --- examples -------------------------------------------------------------------------


@dataclass
class _Timeline:
    """One customer's sorted history with the indexes labelling needs."""

    events: list[HistoryEvent]
    times: list[float] = field(init=False)
    churn_prefix: list[int] = field(init=False)  # churn events among the first k events
    contract_times: list[float] = field(init=False)
    contract_ended: list[bool] = field(init=False)

    def __post_init__(self) -> None:
        self.times = [e.occurred_at.timestamp() for e in self.events]
        self.churn_prefix = [0]
        for e in self.events:
            self.churn_prefix.append(self.churn_prefix[-1] + (e.type in CHURN_EVENT_TYPES))
        contract = [(t, e.type == "subscription.ended") for t, e in zip(self.times, self.events) if e.type in _CONTRACT_TYPES]
        self.contract_times = [t for t, _ in contract]
        self.contract_ended = [ended for _, ended in contract]

    def example(self, cutoff: datetime, horizon_s: float) -> tuple[int, bool] | None:
        """(number of events up to the cutoff, churned within the horizon) or None when the
        customer does not count at this cutoff: no activity yet, or already churned (contract
        ended and not restarted, or silent for a whole horizon already)."""
        c = cutoff.timestamp()
        seen = bisect.bisect_right(self.times, c)
        if seen == 0 or self.times[seen - 1] <= c - horizon_s:
            return None
        k = bisect.bisect_right(self.contract_times, c)
        if k and self.contract_ended[k - 1]:
            return None
        until = bisect.bisect_right(self.times, c + horizon_s)
        churned = until == seen or self.churn_prefix[until] > self.churn_prefix[seen]
        return seen, churned


def _timelines(histories: Mapping[str, Sequence[HistoryEvent]]) -> list[_Timeline]:
    return [_Timeline(sorted(events, key=HistoryEvent.sort_key)) for events in histories.values() if events]


def build_examples(timelines: Sequence[_Timeline], cutoffs: Sequence[datetime], horizon_days: int) -> Examples:
    horizon_s = horizon_days * 86_400.0
    rows: list[list[float]] = []
    labels: list[int] = []
    for cutoff in cutoffs:
        for timeline in timelines:
            example = timeline.example(cutoff, horizon_s)
            if example is None:
                continue
            seen, churned = example
            rows.append(feature_vector(features_from_sorted(timeline.events[:seen], cutoff)))
            labels.append(int(churned))
    X = np.array(rows, dtype=float).reshape(len(rows), len(FEATURE_NAMES))
    return Examples(X=X, y=np.array(labels, dtype=int), cutoffs=tuple(cutoffs))


def plan_cutoffs(
    first: datetime, last: datetime, horizon_days: int, step_days: int = 30, warmup_days: int = 60
) -> tuple[list[datetime], datetime]:
    """Holdout = the latest cutoff whose horizon fits in the history; training cutoffs step
    back from one horizon before it, so no training label peeks into the holdout period."""
    horizon = timedelta(days=horizon_days)
    holdout = last - horizon
    cutoffs: list[datetime] = []
    cutoff = holdout - horizon
    while cutoff >= first + timedelta(days=warmup_days):
        cutoffs.append(cutoff)
        cutoff -= timedelta(days=step_days)
    if not cutoffs:
        span = (last - first).days
        raise InsufficientData(
            f"history spans {span} days; training with a {horizon_days}-day horizon needs at least "
            f"{2 * horizon_days + warmup_days} days (warm-up, a training horizon and a holdout horizon)"
        )
    return sorted(cutoffs), holdout


# --- training -------------------------------------------------------------------------


def make_estimator() -> CalibratedClassifierCV:
    pipeline = Pipeline([
        ("scale", StandardScaler()),
        ("logreg", LogisticRegression(C=0.5, max_iter=2000)),
    ])
    return CalibratedClassifierCV(pipeline, method="sigmoid", cv=3)


def new_version(moment: datetime) -> str:
    return f"m-{moment.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(2)}"


def train(
    histories: Mapping[str, Sequence[HistoryEvent]],
    horizon_days: int = 90,
    *,
    min_per_class: int = MIN_PER_CLASS,
    step_days: int = 30,
    clock: Clock | None = None,
) -> TrainedModel:
    """Fit and evaluate a model on customer histories (customer id -> events)."""
    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    started = time.perf_counter()
    timelines = _timelines(histories)
    if not timelines:
        raise InsufficientData("no stored events to train on; simulate or ingest history first")
    first = min(t.events[0].occurred_at for t in timelines)
    last = max(t.events[-1].occurred_at for t in timelines)
    train_cutoffs, holdout_cutoff = plan_cutoffs(first, last, horizon_days, step_days)
    training = build_examples(timelines, train_cutoffs, horizon_days)
    holdout = build_examples(timelines, [holdout_cutoff], horizon_days)
    if training.positives < min_per_class or training.negatives < min_per_class:
        raise InsufficientData(
            f"too little data: training needs at least {min_per_class} churned and {min_per_class} retained "
            f"examples, got {training.positives} churned and {training.negatives} retained "
            f"({len(timelines)} customers, {len(train_cutoffs)} cutoffs, {horizon_days}-day horizon)"
        )
    if holdout.positives < MIN_HOLDOUT_PER_CLASS or holdout.negatives < MIN_HOLDOUT_PER_CLASS:
        raise InsufficientData(
            f"too little data to evaluate: the holdout cutoff {holdout_cutoff.date()} has "
            f"{holdout.positives} churned and {holdout.negatives} retained customers "
            f"(need at least {MIN_HOLDOUT_PER_CLASS} of each)"
        )
    estimator = make_estimator().fit(training.X, training.y)
    probabilities = estimator.predict_proba(holdout.X)[:, 1]
    recency = holdout.X[:, FEATURE_NAMES.index("days_since_last_activity")]
    trained_at = (clock or SystemClock()).now()
    report = TrainReport(
        version=new_version(trained_at),
        algorithm=ALGORITHM,
        roc_auc=float(roc_auc_score(holdout.y, probabilities)),
        baseline_auc=float(roc_auc_score(holdout.y, recency)),
        horizon_days=horizon_days,
        n_train=len(training.y),
        n_holdout=len(holdout.y),
        positives=training.positives,
        negatives=training.negatives,
        holdout_positives=holdout.positives,
        holdout_negatives=holdout.negatives,
        n_customers=len(timelines),
        train_cutoffs=tuple(c.isoformat() for c in train_cutoffs),
        holdout_cutoff=holdout_cutoff.isoformat(),
        trained_at=trained_at,
        duration_s=round(time.perf_counter() - started, 3),
    )
    log.info("trained %s: holdout ROC AUC %.3f (recency baseline %.3f) on %d examples",
             report.version, report.roc_auc, report.baseline_auc, report.n_train)
    return TrainedModel(estimator=estimator, report=report)


# --- artifacts ------------------------------------------------------------------------

_TRUSTED_PREFIXES = ("sklearn.", "numpy.")


def dump_artifact(estimator: Any) -> bytes:
    return sio.dumps(estimator, compression=zipfile.ZIP_DEFLATED)


def load_artifact(blob: bytes) -> Any:
    """skops load, trusting only sklearn and numpy types beyond skops' defaults."""
    untrusted = sio.get_untrusted_types(data=blob)
    foreign = [name for name in untrusted if not name.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise UntrustedArtifact(f"model artifact contains untrusted types: {', '.join(sorted(foreign))}")
    return sio.loads(blob, trusted=untrusted)
