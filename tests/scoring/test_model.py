"""Training on simulated history, the registry, artifacts, refusing to train on too little."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from services.scoring import cli_ops, repository
from services.scoring.features import FEATURE_NAMES
from services.scoring.model import (
    InsufficientData,
    Predictor,
    TrainedModel,
    UntrustedArtifact,
    _timelines,
    build_examples,
    dump_artifact,
    load_artifact,
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
    assert report.positives >= 50 and report.negatives >= 50
    assert report.n_train == report.positives + report.negatives
    assert report.n_holdout == report.holdout_positives + report.holdout_negatives > 0
    assert report.version.startswith("m-") and len(report.version) == len("m-20260101000000-abcd")
    # time-based holdout: no training label window reaches into the holdout period
    holdout = datetime.fromisoformat(report.holdout_cutoff)
    assert all(datetime.fromisoformat(c) + timedelta(days=90) <= holdout for c in report.train_cutoffs)
    assert holdout + timedelta(days=90) <= SIM_END
    assert report.feature_names == FEATURE_NAMES


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


def test_too_little_data_is_refused_with_a_clear_message() -> None:
    with pytest.raises(InsufficientData, match="too little data: training needs at least 50 churned"):
        train(simulated_histories(40, seed=2))
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

    first = cli_ops.train(database_url, "acme", horizon_days=90, activate=True)
    assert first.activated and first.roc_auc > 0.7 and first.n_customers == 600
    assert f"model {first.version} (active): holdout ROC AUC" in first.summary()
    assert cli_ops.has_active_model(database_url)
    with pytest.raises(InsufficientData, match="no stored events"):
        cli_ops.train(database_url, "other-tenant", horizon_days=90, activate=True)

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
