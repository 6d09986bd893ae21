"""Training, evaluation, the model registry's artifacts and the online predictor.

Training examples come from stored history: at several cutoff dates, features are computed
as of the cutoff (only events before it), and the label says whether the customer churned
within the horizon after it. Evaluation is time-based: candidates are fitted on the earlier
cutoffs and scored on the validation period (the latest cutoff whose horizon lies fully
inside the history). Two calibrated candidates compete there — a regularised logistic
regression and a histogram gradient boosting model — and the one with the higher ROC AUC
wins; both are reported next to a recency-only baseline, so the report says honestly whether
the model earns its keep. The registered artifact is exactly the winner that was validated.
"""

from __future__ import annotations

import bisect
import functools
import logging
import secrets
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from services.scoring.features import FEATURE_NAMES, HistoryEvent, feature_vector, features_from_sorted
from services.scoring.serving import ModelLoadError, ServingModel
from shared.clock import Clock, SystemClock

if TYPE_CHECKING:
    from sklearn.calibration import CalibratedClassifierCV
    from threadpoolctl import ThreadpoolController

# sklearn (and scipy under it) is imported where a model is trained, evaluated or read from its
# skops artifact, never to serve one: the scoring service scores from the registry's serving
# arrays (services.scoring.serving) and stays ~95 MB smaller for it.

log = logging.getLogger(__name__)

CHURN_EVENT_TYPES = frozenset({"subscription.ended", "subscription.cancellation_notice"})
_CONTRACT_TYPES = frozenset({"subscription.started", "subscription.renewed", "subscription.ended"})
MIN_PER_CLASS = 100
"""Training refuses with fewer churned or fewer retained training examples than this."""
MIN_HOLDOUT_PER_CLASS = 5
CALIBRATION_BINS = 10


@functools.cache
def _threadpools() -> ThreadpoolController:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded() -> Any:
    """Context: OpenMP (HistGradientBoosting) runs one thread in the calling thread. On a
    shared, busy machine OpenMP's spinning workers made training 10x slower; one thread per
    fit is predictable, and the service scales by processes anyway."""
    return _threadpools().limit(limits=1, user_api="openmp")


class InsufficientData(ValueError):
    """Not enough history to train or evaluate a model honestly."""


class UntrustedArtifact(ModelLoadError):
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
class CandidateResult:
    """One candidate model as it did on the validation period."""

    name: str
    algorithm: str
    roc_auc: float
    winner: bool = False


@dataclass(frozen=True)
class ValidationData:
    """What the charts of the evaluation report are drawn from: per validation example the
    label, the winner's probability and the baseline's score (days since last activity)."""

    labels: tuple[int, ...]
    probabilities: tuple[float, ...]
    baseline: tuple[float, ...]

    def as_json(self) -> dict[str, list[float] | list[int]]:
        return {"labels": list(self.labels), "probabilities": [round(p, 6) for p in self.probabilities],
                "baseline": [round(b, 4) for b in self.baseline]}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[float]] | None) -> ValidationData | None:
        if not data or not data.get("labels"):
            return None
        return cls(labels=tuple(int(v) for v in data["labels"]),
                   probabilities=tuple(float(v) for v in data["probabilities"]),
                   baseline=tuple(float(v) for v in data["baseline"]))


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
    candidate: str = ""
    pr_auc: float = float("nan")
    brier: float = float("nan")
    lift_top_decile: float = float("nan")
    calibration: tuple[dict[str, float], ...] = ()
    candidates: tuple[CandidateResult, ...] = ()
    importance: tuple[dict[str, float | str], ...] = ()
    validation: ValidationData | None = field(default=None, repr=False, compare=False)
    feature_names: tuple[str, ...] = FEATURE_NAMES
    activated: bool = False
    report_path: str | None = None
    reference: dict[str, float] = field(default_factory=dict)
    """Per-feature medians of the training examples: the typical customer of the history this
    model learnt from, which a score's reasons are measured against (services.scoring.reasons)."""

    @property
    def runner_up(self) -> CandidateResult | None:
        return next((c for c in self.candidates if not c.winner), None)

    @property
    def runner_up_auc(self) -> float | None:
        runner_up = self.runner_up
        return runner_up.roc_auc if runner_up else None

    def summary(self) -> str:
        verdict = "beats" if self.roc_auc > self.baseline_auc else "does NOT beat"
        lines = [
            f"model {self.version}{' (active)' if self.activated else ''}: {self.candidate or self.algorithm} wins with "
            f"holdout ROC AUC {self.roc_auc:.3f}, {verdict} the recency-only baseline {self.baseline_auc:.3f}",
        ]
        for c in self.candidates:
            lines.append(f"  candidate {c.name:<24} ROC AUC {c.roc_auc:.3f}{'  <- winner' if c.winner else ''}")
        lines.append(f"  baseline  {'recency only':<24} ROC AUC {self.baseline_auc:.3f}")
        lines.append(
            f"  winner on the validation period: PR AUC {self.pr_auc:.3f}, Brier {self.brier:.4f}, "
            f"top-decile lift {self.lift_top_decile:.2f}x"
        )
        lines.append(
            f"  {self.n_customers} customers; {self.n_train} training examples ({self.positives} churned) "
            f"from {len(self.train_cutoffs)} cutoffs; holdout {self.n_holdout} ({self.holdout_positives} churned) "
            f"at {self.holdout_cutoff[:10]}; horizon {self.horizon_days} days; {self.duration_s:.1f}s"
        )
        if self.report_path:
            lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("validation", None)
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
    trained_at: datetime | None = None
    reference_scores: tuple[float, ...] = ()  # the validation period's probabilities (drift)
    reference: dict[str, float] | None = None  # TrainReport.reference; None for models registered before it

    def predict(self, rows: Sequence[Mapping[str, float]]) -> list[float]:
        if not rows:
            return []
        matrix = np.array([feature_vector(row, self.feature_names) for row in rows], dtype=float)
        if isinstance(self.estimator, ServingModel):
            probabilities = self.estimator.churn_probability(matrix)
        else:
            with single_threaded():
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


