"""Why a score is high: the top contributing features, from the model, in plain language.

Method (model-agnostic: works for any estimator with `predict_proba`): for every scored row
and every feature not already at it, the feature's value is replaced by a reference value
(a "typical customer") and the row re-scored; the drop in churn probability is that feature's
contribution. All perturbed copies are scored in ONE predict_proba call per batch. Only features whose actual value pushes the risk UP (by at least
`MIN_CONTRIBUTION`) can be reasons; the strongest three are rendered with one template per
feature, which states the customer's actual value ("no order for 74 days").

The reference: each registered model carries the per-feature medians of its own training
examples (`TrainReport.reference`, stored as `reasons_reference`), so "typical" means typical
of the history that model learnt from; `explain_scores` uses it. `TYPICAL_CUSTOMER` (rounded
medians of simulated history, `simulate_history(1500, seed=11)`, 90-day horizon) is the fallback
for a model registered without one.

Related features are worded once: within a `GROUPS` entry only the strongest member may
become a reason (so "no order for 74 days" is not followed by "no order in the last 90 days").
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from services.scoring import metrics
from services.scoring.features import FEATURE_NAMES, NO_CONTRACT_END_DAYS, feature_vector
from services.scoring.model import Predictor, single_threaded

MAX_REASONS = 3
MIN_CONTRIBUTION = 0.005
"""A feature must raise the churn probability by at least this much (absolute) to be a reason."""

TYPICAL_CUSTOMER: dict[str, float] = {
    "days_since_last_activity": 7.0,
    "days_since_last_order": 14.0,
    "orders_30d": 1.0,
    "orders_90d": 4.0,
    "orders_365d": 9.0,
    "spend_90d": 190.0,
    "spend_365d": 480.0,
    "order_trend": 0.0,
    "refunds_365d": 0.0,
    "complaints_90d": 0.0,
    "tickets_open": 0.0,
    "last_nps": 7.0,
    "has_nps": 1.0,
    "sessions_30d": 0.0,
    "has_contract": 1.0,
    "days_to_contract_end": 350.0,
    "contract_auto_renew": 0.0,
    "cancellation_notice_given": 0.0,
    "tenure_days": 410.0,
}
"""The reference each feature is replaced with (rounded training medians, see the module doc)."""

GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"days_since_last_order", "orders_30d", "orders_90d"}),
    frozenset({"orders_365d", "spend_90d", "spend_365d"}),
    frozenset({"last_nps", "has_nps"}),
    frozenset({"has_contract", "days_to_contract_end", "contract_auto_renew"}),
)


# --- plain language ---------------------------------------------------------------------


def plural(count: int, singular: str, many: str | None = None) -> str:
    """`1 complaint`, `2 complaints`, `0 complaints`."""
    return f"{count} {singular if count == 1 else (many or singular + 's')}"


def _int(value: float) -> int:
    """Counts and days as people say them: 73.6 days -> 74 (half up, not banker's rounding)."""
    return int(math.floor(value + 0.5))


def _days(value: float) -> str:
    return plural(max(0, _int(value)), "day")


def _amount(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}".rstrip("0").rstrip(".")


def _no_order_for(f: Mapping[str, float]) -> str:
    return f"no order for {_days(f['days_since_last_order'])}"


def _orders_in(window: str, feature: str) -> Callable[[Mapping[str, float]], str]:
    def render(f: Mapping[str, float]) -> str:
        count = _int(f[feature])
        return f"no order in the last {window}" if count == 0 else f"only {plural(count, 'order')} in the last {window}"
    return render


def _spend_in(window: str, feature: str) -> Callable[[Mapping[str, float]], str]:
    def render(f: Mapping[str, float]) -> str:
        value = f[feature]
        return f"no spend in the last {window}" if value <= 0 else f"spent only {_amount(value)} in the last {window}"
    return render


def _order_trend(f: Mapping[str, float]) -> str | None:
    trend = f["order_trend"]
    if trend <= -1.0:
        return "no order in the last 90 days after ordering in the 90 before"
    if trend >= 1.0:
        return None  # orders only recently: "up from nothing" is no reason to leave
    # trend = (recent - previous) / (recent + previous)  =>  recent / previous = (1 + t) / (1 - t)
    change = _int(abs(2 * trend / (1 - trend)) * 100)
    if change == 0:
        return "orders flat on the previous 90 days"
    return f"orders {'down' if trend < 0 else 'up'} {change}% on the previous 90 days"


def _count(feature: str, singular: str, suffix: str = "") -> Callable[[Mapping[str, float]], str | None]:
    def render(f: Mapping[str, float]) -> str | None:
        count = _int(f[feature])
        return f"{plural(count, singular)}{suffix}" if count > 0 else None
    return render


def _last_nps(f: Mapping[str, float]) -> str | None:
    return f"last NPS {_int(f['last_nps'])} of 10" if f.get("has_nps", 1.0) >= 0.5 else None


def _has_nps(f: Mapping[str, float]) -> str | None:
    return "never answered an NPS survey" if f["has_nps"] < 0.5 else None


def _sessions(f: Mapping[str, float]) -> str:
    count = _int(f["sessions_30d"])
    return "no session in the last 30 days" if count == 0 else f"only {plural(count, 'session')} in the last 30 days"


def _has_contract(f: Mapping[str, float]) -> str | None:
    return "no subscription contract" if f["has_contract"] < 0.5 else None


def _contract_end(f: Mapping[str, float]) -> str | None:
    days = f["days_to_contract_end"]
    if f.get("has_contract", 1.0) < 0.5 or days >= NO_CONTRACT_END_DAYS:
        return None
    renew = "" if f.get("contract_auto_renew", 0.0) >= 0.5 else " without auto-renewal"
    whole = _int(days)
    if whole < 0:
        return f"contract ended {_days(-days)} ago"
    if whole == 0:
        return f"contract ends today{renew}"
    return f"contract ends in {_days(days)}{renew}"


def _auto_renew(f: Mapping[str, float]) -> str | None:
    if f.get("has_contract", 1.0) < 0.5 or f["contract_auto_renew"] >= 0.5:
        return None
    return "contract does not renew automatically"


def _notice(f: Mapping[str, float]) -> str | None:
    return "cancellation notice given" if f["cancellation_notice_given"] >= 0.5 else None


def _tenure(f: Mapping[str, float]) -> str:
    days = max(0.0, f["tenure_days"])
    if days < 90:
        return f"customer for only {_days(days)}"
    if days < 730:
        return f"customer for {plural(_int(days / 30.44), 'month')}"
    return f"customer for {plural(_int(days / 365.25), 'year')}"


TEMPLATES: dict[str, Callable[[Mapping[str, float]], str | None]] = {
    "days_since_last_activity": lambda f: f"no activity for {_days(f['days_since_last_activity'])}",
    "days_since_last_order": _no_order_for,
    "orders_30d": _orders_in("30 days", "orders_30d"),
    "orders_90d": _orders_in("90 days", "orders_90d"),
    "orders_365d": _orders_in("12 months", "orders_365d"),
    "spend_90d": _spend_in("90 days", "spend_90d"),
    "spend_365d": _spend_in("12 months", "spend_365d"),
    "order_trend": _order_trend,
    "refunds_365d": _count("refunds_365d", "refund", " in the last 12 months"),
    "complaints_90d": _count("complaints_90d", "complaint", " in the last 90 days"),
    "tickets_open": _count("tickets_open", "unresolved support ticket"),
    "last_nps": _last_nps,
    "has_nps": _has_nps,
    "sessions_30d": _sessions,
    "has_contract": _has_contract,
    "days_to_contract_end": _contract_end,
    "contract_auto_renew": _auto_renew,
    "cancellation_notice_given": _notice,
    "tenure_days": _tenure,
}
"""One template per feature; it renders the customer's actual value, or None when the value
cannot be stated as a reason (e.g. an NPS the customer never gave)."""

assert set(TEMPLATES) == set(FEATURE_NAMES) == set(TYPICAL_CUSTOMER), "a feature lacks a template or reference"


def render(feature: str, features: Mapping[str, float]) -> str | None:
    return TEMPLATES[feature](features)


# --- contributions from the model -------------------------------------------------------


def contributions(
    estimator: Any, feature_names: Sequence[str], rows: Sequence[Mapping[str, float]],
    reference: Mapping[str, float] = TYPICAL_CUSTOMER,
    probabilities: Sequence[float] | None = None,
) -> np.ndarray:
    """(rows x features): how much each feature's actual value raises the churn probability
    over the same row with that feature set to its reference (negative = it lowers it).
    One predict_proba call over all perturbed copies (plus the rows themselves when
    `probabilities` is not given)."""
    n, m = len(rows), len(feature_names)
    if n == 0:
        return np.zeros((0, m))
    X = np.array([feature_vector(row, feature_names) for row in rows], dtype=float)
    ref = np.array([float(reference[name]) for name in feature_names], dtype=float)
    # A feature already at its reference contributes exactly nothing: only the others are
    # perturbed and scored (typically half of them or fewer).
    rows_at, features_at = np.nonzero(X != ref)
    stacked = X[rows_at].copy()
    stacked[np.arange(len(rows_at)), features_at] = ref[features_at]
    if probabilities is None:
        stacked = np.vstack([stacked, X])
    with single_threaded():  # as Predictor.predict: OpenMP (HistGradientBoosting) on one thread
        scored = estimator.predict_proba(stacked)[:, 1] if len(stacked) else np.zeros(0)
    base = np.asarray(probabilities, dtype=float) if probabilities is not None else scored[len(rows_at):]
    weights = np.zeros((n, m))
    weights[rows_at, features_at] = base[rows_at] - scored[: len(rows_at)]
    return weights


def top_reasons(
    features: Mapping[str, float], feature_names: Sequence[str], row_contributions: Sequence[float],
    limit: int = MAX_REASONS, min_contribution: float = MIN_CONTRIBUTION,
) -> list[tuple[str, float, str]]:
    """(feature, contribution, text) of the strongest risk-raising features, most important
    first, one per GROUPS entry, only those a template can state."""
    chosen: list[tuple[str, float, str]] = []
    used: set[str] = set()
    # only features strong enough can be reasons: sorting just them gives the same order of them
    # (they all come before the others), at a fraction of the cost, once per scored row
    strong = [j for j, weight in enumerate(row_contributions) if weight >= min_contribution]
    order = sorted(strong, key=lambda j: (-row_contributions[j], feature_names[j]))
    for j in order:
        weight = float(row_contributions[j])
        if weight < min_contribution or len(chosen) >= limit:
            break
        name = feature_names[j]
        if name in used:
            continue
        text = render(name, features)
        if text is None:
            continue
        chosen.append((name, weight, text))
        used.update(next((g for g in GROUPS if name in g), {name}))
    return chosen


def explain(
    estimator: Any, feature_names: Sequence[str], rows: Sequence[Mapping[str, float]],
    probabilities: Sequence[float] | None = None, reference: Mapping[str, float] = TYPICAL_CUSTOMER,
) -> list[list[str]]:
    """Plain-language reasons per row (at most MAX_REASONS, possibly none), for a batch.
    CPU-bound: call it off the event loop, as the scoring itself. Observes
    churnguard_scoring_explain_seconds once per batch."""
    started = time.perf_counter()
    try:
        weights = contributions(estimator, feature_names, rows, reference, probabilities)
        return [
            [text for _, _, text in top_reasons(row, feature_names, weights[i])]
            for i, row in enumerate(rows)
        ]
    finally:
        if rows:
            metrics.EXPLAIN_SECONDS.observe(time.perf_counter() - started)


def reference_of(predictor: Predictor) -> Mapping[str, float]:
    """The typical customer `predictor`'s reasons are measured against: its training medians, or
    the fixed TYPICAL_CUSTOMER for a model registered without them."""
    return predictor.reference or TYPICAL_CUSTOMER


def explain_scores(
    predictor: Predictor, rows: Sequence[Mapping[str, float]], probabilities: Sequence[float] | None = None,
) -> list[list[str]]:
    """explain() against the predictor's own reference."""
    return explain(predictor.estimator, predictor.feature_names, rows, probabilities, reference=reference_of(predictor))


def score_and_explain(
    estimator: Any, feature_names: Sequence[str], rows: Sequence[Mapping[str, float]],
    reference: Mapping[str, float] = TYPICAL_CUSTOMER,
) -> tuple[list[float], list[list[str]]]:
    """The churn probabilities of `rows` (what model.Predictor.predict gives, to the last bit or
    so) and their reasons
    (what `explain` gives with those probabilities), from ONE predict_proba call over the
    perturbed copies and the rows themselves: the model's fixed cost per call (a few ms for a
    calibrated boosted-tree model, however few the rows) is paid once per batch, not twice.
    Observes churnguard_scoring_explain_seconds once per batch."""
    if not rows:
        return [], []
    started = time.perf_counter()
    try:
        X = np.array([feature_vector(row, feature_names) for row in rows], dtype=float)
        ref = np.array([float(reference[name]) for name in feature_names], dtype=float)
        rows_at, features_at = np.nonzero(X != ref)
        parts = _model_parts(estimator)
        if parts is not None and np.isfinite(X).all() and np.isfinite(ref).all():
            scored = _perturbed_proba(parts, X, ref, rows_at, features_at)
        else:
            with single_threaded():  # as Predictor.predict
                scored = estimator.predict_proba(np.vstack([_copies(X, ref, rows_at, features_at), X]))[:, 1]
        # Predictor.predict's clipping. A row's probability does not depend on the rows it is
        # scored with (up to the last bit where vectorised math treats a batch's tail apart)
        base = np.clip(scored[len(rows_at):], 0.0, 1.0)
        weights = np.zeros((len(rows), len(feature_names)))
        weights[rows_at, features_at] = base[rows_at] - scored[: len(rows_at)]
        probabilities = [float(p) for p in base]
        row_weights = weights.tolist()  # Python floats: cheaper to read one by one than numpy's
        return probabilities, [
            [text for _, _, text in top_reasons(row, feature_names, row_weights[i])] for i, row in enumerate(rows)
        ]
    finally:
        metrics.EXPLAIN_SECONDS.observe(time.perf_counter() - started)


# --- the same predictions, faster, for the calibrated models training makes ------------------
#
# A perturbed copy differs from its row in ONE feature, so in a tree it follows the row's path
# until the first split on that feature where the reference value goes the other way, and only
# from there needs a walk of its own. For CalibratedClassifierCV over
# HistGradientBoostingClassifier, all trees of a fold are walked at once, level by level, as
# numpy arrays (`_Forest`): every row in every tree, noting where each of its copies leaves its
# path; then only those copies from there on. A copy's raw prediction is its row's plus, in the
# trees it left, its leaf value minus the row's; then each fold's calibrator and the mean over
# folds, as CalibratedClassifierCV.predict_proba. Same numbers up to the last bits of the sums
# (sklearn adds the trees one by one; here numpy adds them pairwise: ~1e-15 apart). With 150
# trees of 15 leaves, score_and_explain costs 0.26 / 0.5 of sklearn's own predict_proba on the
# same rows for batches of 10 / 1,000 rows, against 0.4-0.6 / 0.9-1.1 when sklearn's trees
# predicted the copies of the features they split on (`python -m bench.reasons`).
#
# For CalibratedClassifierCV over a logistic regression (alone or behind a StandardScaler, as
# training makes it), the raw predictions are the scaler's and the regression's arithmetic done
# here, as sklearn does it: sklearn's own call spends ~1.1 ms checking its input, however few the
# rows, against ~10 µs for the arithmetic of a one-event batch. Any other model: predict_proba.


WALK_MIN_ROWS = 2
"""From this many rows, a tree model's rows and copies are walked as arrays (`_walk`); a single
row goes through `_whole_proba`, whose one call into all trees merged costs less for it."""

WALK_CHUNK_ROWS = 256
"""Rows walked together: larger chunks' arrays outgrow the CPU caches (1,000 rows at once cost
~1.5x as much per row as 256)."""

MERGED_TREE_CELLS = 4_000
"""Up to this many rows x trees (a one- or two-event batch: ~11 rows per event), ONE call into a
predictor that holds all of a fold's trees (`_merged_predictor`) replaces the call per tree:
measured with 150 trees, 11 rows take 150 µs instead of 590; at ~55 rows both cost the same
(every row is copied once per tree and walks a routing tree first)."""


def _calibrate(calibrator: Any, sigmoid: tuple[Any, Any] | None, raw: np.ndarray) -> np.ndarray:
    """calibrator.predict(raw). A sigmoid is computed here as sklearn computes it, without its
    input validation (column_or_1d, ~0.2 ms per call: a tenth of a one-event batch)."""
    if sigmoid is None:
        return calibrator.predict(raw)
    a, b = sigmoid
    return expit(-(a * raw + b))


@dataclass(frozen=True)
class _Fold:
    """One calibrated boosted-tree model."""

    baseline: float
    trees: tuple[Any, ...]  # sklearn's tree predictors, in order
    bitsets: Any
    f_idx_map: Any
    calibrator: Any
    sigmoid: tuple[Any, Any] | None  # the calibrator's (a_, b_) when it is sigmoid
    merged: Any  # all the trees in one predictor (_merged_predictor)
    forest: _Forest  # all the trees as arrays (_walk)

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return _calibrate(self.calibrator, self.sigmoid, raw)

    def raw_predictions(self, rows: np.ndarray) -> np.ndarray:
        return _raw_predictions(self, rows)


@dataclass(frozen=True)
class _LinearFold:
    """One calibrated logistic regression, with the StandardScaler before it if any."""

    mean: np.ndarray | None  # the scaler's mean_ (None: no centring)
    scale: np.ndarray | None  # the scaler's scale_ (None: no scaling)
    coef: np.ndarray  # (features, 1): the regression's coef_.T
    intercept: np.ndarray
    calibrator: Any
    sigmoid: tuple[Any, Any] | None

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return _calibrate(self.calibrator, self.sigmoid, raw)

    def raw_predictions(self, rows: np.ndarray) -> np.ndarray:
        """decision_function(rows): StandardScaler.transform (subtract mean_, then divide by
        scale_, on a copy) and LogisticRegression.decision_function (rows @ coef_.T + intercept_)."""
        scaled = rows
        if self.mean is not None:
            scaled = scaled - self.mean
        if self.scale is not None:
            scaled = scaled / self.scale
        return (scaled @ self.coef + self.intercept).reshape(-1)


_PARTS: weakref.WeakKeyDictionary[Any, tuple[_Fold | _LinearFold, ...] | None] = weakref.WeakKeyDictionary()


def _model_parts(estimator: Any) -> tuple[_Fold | _LinearFold, ...] | None:
    try:
        return _PARTS[estimator]
    except (KeyError, TypeError):
        pass
    parts = None
    try:
        parts = _fold_parts(estimator)
    except Exception:  # an sklearn whose internals differ: the generic path
        parts = None
    try:
        _PARTS[estimator] = parts
    except TypeError:
        pass
    return parts


def _fold_parts(estimator: Any) -> tuple[_Fold | _LinearFold, ...] | None:
    from sklearn.calibration import CalibratedClassifierCV, _SigmoidCalibration

    if not isinstance(estimator, CalibratedClassifierCV) or len(estimator.classes_) != 2:
        return None
    folds: list[_Fold | _LinearFold] = []
    for calibrated in estimator.calibrated_classifiers_:
        model = calibrated.estimator
        if (len(calibrated.calibrators) != 1 or list(model.classes_) != list(estimator.classes_)
                or calibrated.method not in ("sigmoid", "isotonic")):
            return None
        calibrator = calibrated.calibrators[0]
        sigmoid = (calibrator.a_, calibrator.b_) if type(calibrator) is _SigmoidCalibration else None
        fold = _tree_fold(model, calibrator, sigmoid) or _linear_fold(model, calibrator, sigmoid)
        if fold is None:
            return None
        folds.append(fold)
    return tuple(folds)


def _tree_fold(model: Any, calibrator: Any, sigmoid: tuple[Any, Any] | None) -> _Fold | None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    if (type(model) is not HistGradientBoostingClassifier or model.n_trees_per_iteration_ != 1
            or model.is_categorical_ is not None):
        return None
    bitsets, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
    trees = tuple(tree for (tree,) in model._predictors)
    return _Fold(float(model._baseline_prediction.ravel()[0]), trees, bitsets, f_idx_map,
                 calibrator, sigmoid, _merged_predictor(trees, model.n_features_in_), _Forest.of(trees))


def _linear_fold(model: Any, calibrator: Any, sigmoid: tuple[Any, Any] | None) -> _LinearFold | None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = None
    if type(model) is Pipeline:
        steps = [step for _, step in model.steps if step not in (None, "passthrough")]
        if len(steps) != 2 or type(steps[0]) is not StandardScaler:
            return None
        scaler, model = steps
    if type(model) is not LogisticRegression or model.coef_.shape != (1, model.n_features_in_):
        return None
    mean = scaler.mean_ if scaler is not None and scaler.with_mean else None
    scale = scaler.scale_ if scaler is not None and scaler.with_std else None
    return _LinearFold(mean, scale, model.coef_.T, model.intercept_, calibrator, sigmoid)


def _merged_predictor(trees: Sequence[Any], n_features: int) -> Any:
    """One sklearn TreePredictor holding `trees` behind a routing tree: a row with the tree's
    number t in an extra column (index n_features) is routed to tree t's root (splits
    `t <= k - 0.5`) and then walks that tree exactly as tree.predict would (same nodes, same
    thresholds), so its prediction is tree t's leaf value."""
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    sizes = [len(tree.nodes) for tree in trees]
    routing = len(trees) - 1  # internal nodes of a binary tree with one leaf per tree
    offsets = np.cumsum([routing, *sizes[:-1]])
    nodes = np.zeros(routing + sum(sizes), dtype=PREDICTOR_RECORD_DTYPE)
    free = iter(range(routing))

    def route(lo: int, hi: int) -> int:  # the node that leads to trees lo..hi-1
        if hi - lo == 1:
            return int(offsets[lo])
        index, middle = next(free), (lo + hi) // 2
        nodes[index]["feature_idx"] = n_features
        nodes[index]["num_threshold"] = middle - 0.5
        nodes[index]["left"] = route(lo, middle)
        nodes[index]["right"] = route(middle, hi)
        return index

    if route(0, len(trees)) != 0:  # the predictor starts at node 0
        raise ValueError("routing tree must start at node 0")
    for tree, offset in zip(trees, offsets, strict=True):
        part = tree.nodes.copy()
        inner = part["is_leaf"] == 0
        part["left"][inner] += np.uint32(offset)
        part["right"][inner] += np.uint32(offset)
        nodes[offset:offset + len(part)] = part
    return TreePredictor(nodes, trees[0].binned_left_cat_bitsets, trees[0].raw_left_cat_bitsets)


def _raw_predictions(fold: _Fold, rows: np.ndarray) -> np.ndarray:
    """baseline + the sum of the trees' values for `rows` (C-contiguous float64), added tree by
    tree in order as sklearn adds them (so to the last bit)."""
    n, trees = len(rows), len(fold.trees)
    if n * trees <= MERGED_TREE_CELLS:
        copies = np.empty((n, trees, rows.shape[1] + 1))
        copies[:, :, :-1] = rows[:, None, :]
        copies[:, :, -1] = np.arange(trees)
        values = np.empty((n, trees + 1))
        values[:, 0] = fold.baseline
        values[:, 1:] = fold.merged.predict(
            copies.reshape(n * trees, -1), fold.bitsets, fold.f_idx_map, 1).reshape(n, trees)
        return np.cumsum(values, axis=1)[:, -1]  # a running sum: left to right, as the loop below
    raw = np.zeros(n) + fold.baseline
    for tree in fold.trees:
        raw += tree.predict(rows, fold.bitsets, fold.f_idx_map, 1)
    return raw


def _copies(X: np.ndarray, ref: np.ndarray, rows_at: np.ndarray, features_at: np.ndarray) -> np.ndarray:
    """Row rows_at[i] of X with feature features_at[i] replaced by its reference value, for each i."""
    copies = X[rows_at].copy()
    copies[np.arange(len(rows_at)), features_at] = ref[features_at]
    return copies


def _perturbed_proba(
    folds: tuple[_Fold | _LinearFold, ...], X: np.ndarray, ref: np.ndarray, rows_at: np.ndarray,
    features_at: np.ndarray,
) -> np.ndarray:
    """predict_proba(vstack([copies, X]))[:, 1] for a calibrated model `_model_parts` knows, where
    copy i is X[rows_at[i]] with feature features_at[i] set to ref[features_at[i]] (rows_at in
    ascending order, as np.nonzero gives them). X and ref finite."""
    if len(X) < WALK_MIN_ROWS or not all(isinstance(fold, _Fold) for fold in folds):
        return _whole_proba(folds, np.vstack([_copies(X, ref, rows_at, features_at), X]))
    m = len(rows_at)
    X = np.ascontiguousarray(X, dtype=np.float64)
    raw = np.empty(m + len(X))
    total = np.zeros(m + len(X))
    for fold in folds:
        for lo in range(0, len(X), WALK_CHUNK_ROWS):
            hi = min(lo + WALK_CHUNK_ROWS, len(X))
            first, last = np.searchsorted(rows_at, (lo, hi))
            raw[m + lo:m + hi], raw[first:last] = _walk(
                fold.forest, fold.baseline, X[lo:hi], ref, rows_at[first:last] - lo, features_at[first:last])
        total += fold.calibrate(raw)
    total /= len(folds)
    return total


@dataclass(frozen=True)
class _Forest:
    """A fold's trees as flat arrays, each node numbered once across all trees. A leaf is its
    own left and right child with threshold +inf, so a walk that reached it stays there."""

    feature: np.ndarray
    threshold: np.ndarray
    children: np.ndarray  # node i's right child at 2i, its left at 2i + 1: children[2i + goes_left]
    value: np.ndarray
    is_leaf: np.ndarray
    roots: np.ndarray
    depth: int  # the deepest leaf's depth: steps that take every walk to its leaf

    @classmethod
    def of(cls, trees: Sequence[Any]) -> _Forest:
        sizes = [len(tree.nodes) for tree in trees]
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        nodes = np.concatenate([tree.nodes for tree in trees])
        offset = np.repeat(roots, sizes)
        leaf = nodes["is_leaf"].astype(bool)
        itself = np.arange(len(nodes), dtype=np.intp)
        children = np.empty(2 * len(nodes), dtype=np.intp)
        children[0::2] = np.where(leaf, itself, nodes["right"].astype(np.intp) + offset)
        children[1::2] = np.where(leaf, itself, nodes["left"].astype(np.intp) + offset)
        return cls(
            feature=np.where(leaf, 0, nodes["feature_idx"]).astype(np.intp),
            threshold=np.where(leaf, np.inf, nodes["num_threshold"]).astype(np.float64),
            children=children, value=nodes["value"].astype(np.float64), is_leaf=leaf, roots=roots,
            depth=int(nodes["depth"].max()),
        )


def _walk(
    forest: _Forest, baseline: float, X: np.ndarray, ref: np.ndarray, rows_at: np.ndarray, features_at: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The raw predictions of X's rows and of their copies (as `_perturbed_proba`'s), as
    TreePredictor.predict computes a finite row's: left when value <= threshold."""
    n, width = X.shape
    trees = len(forest.roots)
    m = len(rows_at)
    values = X.ravel()
    ref_goes_left_at = ref[forest.feature] <= forest.threshold  # per node: where the reference goes
    # every (row, tree): where it is, whether each of its copies has left its path yet
    row_start = np.repeat(np.arange(n, dtype=np.intp) * width, trees)
    left_path = np.zeros((n * trees, width), dtype=bool)
    leaf_of = np.empty(n * trees, dtype=np.intp)
    active, at, start = np.arange(n * trees), np.tile(forest.roots, n), row_start
    departed: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (walker, feature, node)
    for step in range(forest.depth):
        feature = forest.feature[at]
        goes_left = values[start + feature] <= forest.threshold[at]
        split = np.flatnonzero(goes_left != ref_goes_left_at[at])
        if len(split):
            walker, changed = active[split], feature[split]
            first = ~left_path[walker, changed]  # a copy leaves its row's path once
            if first.any():
                walker, changed, split = walker[first], changed[first], split[first]
                left_path[walker, changed] = True
                departed.append((walker, changed, forest.children[2 * at[split] + ~goes_left[split]]))
        at = forest.children[2 * at + goes_left]
        if step % 2:  # drop the walks that reached their leaf, once they are many
            done = forest.is_leaf[at]
            if done.sum() * 4 > len(at):
                leaf_of[active[done]] = at[done]
                going = ~done
                active, at, start = active[going], at[going], start[going]
    leaf_of[active] = at
    leaf_value = forest.value[leaf_of]
    raw_rows = baseline + leaf_value.reshape(n, trees).sum(axis=1)
    raw_copies = raw_rows[rows_at]
    if departed:
        walkers = np.concatenate([d[0] for d in departed])
        changed = np.concatenate([d[1] for d in departed])
        leaves = _walk_copies(forest, values, ref_goes_left_at, row_start[walkers], changed,
                              np.concatenate([d[2] for d in departed]))
        copy_at = np.full(n * width, -1, dtype=np.intp)
        copy_at[rows_at * width + features_at] = np.arange(m)
        raw_copies = raw_copies + np.bincount(copy_at[row_start[walkers] + changed],
                                              weights=forest.value[leaves] - leaf_value[walkers], minlength=m)
    return raw_rows, raw_copies


def _walk_copies(
    forest: _Forest, values: np.ndarray, ref_goes_left_at: np.ndarray, start: np.ndarray, changed: np.ndarray,
    at: np.ndarray,
) -> np.ndarray:
    """The leaves copies reach from the nodes `at` where they left their rows' paths: the row's
    values (flat, each row from `start`) except feature `changed`, which goes where the
    reference goes."""
    leaf_of = np.empty(len(at), dtype=np.intp)
    active = np.arange(len(at))
    for step in range(forest.depth):
        feature = forest.feature[at]
        goes_left = np.where(feature == changed, ref_goes_left_at[at], values[start + feature] <= forest.threshold[at])
        at = forest.children[2 * at + goes_left]
        if step % 2:
            done = forest.is_leaf[at]
            if done.sum() * 4 > len(at):
                leaf_of[active[done]] = at[done]
                going = ~done
                active, at, start, changed = active[going], at[going], start[going], changed[going]
    leaf_of[active] = at
    return leaf_of


def _whole_proba(folds: tuple[_Fold | _LinearFold, ...], rows: np.ndarray) -> np.ndarray:
    """predict_proba(rows)[:, 1] as CalibratedClassifierCV computes it, without its per-call
    input checks (which cost more than the model itself for a few rows)."""
    rows = np.ascontiguousarray(rows, dtype=np.float64)
    total = np.zeros(len(rows))
    for fold in folds:
        total += fold.calibrate(fold.raw_predictions(rows))
    total /= len(folds)
    return total
