"""Reasons: plain-language templates, contributions from the model (any model), and the reasons
travelling with the score through the consumer, the score API and churn-scores."""

from __future__ import annotations

import itertools
from dataclasses import replace
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from services.scoring import reasons, serving
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.features import FEATURE_NAMES, compute_features
from services.scoring.model import ModelLoadError, Predictor, TrainedModel, dump_artifact, load_predictor
from services.scoring.model import serving_arrays
from services.scoring.reasons import TYPICAL_CUSTOMER, contributions, explain, explain_scores, render, top_reasons
from services.scoring.serving import ServingModel, perturbed_copies
from services.scoring.service import load_active_predictor, score_id_for
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.events import ScoreRecord
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES, CUSTOMER_EVENTS

from .conftest import event_record, headers, read_topic, register, simulated_histories, wait_until

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)


def _features(**values: float) -> dict[str, float]:
    return {**TYPICAL_CUSTOMER, **values}


# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(("feature", "values", "expected"), [
    ("days_since_last_order", {"days_since_last_order": 73.6}, "no order for 74 days"),
    ("days_since_last_order", {"days_since_last_order": 1.2}, "no order for 1 day"),
    ("days_since_last_activity", {"days_since_last_activity": 30.0}, "no activity for 30 days"),
    ("orders_30d", {"orders_30d": 0.0}, "no order in the last 30 days"),
    ("orders_90d", {"orders_90d": 1.0}, "only 1 order in the last 90 days"),
    ("orders_365d", {"orders_365d": 2.0}, "only 2 orders in the last 12 months"),
    ("spend_90d", {"spend_90d": 0.0}, "no spend in the last 90 days"),
    ("spend_90d", {"spend_90d": 12.5}, "spent only 12.5 in the last 90 days"),
    ("spend_365d", {"spend_365d": 1234.56}, "spent only 1,235 in the last 12 months"),
    ("order_trend", {"order_trend": -3 / 7}, "orders down 60% on the previous 90 days"),
    ("order_trend", {"order_trend": -1.0}, "no order in the last 90 days after ordering in the 90 before"),
    ("order_trend", {"order_trend": 1.0}, None),
    ("refunds_365d", {"refunds_365d": 1.0}, "1 refund in the last 12 months"),
    ("complaints_90d", {"complaints_90d": 3.0}, "3 complaints in the last 90 days"),
    ("complaints_90d", {"complaints_90d": 1.0}, "1 complaint in the last 90 days"),
    ("complaints_90d", {"complaints_90d": 0.0}, None),
    ("tickets_open", {"tickets_open": 2.0}, "2 unresolved support tickets"),
    ("tickets_open", {"tickets_open": 1.0}, "1 unresolved support ticket"),
    ("last_nps", {"last_nps": 2.0, "has_nps": 1.0}, "last NPS 2 of 10"),
    ("last_nps", {"last_nps": 7.0, "has_nps": 0.0}, None),  # the neutral stand-in, never given
    ("has_nps", {"has_nps": 0.0}, "never answered an NPS survey"),
    ("has_nps", {"has_nps": 1.0}, None),
    ("sessions_30d", {"sessions_30d": 0.0}, "no session in the last 30 days"),
    ("sessions_30d", {"sessions_30d": 1.0}, "only 1 session in the last 30 days"),
    ("has_contract", {"has_contract": 0.0}, "no subscription contract"),
    ("days_to_contract_end", {"days_to_contract_end": 12.0, "contract_auto_renew": 0.0},
     "contract ends in 12 days without auto-renewal"),
    ("days_to_contract_end", {"days_to_contract_end": 1.0, "contract_auto_renew": 1.0}, "contract ends in 1 day"),
    ("days_to_contract_end", {"days_to_contract_end": 0.0, "contract_auto_renew": 0.0},
     "contract ends today without auto-renewal"),
    ("days_to_contract_end", {"days_to_contract_end": -5.0}, "contract ended 5 days ago"),
    ("days_to_contract_end", {"days_to_contract_end": 3650.0, "has_contract": 0.0}, None),
    ("contract_auto_renew", {"contract_auto_renew": 0.0}, "contract does not renew automatically"),
    ("contract_auto_renew", {"contract_auto_renew": 0.0, "has_contract": 0.0}, None),
    ("cancellation_notice_given", {"cancellation_notice_given": 1.0}, "cancellation notice given"),
    ("cancellation_notice_given", {"cancellation_notice_given": 0.0}, None),
    ("tenure_days", {"tenure_days": 20.0}, "customer for only 20 days"),
    ("tenure_days", {"tenure_days": 31.0 * 6}, "customer for 6 months"),
    ("tenure_days", {"tenure_days": 365.25 * 3}, "customer for 3 years"),
])
def test_templates_render_the_actual_value(feature: str, values: dict[str, float], expected: str | None) -> None:
    assert render(feature, _features(**values)) == expected