@dataclass(frozen=True)
class CandidateSpec:
    name: str
    algorithm: str
    build: Any  # () -> unfitted estimator


CALIBRATION_ENSEMBLE = False
"""One model fitted on all training examples, its sigmoid calibrated on 3-fold out-of-fold
predictions (not an average of 3 fold models): the same validation AUC on simulated histories
(0.832 against 0.832), a third of the trees to evaluate for every score and its reasons."""


def make_logistic() -> CalibratedClassifierCV:
    """L2-regularised logistic regression on standardised features, sigmoid-calibrated."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = Pipeline([
        ("scale", StandardScaler()),
        ("logreg", LogisticRegression(C=0.5, max_iter=2000)),
    ])
    return CalibratedClassifierCV(pipeline, method="sigmoid", cv=3, ensemble=CALIBRATION_ENSEMBLE)


def make_gradient_boosting() -> CalibratedClassifierCV:
    """Histogram gradient boosting (shallow trees, L2, fixed rounds), sigmoid-calibrated."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier

    boosting = HistGradientBoostingClassifier(
        learning_rate=0.06, max_iter=150, max_leaf_nodes=15, min_samples_leaf=40,
        l2_regularization=1.0, early_stopping=False, random_state=0,
    )
    return CalibratedClassifierCV(boosting, method="sigmoid", cv=3, ensemble=CALIBRATION_ENSEMBLE)



CANDIDATES: tuple[CandidateSpec, ...] = (
    CandidateSpec(
        "logistic_regression",
        "CalibratedClassifierCV(sigmoid, cv=3, ensemble=False) over Pipeline(StandardScaler, LogisticRegression(C=0.5))",
        make_logistic,
    ),
    CandidateSpec(
        "hist_gradient_boosting",
        "CalibratedClassifierCV(sigmoid, cv=3, ensemble=False) over HistGradientBoostingClassifier(150 rounds, 15 leaves, l2=1)",
        make_gradient_boosting,
    ),
)


def new_version(moment: datetime) -> str:
    return f"m-{moment.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(2)}"


def top_decile_lift(y: np.ndarray, scores: np.ndarray) -> float:
    """Churn rate among the riskiest tenth divided by the overall churn rate."""
    base = float(np.mean(y))
    if base == 0.0 or len(y) == 0:
        return float("nan")
    top = max(1, int(np.ceil(len(y) / 10)))
    order = np.argsort(-scores, kind="stable")
    return float(np.mean(y[order[:top]]) / base)


def calibration_bins(y: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict[str, float]]:
    """Equal-count bins of the predicted probability (deciles): mean predicted vs observed
    churn rate. Equal-count, because churn probabilities crowd near zero and equal-width
    bins would leave most of them empty."""
    order = np.argsort(probabilities, kind="stable")
    result = []
    for chunk in np.array_split(order, bins):
        if len(chunk) == 0:
            continue
        p = probabilities[chunk]
        result.append({
            "lower": round(float(p.min()), 6), "upper": round(float(p.max()), 6), "count": int(len(chunk)),
            "mean_predicted": round(float(p.mean()), 6), "observed": round(float(np.mean(y[chunk])), 6),
        })
    return result


