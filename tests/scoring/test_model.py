"""Training on simulated history, the registry, artifacts, refusing to train on too little."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from services.scoring import cli_ops, repository
from services.scoring.features import FEATURE_NAMES
from services.scoring.model import (
    CANDIDATES,
    InsufficientData,
    ModelLoadError,
    Predictor,
    TrainedModel,
    UntrustedArtifact,
    _timelines,
    build_examples,
    calibration_bins,
    dump_artifact,
    load_artifact,
    load_predictor,
    top_decile_lift,
    train,
)
from services.scoring.simulate import simulate_history
from shared.db import make_engine, session_scope
from shared.events import EVENT_TYPES, parse_event

from .conftest import SIM_END, register, retrained, simulated_histories


def test_simulation_is_valid_deterministic_and_bounded() -> None:
    events = list(simulate_history(200, seed=5, end=SIM_END))
    assert events == list(simulate_history(200, seed=5, end=SIM_END))
    assert events != list(simulate_history(200, seed=6, end=SIM_END))
    assert len({e["id"] for e in events}) == len(events)
    parsed = [parse_event(e) for e in events]
    assert all(p.occurred_at <= SIM_END for p in parsed)
    assert all(p.occurred_at.tzinfo is not None for p in parsed)
    kinds = {p.type for p in parsed}
    assert kinds <= set(EVENT_TYPES)
    assert {"order.completed", "subscription.renewed", "subscription.ended",
            "subscription.cancellation_notice", "feedback.nps", "support.complaint"} <= kinds
    assert all(p.data.currency == "EUR" for p in parsed if p.type == "order.completed")


def test_training_report_beats_the_recency_baseline(trained_model: TrainedModel) -> None:
    report = trained_model.report
    assert report.roc_auc > 0.7
    assert report.roc_auc > report.baseline_auc + 0.05, report
    assert report.positives >= 100 and report.negatives >= 100
    assert report.n_train == report.positives + report.negatives
    assert report.n_holdout == report.holdout_positives + report.holdout_negatives > 0
    assert report.version.startswith("m-") and len(report.version) == len("m-20260101000000-abcd")
    # time-based holdout: no training label window reaches into the holdout period
    holdout = datetime.fromisoformat(report.holdout_cutoff)
    assert all(datetime.fromisoformat(c) + timedelta(days=90) <= holdout for c in report.train_cutoffs)
    assert holdout + timedelta(days=90) <= SIM_END
    assert report.feature_names == FEATURE_NAMES


def test_both_candidates_compete_and_the_better_one_wins(trained_model: TrainedModel) -> None:
    report = trained_model.report
    by_name = {c.name: c for c in report.candidates}
    assert set(by_name) == {c.name for c in CANDIDATES} == {"logistic_regression", "hist_gradient_boosting"}
    winner = max(report.candidates, key=lambda c: c.roc_auc)
    assert [c.name for c in report.candidates if c.winner] == [winner.name] == [report.candidate]
    assert report.roc_auc == winner.roc_auc and report.algorithm == winner.algorithm
    assert report.runner_up_auc == min(c.roc_auc for c in report.candidates)
    assert all(c.roc_auc > report.baseline_auc for c in report.candidates)
    # the estimator is the winner's kind
    inner = trained_model.estimator.calibrated_classifiers_[0].estimator
    expected = HistGradientBoostingClassifier if report.candidate == "hist_gradient_boosting" else Pipeline
    assert isinstance(inner, expected)
    # validation-period metrics, recomputed from the stored validation data
    v = report.validation
    assert v is not None and len(v.labels) == report.n_holdout == len(v.probabilities) == len(v.baseline)
    y, p = np.array(v.labels), np.array(v.probabilities)
    assert sum(v.labels) == report.holdout_positives
    assert report.roc_auc == pytest.approx(roc_auc_score(y, p))
    assert report.baseline_auc == pytest.approx(roc_auc_score(y, np.array(v.baseline)))
    assert report.pr_auc == pytest.approx(average_precision_score(y, p))
    assert report.brier == pytest.approx(brier_score_loss(y, p))
    assert report.pr_auc > y.mean() * 2 and 0.0 < report.brier < 0.1
    assert report.lift_top_decile == pytest.approx(top_decile_lift(y, p)) and report.lift_top_decile > 3
    assert len(report.calibration) == 10 and sum(b["count"] for b in report.calibration) == report.n_holdout
    assert all(abs(b["mean_predicted"] - b["observed"]) < 0.15 for b in report.calibration)
    assert {i["feature"] for i in report.importance} == set(FEATURE_NAMES)
    assert report.importance[0]["mean"] >= report.importance[-1]["mean"] and report.importance[0]["mean"] > 0
    summary = report.summary()
    assert all(name in summary for name in by_name) and "<- winner" in summary and "recency only" in summary


def test_metric_helpers_on_hand_made_data() -> None:
    y = np.array([1] * 10 + [0] * 90)
    perfect = np.linspace(1, 0, 100)
    assert top_decile_lift(y, perfect) == pytest.approx(10.0)
    assert top_decile_lift(np.zeros(10, dtype=int), perfect[:10]) != top_decile_lift(y, perfect)  # NaN: no churners
    bins = calibration_bins(y, perfect)
    assert len(bins) == 10 and [b["count"] for b in bins] == [10] * 10
    assert bins[-1]["observed"] == 1.0 and bins[0]["observed"] == 0.0


def test_probabilities_are_calibrated(trained_model: TrainedModel) -> None:
    histories = simulated_histories(1500, seed=11)
    report = trained_model.report
    cutoffs = [datetime.fromisoformat(c) for c in report.train_cutoffs]
    examples = build_examples(_timelines(histories), cutoffs, 90)
    probabilities = trained_model.estimator.predict_proba(examples.X)[:, 1]
    assert 0.0 <= probabilities.min() and probabilities.max() <= 1.0
    assert probabilities.mean() == pytest.approx(examples.y.mean(), abs=0.02)
    # the riskiest tenth churns far more often than the safest half
    order = np.argsort(probabilities)
    top, bottom = examples.y[order[-len(order) // 10:]].mean(), examples.y[order[: len(order) // 2]].mean()
    assert top > 5 * bottom


def test_artifact_round_trip_predicts_the_same(trained_model: TrainedModel) -> None:
    blob = dump_artifact(trained_model.estimator)
    loaded = load_artifact(blob)
    X = np.random.default_rng(0).normal(size=(50, len(FEATURE_NAMES))) * 30
    assert np.allclose(loaded.predict_proba(X), trained_model.estimator.predict_proba(X))
    predictor = Predictor("v", FEATURE_NAMES, loaded, 0.8)
    rows = [dict(zip(FEATURE_NAMES, row, strict=True)) for row in X[:3]]
    assert predictor.predict(rows) == pytest.approx(list(trained_model.estimator.predict_proba(X[:3])[:, 1]))


def _not_sklearn(x):  # noqa: ANN001, ANN202
    return x


def test_artifact_with_foreign_types_is_refused() -> None:
    X = np.arange(20, dtype=float).reshape(10, 2)
    pipeline = Pipeline([("f", FunctionTransformer(_not_sklearn)), ("s", StandardScaler())]).fit(X)
    with pytest.raises(UntrustedArtifact, match="untrusted types"):
        load_artifact(dump_artifact(pipeline))


def test_the_scoring_service_loads_artifacts_without_importing_all_of_sklearn_or_alembic(
    trained_model: TrainedModel, tmp_path: Path,
) -> None:
    """Resident memory (#8): skops' default trust list would import every sklearn estimator, and
    the schema check would import Alembic and Mako; neither is needed to start (tables created,
    then found complete, as at every later start) and score."""
    script = (
        "import sys, services.scoring.app\n"
        "from services.scoring.model import load_artifact\n"
        "from services.scoring.tables import TABLES\n"
        "from shared.db import create_tables, make_engine\n"
        "engine = make_engine(sys.argv[1])\n"
        "create_tables(engine, TABLES)\n"
        "create_tables(engine, TABLES)\n"
        "load_artifact(sys.stdin.buffer.read())\n"
        "print(sorted(m for m in ('alembic', 'mako', 'sklearn.neural_network', 'sklearn.gaussian_process')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'scoring.db'}"],
                          input=dump_artifact(trained_model.estimator),
                          capture_output=True, check=True, cwd=Path(__file__).parents[2])
    assert done.stdout.decode().strip() == "[]"


def test_corrupt_or_incompatible_artifacts_are_refused_at_load(trained_model: TrainedModel) -> None:
    blob = dump_artifact(trained_model.estimator)
    names = list(FEATURE_NAMES)
    assert load_predictor("ok", names, blob, 0.8).version == "ok"
    with pytest.raises(ModelLoadError, match="model bad: model artifact is not a readable skops file"):
        load_predictor("bad", names, b"this is not a zip", 0.8)
    with pytest.raises(ModelLoadError, match="model cut: model artifact"):
        load_predictor("cut", names, blob[: len(blob) // 2], 0.8)
    with pytest.raises(ModelLoadError, match="model new needs features this code does not compute: churn_vibes"):
        load_predictor("new", [*names[:-1], "churn_vibes"], blob, 0.8)
    with pytest.raises(ModelLoadError, match="expects 19 features but its feature list names 18"):
        load_predictor("narrow", names[:-1], blob, 0.8)
    X = np.arange(20, dtype=float).reshape(10, 2)
    foreign = Pipeline([("f", FunctionTransformer(_not_sklearn)), ("s", StandardScaler())]).fit(X)
    with pytest.raises(UntrustedArtifact, match="model evil: model artifact contains untrusted types"):
        load_predictor("evil", names[:2], dump_artifact(foreign), 0.8)
    with pytest.raises(ModelLoadError, match="has no predict_proba"):
        load_predictor("scaler", names[:2], dump_artifact(StandardScaler().fit(X)), 0.8)


def test_too_little_data_is_refused_with_a_clear_message() -> None:
    few = simulated_histories(40, seed=2)
    with pytest.raises(InsufficientData, match="too little data: training needs at least 100 churned and 100 retained"):
        train(few)
    with pytest.raises(InsufficientData, match=r"at least 30 churned and 30 retained examples, got \d+ churned"):
        train(few, min_per_class=30)
    # the threshold is a parameter: small data trains when it is lowered
    small = train(few, min_per_class=5, min_holdout_per_class=1)
    assert small.report.positives >= 5 and len(small.report.candidates) == 2
    with pytest.raises(InsufficientData, match="no stored events"):
        train({})
    short = {"c": [e for e in simulated_histories(1, seed=2)["sim2-00000"]
                   if e.occurred_at > SIM_END - timedelta(days=100)]}
    with pytest.raises(InsufficientData, match="needs at least 240 days"):
        train(short)


def test_cli_simulate_train_and_registry_through_the_database(
    database_url: str, tmp_path: Path, trained_model: TrainedModel
) -> None:
    out = tmp_path / "events.ndjson"
    count = cli_ops.simulate(database_url, "acme", customers=600, seed=4, end=SIM_END, out=out)
    lines = out.read_text().splitlines()
    assert count == len(lines) > 10_000
    assert parse_event(json.loads(lines[0])).customer_id.startswith("sim4-")
    # simulating again stores nothing new (same ids): training sees the same history
    assert _stored_events(database_url, "acme") == count
    assert cli_ops.simulate(database_url, "acme", customers=50, seed=4, end=SIM_END, out=None) > 0
    assert _stored_events(database_url, "acme") == count
    assert not cli_ops.has_active_model(database_url)

    first = cli_ops.train(database_url, "acme", horizon_days=90, activate=True, reports_dir=tmp_path / "reports")
    assert first.activated and first.roc_auc > 0.7 and first.n_customers == 600
    assert f"model {first.version} (active): {first.candidate} wins with holdout ROC AUC" in first.summary()
    assert first.report_path == str(tmp_path / "reports" / first.version / "index.html")
    assert Path(first.report_path).is_file() and f"report: {first.report_path}" in first.summary()
    assert cli_ops.has_active_model(database_url)
    with pytest.raises(InsufficientData, match="no stored events"):
        cli_ops.train(database_url, "other-tenant", horizon_days=90, activate=True, reports_dir=None)
    stored = {m["version"]: m for m in cli_ops.list_models(database_url)}[first.version]
    assert stored["report_path"] == first.report_path and stored["candidate"] == first.candidate
    assert stored["pr_auc"] == pytest.approx(first.pr_auc) and stored["runner_up_auc"] == first.runner_up_auc
    assert stored["first_cutoff"] == datetime.fromisoformat(first.train_cutoffs[0])
    assert stored["validation_cutoff"] == datetime.fromisoformat(first.holdout_cutoff)

    second = register(database_url, retrained(trained_model, "m-20260601000000-beef"), activate=False)
    models = {m["version"]: m for m in cli_ops.list_models(database_url)}
    assert models[first.version]["active"] and not models[second.version]["active"]
    assert "artifact" not in models[first.version]

    third = register(database_url, retrained(trained_model, "m-20260601000001-cafe"), activate=True)
    active = [m["version"] for m in cli_ops.list_models(database_url) if m["active"]]
    assert active == [third.version]
    assert cli_ops.activate(database_url, first.version)
    assert [m["version"] for m in cli_ops.list_models(database_url) if m["active"]] == [first.version]
    assert not cli_ops.activate(database_url, "m-missing")


def _stored_events(database_url: str, tenant: str) -> int:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return repository.count_events(session, tenant)
    finally:
        engine.dispose()


def test_simulate_to_a_file_only(tmp_path: Path) -> None:
    out = tmp_path / "only.ndjson"
    count = cli_ops.simulate(None, "acme", 3, 1, datetime(2026, 1, 1, tzinfo=timezone.utc), out)
    assert count == len(out.read_text().splitlines()) > 0
    with pytest.raises(ValueError, match="database_url, an output file"):
        cli_ops.simulate(None, "acme", 10, 1, SIM_END, None)