def test_every_feature_has_a_template_and_a_reference() -> None:
    assert set(reasons.TEMPLATES) == set(FEATURE_NAMES) == set(TYPICAL_CUSTOMER)


def test_top_reasons_rank_keep_only_risk_raising_and_word_related_features_once() -> None:
    names = ("days_since_last_order", "orders_90d", "complaints_90d", "last_nps", "tenure_days", "has_nps")
    row = _features(days_since_last_order=74.0, orders_90d=0.0, complaints_90d=2.0, last_nps=2.0, has_nps=1.0)
    weights = [0.20, 0.15, 0.10, 0.30, -0.05, 0.004]
    # orders_90d is in the same group as days_since_last_order; tenure lowers the risk; has_nps is below the floor
    assert top_reasons(row, names, weights) == [
        ("last_nps", 0.30, "last NPS 2 of 10"),
        ("days_since_last_order", 0.20, "no order for 74 days"),
        ("complaints_90d", 0.10, "2 complaints in the last 90 days"),
    ]
    assert [f for f, _, _ in top_reasons(row, names, weights, limit=5)] == [
        "last_nps", "days_since_last_order", "complaints_90d",
    ]
    assert top_reasons(row, names, [-0.1, 0.0, 0.001, -0.2, 0.0, 0.0]) == []
    # a member whose value cannot be stated (NPS never given) leaves the group to the next member
    silent = _features(has_nps=0.0, last_nps=7.0)
    assert top_reasons(silent, ("last_nps", "has_nps"), [0.2, 0.1]) == [
        ("has_nps", 0.1, "never answered an NPS survey"),
    ]


# --- from the model ----------------------------------------------------------------------


_ids = itertools.count()


def _history(kind: str, days_ago: float, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"e{next(_ids)}", "type": kind, "customer_id": "x",
            "occurred_at": (NOW - timedelta(days=days_ago)).isoformat(), "data": data or {}}


def _contract(days_ago: float, ends_in: int, auto_renew: bool) -> dict[str, Any]:
    return _history("subscription.started", days_ago, {
        "contract_id": "k-1", "plan": "basic", "price": "9.90", "currency": "EUR",
        "start_date": (NOW - timedelta(days=days_ago)).date().isoformat(),
        "end_date": (NOW + timedelta(days=ends_in)).date().isoformat(), "auto_renew": auto_renew,
    })


def _order(days_ago: float, amount: str = "30.00") -> dict[str, Any]:
    return _history("order.completed", days_ago, {"order_id": f"o-{days_ago}", "amount": amount, "currency": "EUR"})


def at_risk_customer() -> dict[str, float]:
    """Complaints, an open ticket, a low NPS, a contract ending soon, no order for 74 days."""
    return compute_features([
        _history("customer.profile_updated", 500, {"signed_up_at": (NOW - timedelta(days=500)).isoformat()}),
        _contract(350, ends_in=12, auto_renew=False),
        _order(150), _order(74),
        _history("support.complaint", 20), _history("support.complaint", 10),
        _history("support.ticket_opened", 9, {"ticket_id": "t-1"}),
        _history("feedback.nps", 5, {"score": 2}),
    ], NOW)