def feature_importance(
    estimator: Any, X: np.ndarray, y: np.ndarray, names: Sequence[str] = FEATURE_NAMES, repeats: int = 3
) -> list[dict[str, float | str]]:
    """Permutation importance on the validation set (drop in ROC AUC when a feature is
    shuffled): the same measure for either model kind. Largest first."""
    from sklearn.inspection import permutation_importance

    result = permutation_importance(estimator, X, y, scoring="roc_auc", n_repeats=repeats, random_state=0)
    rows = [
        {"feature": name, "mean": round(float(m), 6), "std": round(float(s), 6)}
        for name, m, s in zip(names, result.importances_mean, result.importances_std, strict=True)
    ]
    return sorted(rows, key=lambda row: -float(row["mean"]))


def train(
    histories: Mapping[str, Sequence[HistoryEvent]],
    horizon_days: int = 90,
    *,
    min_per_class: int = MIN_PER_CLASS,
    min_holdout_per_class: int = MIN_HOLDOUT_PER_CLASS,
    step_days: int = 30,
    candidates: Sequence[CandidateSpec] = CANDIDATES,
    importance_repeats: int = 3,
    clock: Clock | None = None,
) -> TrainedModel:
    """Fit the candidates on customer histories (customer id -> events), keep the one with
    the best ROC AUC on the validation period, and report it next to the others and the
    recency-only baseline."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    if horizon_days < 1:
        raise ValueError("horizon_days must be at least 1")
    if not candidates:
        raise ValueError("need at least one candidate model")
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
    if holdout.positives < min_holdout_per_class or holdout.negatives < min_holdout_per_class:
        raise InsufficientData(
            f"too little data to evaluate: the holdout cutoff {holdout_cutoff.date()} has "
            f"{holdout.positives} churned and {holdout.negatives} retained customers "
            f"(need at least {min_holdout_per_class} of each)"
        )
    fitted: list[tuple[CandidateSpec, Any, np.ndarray, float]] = []
    with single_threaded():
        for spec in candidates:
            estimator = spec.build().fit(training.X, training.y)
            probabilities = estimator.predict_proba(holdout.X)[:, 1]
            fitted.append((spec, estimator, probabilities, float(roc_auc_score(holdout.y, probabilities))))
        best = max(fitted, key=lambda item: item[3])  # ties: the first (simpler) candidate
        importance = feature_importance(best[1], holdout.X, holdout.y, repeats=importance_repeats)
    spec, estimator, probabilities, roc_auc = best
    recency = holdout.X[:, FEATURE_NAMES.index("days_since_last_activity")]
    trained_at = (clock or SystemClock()).now()
    report = TrainReport(
        version=new_version(trained_at),
        algorithm=spec.algorithm,
        roc_auc=roc_auc,
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
        duration_s=0.0,
        candidate=spec.name,
        pr_auc=float(average_precision_score(holdout.y, probabilities)),
        brier=float(brier_score_loss(holdout.y, probabilities)),
        lift_top_decile=top_decile_lift(holdout.y, probabilities),
        calibration=tuple(calibration_bins(holdout.y, probabilities)),
        candidates=tuple(
            CandidateResult(s.name, s.algorithm, auc, winner=s is spec) for s, _e, _p, auc in fitted
        ),
        importance=tuple(importance),
        validation=ValidationData(
            labels=tuple(int(v) for v in holdout.y), probabilities=tuple(float(p) for p in probabilities),
            baseline=tuple(float(r) for r in recency),
        ),
        reference={name: float(np.median(training.X[:, j])) for j, name in enumerate(FEATURE_NAMES)},
    )
    report = replace(report, duration_s=round(time.perf_counter() - started, 3))
    log.info("trained %s: %s wins with holdout ROC AUC %.3f (%s; recency baseline %.3f) on %d examples",
             report.version, spec.name, report.roc_auc,
             ", ".join(f"{c.name} {c.roc_auc:.3f}" for c in report.candidates), report.baseline_auc, report.n_train)
    return TrainedModel(estimator=estimator, report=report)


# --- artifacts ------------------------------------------------------------------------


@functools.cache
def _skops_io() -> Any:
    """skops.io, imported without its default trust list of every sklearn estimator: building
    it imports all of sklearn (all_estimators), ~16 MB resident for modules never used.
    load_artifact does not rely on that default: it trusts sklearn and numpy types by name, so
    with the list empty the same artifacts load and the same refuse."""
    import sklearn.utils

    all_estimators = sklearn.utils.all_estimators
    sklearn.utils.all_estimators = lambda *args, **kwargs: []
    try:
        import skops.io
    finally:
        sklearn.utils.all_estimators = all_estimators
    return skops.io


_TRUSTED_PREFIXES = ("sklearn.", "numpy.")


def dump_artifact(estimator: Any) -> bytes:
    return _skops_io().dumps(estimator, compression=zipfile.ZIP_DEFLATED)


def serving_arrays(estimator: Any) -> bytes | None:
    """What the registry stores beside the artifact for scoring to serve the model from
    (services.scoring.serving), or None for a model of a kind not served from arrays."""
    form = ServingModel.from_estimator(estimator)
    return form.to_bytes() if form is not None else None


def load_artifact(blob: bytes) -> Any:
    """skops load, trusting only sklearn and numpy types beyond skops' defaults. Raises
    ModelLoadError (UntrustedArtifact for foreign types) instead of loading anything else."""
    sio = _skops_io()
    try:
        untrusted = sio.get_untrusted_types(data=blob)
    except Exception as exc:  # a zip that is not one, a skops schema it does not know, ...
        raise ModelLoadError(f"model artifact is not a readable skops file ({type(exc).__name__}: {exc})") from exc
    foreign = [name for name in untrusted if not name.startswith(_TRUSTED_PREFIXES)]
    if foreign:
        raise UntrustedArtifact(f"model artifact contains untrusted types: {', '.join(sorted(foreign))}")
    try:
        return sio.loads(blob, trusted=untrusted)
    except Exception as exc:
        raise ModelLoadError(f"model artifact cannot be loaded ({type(exc).__name__}: {exc})") from exc


def load_predictor(
    version: str, feature_names: Sequence[str], blob: bytes, roc_auc: float,
    trained_at: datetime | None = None, reference_scores: Sequence[float] = (),
    reference: Mapping[str, float] | None = None, serving: bytes | None = None,
) -> Predictor:
    """A registered model, checked before it may score: it loads safely, is a binary
    classifier with probabilities, and its inputs are features this code computes, as many as
    the registry says. With `serving` arrays, the model is read from them alone (numpy, no
    sklearn); without (a model of another kind, or registered before serving arrays existed),
    from the skops artifact `blob`. Every refusal is a ModelLoadError naming the version."""
    unknown = sorted(set(feature_names) - set(FEATURE_NAMES))
    if unknown:
        raise ModelLoadError(
            f"model {version} needs features this code does not compute: {', '.join(unknown)}"
        )
    if len(set(feature_names)) != len(feature_names) or not feature_names:
        raise ModelLoadError(f"model {version} has an empty or repeated feature list")
    try:
        estimator = ServingModel.from_bytes(serving) if serving is not None else load_artifact(blob)
    except ModelLoadError as exc:
        raise type(exc)(f"model {version}: {exc}") from exc
    if not callable(getattr(estimator, "predict_proba", None)):
        raise ModelLoadError(f"model {version}: the artifact ({type(estimator).__name__}) has no predict_proba")
    classes = getattr(estimator, "classes_", None)
    if classes is None or [int(c) for c in classes] != [0, 1]:
        raise ModelLoadError(f"model {version}: the artifact is not a fitted binary (0/1) classifier")
    width = getattr(estimator, "n_features_in_", None)
    if width is not None and int(width) != len(feature_names):
        raise ModelLoadError(
            f"model {version}: the artifact expects {width} features but its feature list names {len(feature_names)}"
        )
    return Predictor(version=version, feature_names=tuple(feature_names), estimator=estimator, roc_auc=roc_auc,
                     trained_at=trained_at, reference_scores=tuple(reference_scores),
                     reference=_checked_reference(version, feature_names, reference))


def _checked_reference(
    version: str, feature_names: Sequence[str], reference: Mapping[str, float] | None
) -> dict[str, float] | None:
    if not reference:
        return None
    missing = sorted(set(feature_names) - set(reference))
    if missing:
        raise ModelLoadError(f"model {version}: its reasons reference lacks {', '.join(missing)}")
    return {name: float(reference[name]) for name in feature_names}
