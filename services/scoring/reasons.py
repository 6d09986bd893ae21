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
from typing import Any

import numpy as np

from services.scoring import metrics
from services.scoring.features import FEATURE_NAMES, NO_CONTRACT_END_DAYS, feature_vector
from services.scoring.model import Predictor, single_threaded
from services.scoring.serving import ServingModel, perturbed_copies

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
    stacked = perturbed_copies(X, ref, rows_at, features_at)
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
        form = _serving_form(estimator)
        if form is not None and np.isfinite(X).all() and np.isfinite(ref).all():
            scored = form.perturbed_proba(X, ref, rows_at, features_at)
        else:
            with single_threaded():  # as Predictor.predict
                scored = estimator.predict_proba(np.vstack([perturbed_copies(X, ref, rows_at, features_at), X]))[:, 1]
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


# --- the model's fast form --------------------------------------------------------------

_SERVING_FORMS: weakref.WeakKeyDictionary[Any, ServingModel | None] = weakref.WeakKeyDictionary()


def _serving_form(estimator: Any) -> ServingModel | None:
    """The estimator as arrays (services.scoring.serving), which score a row and its perturbed
    copies at a fraction of sklearn's cost (`python -m bench.reasons`); None for a model of
    another kind, which sklearn's predict_proba scores."""
    if isinstance(estimator, ServingModel):
        return estimator
    try:
        return _SERVING_FORMS[estimator]
    except (KeyError, TypeError):
        pass
    try:
        form = ServingModel.from_estimator(estimator)
    except Exception:  # an sklearn whose internals differ: the generic path
        form = None
    try:
        _SERVING_FORMS[estimator] = form
    except TypeError:
        pass
    return form