def loyal_customer() -> dict[str, float]:
    """Orders every 12 days, NPS 10, an auto-renewing contract, customer for 800 days."""
    return compute_features([
        _history("customer.profile_updated", 800, {"signed_up_at": (NOW - timedelta(days=800)).isoformat()}),
        _contract(300, ends_in=300, auto_renew=True),
        *(_order(days, "60.00") for days in range(2, 360, 12)),
        _history("feedback.nps", 30, {"score": 10}),
        _history("session.recorded", 3),
    ], NOW)


RISK_TEXTS = ("complaint", "NPS", "no order", "order in the last", "contract ends", "unresolved support ticket")


def test_the_trained_model_names_what_makes_a_customer_risky_and_nothing_for_a_loyal_one(
    trained_model: TrainedModel,
) -> None:
    estimator, names = trained_model.estimator, trained_model.report.feature_names
    risky, loyal = at_risk_customer(), loyal_customer()
    predictor = Predictor("v", names, estimator, 0.8)
    p_risky, p_loyal = predictor.predict([risky, loyal])
    assert p_risky > 5 * p_loyal

    risky_reasons, loyal_reasons = explain(estimator, names, [risky, loyal], [p_risky, p_loyal])
    assert 2 <= len(risky_reasons) <= 3
    assert all(any(word in text for word in RISK_TEXTS) for text in risky_reasons), risky_reasons
    assert "2 complaints in the last 90 days" in risky_reasons
    assert "last NPS 2 of 10" in risky_reasons

    weights = contributions(estimator, names, [risky, loyal])
    # the loyal customer: nothing raises the risk noticeably, so no (or only low-weight) reasons
    assert weights[1].max() < 0.02
    assert len(loyal_reasons) <= 1
    # the reasons are the strongest risk-raising contributions, most important first
    ranked = [f for f, _, _ in top_reasons(risky, names, weights[0])]
    assert [render(f, risky) for f in ranked] == risky_reasons
    ranked_weights = [weights[0][names.index(f)] for f in ranked]
    assert ranked_weights == sorted(ranked_weights, reverse=True)


class _Counting:
    """Any estimator: records the shape of each predict_proba call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, ...]] = []

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self.calls.append(X.shape)
        return self.inner.predict_proba(X)


def test_one_predict_proba_per_batch_over_rows_times_features(trained_model: TrainedModel) -> None:
    names = trained_model.report.feature_names
    rows = [at_risk_customer(), loyal_customer(), dict(TYPICAL_CUSTOMER)]
    counting = _Counting(trained_model.estimator)
    before = REGISTRY.get_sample_value("churnguard_scoring_explain_seconds_count") or 0.0
    probabilities = Predictor("v", names, trained_model.estimator, 0.8).predict(rows)
    out = explain(counting, names, rows, probabilities)
    differing = sum(row[name] != TYPICAL_CUSTOMER[name] for row in rows for name in names)
    assert 0 < differing < len(rows) * len(names)
    assert counting.calls == [(differing, len(names))]  # only features away from the reference
    assert REGISTRY.get_sample_value("churnguard_scoring_explain_seconds_count") == before + 1
    assert out[2] == []  # the reference customer itself: nothing differs, nothing to explain
    assert explain(counting, names, []) == []


def test_skipping_features_at_the_reference_changes_no_contribution(trained_model: TrainedModel) -> None:
    names = trained_model.report.feature_names
    rows = [at_risk_customer(), loyal_customer(), dict(TYPICAL_CUSTOMER)]
    X = np.array([[row[name] for name in names] for row in rows], dtype=float)
    base = trained_model.estimator.predict_proba(X)[:, 1]
    brute = np.zeros((len(rows), len(names)))
    for j, name in enumerate(names):  # every feature of every row, the slow way
        perturbed = X.copy()
        perturbed[:, j] = TYPICAL_CUSTOMER[name]
        brute[:, j] = base - trained_model.estimator.predict_proba(perturbed)[:, 1]
    assert np.allclose(contributions(trained_model.estimator, names, rows), brute, atol=1e-12)


def _dropping(feature_names: Sequence[str], dropped: Sequence[str], final: Any) -> Pipeline:
    """A model that never looks at `dropped` (the columns are removed before the estimator)."""
    drop = [feature_names.index(name) for name in dropped]
    return Pipeline([
        ("select", ColumnTransformer([("drop", "drop", drop)], remainder="passthrough")),
        ("scale", StandardScaler()),
        ("model", final),
    ])


@pytest.mark.parametrize("final", [
    LogisticRegression(max_iter=2000),
    HistGradientBoostingClassifier(max_iter=30, random_state=0),
], ids=["logistic", "gradient-boosting"])
def test_a_feature_without_influence_is_never_a_reason(final: Any) -> None:
    """Works for any model; the reasons follow the model, not hand-written rules: customers
    with complaints and a low NPS are not told so by a model that ignores both."""
    as_of = datetime(2026, 6, 1, tzinfo=timezone.utc)
    rows = [compute_features(events, as_of) for events in simulated_histories(300, seed=5, end=as_of).values()]
    X = np.array([[row[name] for name in FEATURE_NAMES] for row in rows])
    y = X[:, FEATURE_NAMES.index("tickets_open")] >= 1  # the only signal in this world
    assert 20 < y.sum() < len(y) - 20
    ignored = ("complaints_90d", "last_nps", "has_nps")
    model = _dropping(FEATURE_NAMES, ignored, final).fit(X, y.astype(int))

    batch = [*rows, at_risk_customer()]
    weights = contributions(model, FEATURE_NAMES, batch)
    # zero up to the last bit of floating point (BLAS may sum a row in another order)
    assert np.allclose(weights[:, [FEATURE_NAMES.index(name) for name in ignored]], 0.0, rtol=0, atol=1e-12)
    explained = explain(model, FEATURE_NAMES, batch)
    texts = [text for row in explained for text in row]
    assert texts, "the model's own signals must show up as reasons"
    assert not any("complaint" in text or "NPS" in text for text in texts)
    assert any("unresolved support ticket" in text for text in explained[-1]), explained[-1]


# --- through the consumer, the API and churn-scores -------------------------------------


async def test_reasons_are_stored_served_and_published_with_the_score(
    scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, trained_model)
    at = NOW - timedelta(days=1)
    records = [
        event_record("c-risk", "subscription.started", NOW - timedelta(days=350), {
            "contract_id": "k-1", "plan": "basic", "price": "9.90", "currency": "EUR",
            "start_date": (NOW - timedelta(days=350)).date().isoformat(),
            "end_date": (NOW + timedelta(days=12)).date().isoformat(), "auto_renew": False,
        }),
        event_record("c-risk", "order.completed", NOW - timedelta(days=74),
                     {"order_id": "o1", "amount": "30.00", "currency": "EUR"}),
        event_record("c-risk", "support.complaint", NOW - timedelta(days=20), {"severity": "high"}),
        event_record("c-risk", "support.complaint", NOW - timedelta(days=10), {"severity": "medium"}),
        event_record("c-risk", "feedback.nps", at, {"score": 2}),
    ]
    explained_before = REGISTRY.get_sample_value("churnguard_scoring_explain_seconds_count") or 0.0
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        publisher = Publisher(kafka_settings, "test-ingest")
        try:
            await publisher.publish_many(CUSTOMER_EVENTS, [(r.key, r.model_dump_json().encode()) for r in records])
        finally:
            await publisher.close()

        def scored_with_everything() -> dict | None:
            response = client.get("/v1/customers/c-risk/score", headers=headers())
            body = response.json() if response.status_code == 200 else None
            complete = body and body["features"]["complaints_90d"] == 2.0 and body["features"]["has_nps"] == 1.0
            return body if complete else None

        body = wait_until(scored_with_everything, what="c-risk scored with all its events")
        assert body["reasons"], body
        assert len(body["reasons"]) <= 3
        assert "2 complaints in the last 90 days" in body["reasons"]
        assert "last NPS 2 of 10" in body["reasons"]
        assert (REGISTRY.get_sample_value("churnguard_scoring_explain_seconds_count") or 0.0) > explained_before
        assert "churnguard_scoring_explain_seconds_bucket" in client.get("/metrics").text

    wanted = score_id_for("acme", body["event_id"])
    published = await read_topic(
        kafka_settings, CHURN_SCORES,
        until=lambda rs: any(ScoreRecord.model_validate_json(r.value).score_id == wanted for r in rs),
    )
    record = next(s for s in (ScoreRecord.model_validate_json(r.value) for r in published) if s.score_id == wanted)
    assert record.reasons == body["reasons"]
    assert record.probability == body["probability"]


def test_each_model_measures_reasons_against_the_typical_customer_of_its_own_training(
    trained_model: TrainedModel, database_url: str,
) -> None:
    report = trained_model.report
    assert set(report.reference) == set(FEATURE_NAMES)
    # medians of the training examples: counts are whole numbers, flags 0 or 1
    assert report.reference["orders_365d"] == int(report.reference["orders_365d"]) >= 0
    assert report.reference["has_contract"] in (0.0, 0.5, 1.0)

    register(database_url, trained_model)  # stored with the model, loaded with it
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            predictor = load_active_predictor(session)
    finally:
        engine.dispose()
    assert predictor is not None and predictor.reference == pytest.approx(report.reference)

    typical = dict(predictor.reference)
    unusual = {**typical, "complaints_90d": typical["complaints_90d"] + 3}
    p_typical, p_unusual = predictor.predict([typical, unusual])
    typical_reasons, unusual_reasons = explain_scores(predictor, [typical, unusual], [p_typical, p_unusual])
    assert typical_reasons == []  # the model's own typical customer: nothing stands out
    assert unusual_reasons == [render("complaints_90d", unusual)]  # only what differs can be a reason

    legacy = replace(predictor, reference=None)  # a model registered before references were stored
    assert explain_scores(legacy, [typical], [p_typical]) == explain(
        predictor.estimator, predictor.feature_names, [typical], [p_typical], reference=TYPICAL_CUSTOMER)


def test_a_reference_that_lacks_a_feature_is_refused_at_load(trained_model: TrainedModel) -> None:
    names = trained_model.report.feature_names
    reference = {name: 0.0 for name in names[1:]}
    with pytest.raises(ModelLoadError, match=f"reasons reference lacks {names[0]}"):
        load_predictor("m-x", names, dump_artifact(trained_model.estimator), 0.8, reference=reference)


def test_score_and_explain_is_predict_then_explain_in_one_model_call(trained_model: TrainedModel) -> None:
    from services.scoring.features import compute_features
    from services.scoring.reasons import score_and_explain

    from .conftest import SIM_END, simulated_histories

    names = trained_model.report.feature_names
    rows = [compute_features(events, SIM_END - timedelta(days=d))
            for d in (0, 40, 200) for events in simulated_histories(120, seed=5).values()]
    rows += [at_risk_customer(), loyal_customer(), dict(TYPICAL_CUSTOMER)]
    predictor = Predictor("v", names, trained_model.estimator, 0.8)
    expected_probabilities = predictor.predict(rows)
    expected_reasons = explain(trained_model.estimator, names, rows, expected_probabilities)
    counting = _Counting(trained_model.estimator)
    probabilities, why = score_and_explain(counting, names, rows)
    assert len(counting.calls) == 1
    # the same per-row computations; only vectorised math may round a row's last bit differently
    # by its position in the batch (as it already could between predict and explain)
    assert np.allclose(probabilities, expected_probabilities, rtol=0, atol=1e-12)
    assert why == expected_reasons
    assert sum(bool(r) for r in why) > len(rows) // 4  # many rows do have reasons
    assert score_and_explain(counting, names, []) == ([], [])


def _far_rows(names: Sequence[str], rng: np.random.Generator) -> list[dict[str, float]]:
    """Hand-built customers, and random ones far outside any training range."""
    return [at_risk_customer(), loyal_customer(), dict(TYPICAL_CUSTOMER)] + [
        {name: float(rng.choice([TYPICAL_CUSTOMER[name], rng.normal(0, 500)])) for name in names} for _ in range(50)
    ]


def _rows_at_thresholds(form: ServingModel, names: Sequence[str], rng: np.random.Generator) -> list[dict[str, float]]:
    """Typical customers with one or more features exactly at a split threshold of the model's
    trees (a value equal to the threshold goes left), or at the reference value."""
    splits = [(int(fold.forest.feature[i]), float(fold.forest.threshold[i]))
              for fold in form.folds for i in np.flatnonzero(~fold.forest.is_leaf)]
    rows = []
    for _ in range(40):
        row = dict(TYPICAL_CUSTOMER)
        for k in rng.choice(len(splits), size=int(rng.integers(1, 4))):
            feature, threshold = splits[int(k)]
            row[names[feature]] = threshold
        rows.append(row)
    return rows


def _assert_serving_gives_predict_proba(
    estimator: Any, form: ServingModel, names: Sequence[str], rows: Sequence[dict[str, float]]
) -> np.ndarray:
    """The serving form's probabilities of the rows and their perturbed copies (the walk) and
    of the stacked rows (predict_proba) equal sklearn's predict_proba over the same stacked
    rows, and so do those of the form read back from its serving file; returns the rows' matrix."""
    X = np.array([[row[name] for name in names] for row in rows], dtype=float)
    ref = np.array([TYPICAL_CUSTOMER[name] for name in names])
    rows_at, features_at = np.nonzero(X != ref)
    stacked = np.vstack([perturbed_copies(X, ref, rows_at, features_at), X])
    expected = estimator.predict_proba(stacked)
    for model in (form, ServingModel.from_bytes(form.to_bytes())):
        walked = model.perturbed_proba(X, ref, rows_at, features_at)
        assert walked.shape == expected[:, 1].shape
        assert np.allclose(walked, expected[:, 1], rtol=0, atol=1e-12)
        assert np.allclose(model.predict_proba(stacked), expected, rtol=0, atol=1e-12)
    return X


def _training_like_rows(seed: int) -> tuple[list[dict[str, float]], np.ndarray, np.ndarray]:
    names = list(FEATURE_NAMES)
    rows = [compute_features(events, datetime(2026, 6, 1, tzinfo=timezone.utc) - timedelta(days=d))
            for d in (0, 90, 200) for events in simulated_histories(150, seed=8).values()]
    X_fit = np.array([[row[name] for name in names] for row in rows], dtype=float)
    rng = np.random.default_rng(seed)
    y = ((X_fit[:, 0] > 30) ^ (rng.random(len(X_fit)) < 0.2)).astype(int)
    return rows, X_fit, y


@pytest.mark.parametrize("ensemble", [False, True], ids=["one-model", "fold-models"])
@pytest.mark.parametrize(("walk_min_rows", "walk_chunk_rows"), [(2, 256), (1, 7), (10**9, 256)],
                         ids=["walked", "walked-in-chunks", "rows-only"])
def test_the_boosted_tree_serving_form_gives_what_predict_proba_gives(
    ensemble: bool, walk_min_rows: int, walk_chunk_rows: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ServingModel (all trees walked as arrays, the copies only from where they leave their
    rows' paths, in one chunk or several; or the copies walked as rows of their own, as for a
    single row) against sklearn's predict_proba over the same stacked
    rows, for sigmoid-calibrated boosted-tree models like training's (one model, and the average
    of fold models that earlier versions registered): realistic rows at several cutoffs,
    hand-built ones, random ones far outside the training range, ones exactly at split
    thresholds, and a single row (a one-event batch)."""
    from sklearn.calibration import CalibratedClassifierCV

    names = list(FEATURE_NAMES)
    rows, X_fit, y = _training_like_rows(3)
    estimator = CalibratedClassifierCV(
        HistGradientBoostingClassifier(max_iter=60, max_leaf_nodes=15, random_state=0), method="sigmoid", cv=3,
        ensemble=ensemble,
    ).fit(X_fit, y)
    monkeypatch.setattr(serving, "WALK_MIN_ROWS", walk_min_rows)
    monkeypatch.setattr(serving, "WALK_CHUNK_ROWS", walk_chunk_rows)
    form = reasons._serving_form(estimator)
    assert form is not None and len(form.folds) == (3 if ensemble else 1)
    assert all(isinstance(fold, serving.TreeFold) for fold in form.folds)

    rng = np.random.default_rng(3)
    rows += _far_rows(names, rng) + _rows_at_thresholds(form, names, rng)
    _assert_serving_gives_predict_proba(estimator, form, names, rows)
    _assert_serving_gives_predict_proba(estimator, form, names, [at_risk_customer()])
    probabilities, why = reasons.score_and_explain(estimator, names, rows)  # takes the serving form
    assert why == explain(estimator, names, rows, Predictor("v", tuple(names), estimator, 0.8).predict(rows))
    assert reasons.score_and_explain(form, names, rows) == (probabilities, why)
    assert sum(bool(r) for r in why) > 10


# Unscaled features (centre-only, bare) keep lbfgs from converging in 2,000 iterations; the test
# is about the serving form giving what the fitted estimator gives, however well it fitted.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("ensemble", [False, True], ids=["one-model", "fold-models"])
@pytest.mark.parametrize("front", ["scaler", "centre-only", "bare"])
def test_the_logistic_serving_form_gives_what_predict_proba_gives(ensemble: bool, front: str) -> None:
    """The sigmoid-calibrated logistic regression (training's other candidate) as a ServingModel
    against sklearn's predict_proba over the same stacked rows: realistic rows at several
    cutoffs, hand-built ones and random ones far outside the training range; score_and_explain
    takes the serving form (sklearn's predict_proba is never called) and gives the probabilities
    and reasons predict and explain give."""
    from sklearn.calibration import CalibratedClassifierCV

    names = list(FEATURE_NAMES)
    rows, X_fit, y = _training_like_rows(4)
    regression = LogisticRegression(C=0.5, max_iter=2000)
    model = {"scaler": Pipeline([("scale", StandardScaler()), ("lr", regression)]),
             "centre-only": Pipeline([("scale", StandardScaler(with_std=False)), ("lr", regression)]),
             "bare": regression}[front]
    estimator = CalibratedClassifierCV(model, method="sigmoid", cv=3, ensemble=ensemble).fit(X_fit, y)
    form = reasons._serving_form(estimator)
    assert form is not None and len(form.folds) == (3 if ensemble else 1)
    assert all(isinstance(fold, serving.LinearFold) for fold in form.folds)

    rows += _far_rows(names, np.random.default_rng(4))
    X = _assert_serving_gives_predict_proba(estimator, form, names, rows)
    for size in (1, 3):  # a one-event batch scores a handful of rows
        assert np.allclose(form.churn_probability(X[:size]), estimator.predict_proba(X[:size])[:, 1],
                           rtol=0, atol=1e-12)
    predicted = Predictor("v", tuple(names), estimator, 0.8).predict(rows)
    expected_reasons = explain(estimator, names, rows, predicted)

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the serving form should not call predict_proba")

    estimator.predict_proba = never  # type: ignore[method-assign]
    probabilities, why = reasons.score_and_explain(estimator, names, rows)
    assert np.allclose(probabilities, predicted, rtol=0, atol=1e-12)
    assert why == expected_reasons
    assert sum(bool(r) for r in why) > 10


def test_models_without_a_serving_form_take_predict_proba() -> None:
    """A model of another shape (isotonic calibration, a second transformer, a scaler other
    than StandardScaler, another classifier, no calibration) has no serving form: sklearn
    computes its probabilities, and the reasons from them."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.naive_bayes import GaussianNB
    from sklearn.preprocessing import MinMaxScaler

    rng = np.random.default_rng(6)
    X = rng.normal(0, 10, size=(300, len(FEATURE_NAMES)))
    y = (X[:, 0] + rng.normal(0, 5, size=300) > 0).astype(int)
    calibrated = [
        CalibratedClassifierCV(model, method="sigmoid", cv=3, ensemble=False).fit(X, y)
        for model in (Pipeline([("a", StandardScaler()), ("b", StandardScaler()), ("lr", LogisticRegression())]),
                      Pipeline([("scale", MinMaxScaler()), ("lr", LogisticRegression())]),
                      GaussianNB())
    ]
    calibrated.append(CalibratedClassifierCV(LogisticRegression(), method="isotonic", cv=3).fit(X, y))
    calibrated.append(HistGradientBoostingClassifier(max_iter=20).fit(X, y))
    for estimator in calibrated:
        assert reasons._serving_form(estimator) is None
        assert serving_arrays(estimator) is None
        rows = [dict(zip(FEATURE_NAMES, map(float, x))) for x in X[:5]]
        probabilities, _ = reasons.score_and_explain(estimator, list(FEATURE_NAMES), rows)
        assert np.allclose(probabilities, estimator.predict_proba(X[:5])[:, 1], rtol=0, atol=1e-12)


def test_missing_values_go_where_the_trees_send_them() -> None:
    """A row with missing (NaN) features, scored by a boosted-tree serving form, takes the
    branch each split learnt for missing values, as sklearn's trees do. (Features are never
    missing today; a model trained on data with gaps must still score as it was validated.)"""
    from sklearn.calibration import CalibratedClassifierCV

    rng = np.random.default_rng(5)
    X_fit = rng.normal(0, 10, size=(600, len(FEATURE_NAMES)))
    X_fit[rng.random(X_fit.shape) < 0.1] = np.nan
    y = (np.nan_to_num(X_fit[:, 0], nan=8.0) + rng.normal(0, 5, size=600) > 0).astype(int)
    estimator = CalibratedClassifierCV(HistGradientBoostingClassifier(max_iter=30, random_state=0),
                                       method="sigmoid", cv=3, ensemble=False).fit(X_fit, y)
    form = ServingModel.from_bytes(serving_arrays(estimator))
    assert any(fold.forest.missing_left[~fold.forest.is_leaf].any() for fold in form.folds)
    rows = rng.normal(0, 15, size=(200, len(FEATURE_NAMES)))
    rows[rng.random(rows.shape) < 0.2] = np.nan
    assert np.allclose(form.predict_proba(rows), estimator.predict_proba(rows), rtol=0, atol=1e-12)
    named = [dict(zip(FEATURE_NAMES, map(float, x))) for x in rows[:20]]
    probabilities = Predictor("v", FEATURE_NAMES, form, 0.8).predict(named)
    assert np.allclose(probabilities, estimator.predict_proba(rows[:20])[:, 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("tenant", ["acme", "t_1a2b", "ünïcode tenant"])
def test_score_ids_are_the_uuid5_of_tenant_and_event(tenant: str) -> None:
    """service.score_id_for computes uuid5 by hand (it runs once per scored event): the same ids
    as uuid.uuid5, which every score published so far carries."""
    import uuid

    from services.scoring.service import _SCORE_NAMESPACE

    for event_id in ["e-1", "", "x" * 200, "ev/with/slashes", *(f"b{n}-{n * 7919}" for n in range(500))]:
        assert score_id_for(tenant, event_id) == uuid.uuid5(_SCORE_NAMESPACE, f"{tenant}/{event_id}").hex
