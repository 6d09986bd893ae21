"""The model registry API against a running service: list, detail, promote, rollback, and
models that must not be loaded (corrupt, incompatible, untrusted) — the previous one stays."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sqlalchemy import update

from services.scoring import cli_ops
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.features import FEATURE_NAMES
from services.scoring.model import ModelLoadError, TrainedModel, UntrustedArtifact
from services.scoring.tables import ScoringModel
from shared.clock import ManualClock
from shared.db import make_engine, session_scope
from shared.events import EventRecord
from shared.kafka import Publisher
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS

from .conftest import event_record, headers, register, retrained, wait_until

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
OLD, NEW = "m-20260101000000-0001", "m-20260102000000-0002"


async def _publish(kafka_settings: KafkaSettings, records: list[EventRecord]) -> None:
    publisher = Publisher(kafka_settings, "test-ingest")
    try:
        await publisher.publish_many(CUSTOMER_EVENTS, [(r.key, r.model_dump_json().encode()) for r in records])
    finally:
        await publisher.close()


def _scored_by(client: TestClient, customer: str, version: str) -> bool:
    response = client.get(f"/v1/customers/{customer}/score", headers=headers())
    return response.status_code == 200 and response.json()["model_version"] == version


def _serving(client: TestClient, version: str) -> bool:
    return f'churnguard_scoring_active_model_info{{version="{version}"}} 1.0' in client.get("/metrics").text


async def _score_one(client: TestClient, kafka_settings: KafkaSettings, customer: str, version: str) -> None:
    await _publish(kafka_settings, [event_record(customer, "feedback.nps", NOW - timedelta(days=1), {"score": 3})])
    wait_until(lambda: _scored_by(client, customer, version), what=f"{customer} scored by {version}")


async def test_list_detail_promote_and_rollback_switch_the_live_model(
    scoring_settings: ScoringSettings, kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, retrained(trained_model, OLD), activate=True)
    register(database_url, retrained(trained_model, NEW), activate=False)
    report = trained_model.report
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        models = client.get("/v1/models", headers=headers())
        assert models.status_code == 200
        listed = {m["version"]: m for m in models.json()}
        assert list(listed) == [NEW, OLD]  # newest first (trained_at, then id)
        assert listed[OLD]["active"] and not listed[NEW]["active"]
        assert "validation" not in listed[NEW] and "artifact" not in listed[NEW]

        detail = client.get(f"/v1/models/{NEW}", headers=headers())
        assert detail.status_code == 200, detail.text
        body = detail.json()
        assert body["candidate"] == report.candidate and body["roc_auc"] == report.roc_auc
        assert body["runner_up_auc"] == report.runner_up_auc and body["baseline_auc"] == report.baseline_auc
        assert body["pr_auc"] == pytest.approx(report.pr_auc) and body["brier"] == pytest.approx(report.brier)
        assert body["lift_top_decile"] == pytest.approx(report.lift_top_decile)
        assert len(body["calibration"]) == 10 and {c["name"] for c in body["candidates"]} == {
            "logistic_regression", "hist_gradient_boosting"}
        assert body["feature_names"] == list(FEATURE_NAMES) and len(body["importance"]) == len(FEATURE_NAMES)
        assert datetime.fromisoformat(body["first_cutoff"]) == datetime.fromisoformat(report.train_cutoffs[0])
        assert datetime.fromisoformat(body["last_cutoff"]) == datetime.fromisoformat(report.train_cutoffs[-1])
        assert datetime.fromisoformat(body["validation_cutoff"]) == datetime.fromisoformat(report.holdout_cutoff)
        assert body["horizon_days"] == 90
        assert body["reasons_reference"] == pytest.approx(report.reference) and set(body["reasons_reference"]) == set(
            FEATURE_NAMES)

        missing = client.get("/v1/models/m-missing", headers=headers())
        assert missing.status_code == 404 and missing.json()["detail"] == "no model 'm-missing' in the registry"
        assert client.post("/v1/models/m-missing/promote", headers=headers()).status_code == 404
        assert client.post(f"/v1/models/{NEW}/promote", headers=headers(token=None)).status_code == 401
        assert client.post("/v1/models/rollback", headers=headers(token="wrong")).status_code == 401
        not_admin = client.post(f"/v1/models/{NEW}/promote", headers=headers(tenant="globex"))
        assert not_admin.status_code == 403 and "operator tenants" in not_admin.json()["detail"]
        assert client.post("/v1/models/rollback", headers=headers(tenant="globex")).status_code == 403
        assert client.get(f"/v1/models/{'x' * 65}", headers=headers()).json()["detail"][0]["loc"] == ["path", "version"]

        wait_until(lambda: _serving(client, OLD), what="the active model loaded")
        await _score_one(client, kafka_settings, "c-1", OLD)

        promoted = client.post(f"/v1/models/{NEW}/promote", headers=headers())
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["active"] and promoted.json()["previous_version"] == OLD
        assert datetime.fromisoformat(promoted.json()["activated_at"]) == NOW
        assert [m["version"] for m in client.get("/v1/models", headers=headers()).json() if m["active"]] == [NEW]
        wait_until(lambda: _serving(client, NEW), what="the promoted model picked up")
        await _score_one(client, kafka_settings, "c-2", NEW)
        # promoting the active model again changes nothing
        again = client.post(f"/v1/models/{NEW}/promote", headers=headers())
        assert again.status_code == 200 and again.json()["previous_version"] == OLD

        rolled = client.post("/v1/models/rollback", headers=headers())
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["version"] == OLD and rolled.json()["active"]
        wait_until(lambda: _serving(client, OLD), what="the rolled-back model picked up")
        await _score_one(client, kafka_settings, "c-3", OLD)

        # OLD was the first active model: nothing further to roll back to
        conflict = client.post("/v1/models/rollback", headers=headers())
        assert conflict.status_code == 409
        assert conflict.json()["detail"] == f"model {OLD} has no previously active model to roll back to"
        assert [m["version"] for m in client.get("/v1/models", headers=headers()).json() if m["active"]] == [OLD]


def test_rollback_without_an_active_model_is_a_conflict(
    scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, retrained(trained_model, OLD), activate=False)
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        response = client.post("/v1/models/rollback", headers=headers())
        assert response.status_code == 409
        assert response.json()["detail"] == "no model is active, so there is nothing to roll back from"


def _not_sklearn(x):  # noqa: ANN001, ANN202
    return x


def _register_broken(database_url: str, trained: TrainedModel) -> dict[str, str]:
    """Models that must never score: corrupt serving arrays, a corrupt artifact where there are
    no serving arrays (a model registered before them), a feature this code does not compute,
    a type outside sklearn/numpy. Returns version -> expected refusal."""
    register(database_url, retrained(trained, "m-corrupt"), activate=False)
    register(database_url, retrained(trained, "m-corrupt-artifact"), activate=False)
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            session.execute(update(ScoringModel).where(ScoringModel.version == "m-corrupt").values(serving=b"PK\x03\x04 junk"))
            session.execute(update(ScoringModel).where(ScoringModel.version == "m-corrupt-artifact")
                            .values(serving=None, artifact=b"PK\x03\x04 junk"))
    finally:
        engine.dispose()
    other_features = replace(trained.report, version="m-features", feature_names=(*FEATURE_NAMES[:-1], "churn_vibes"))
    register(database_url, TrainedModel(estimator=trained.estimator, report=other_features), activate=False)
    X = np.arange(38, dtype=float).reshape(2, 19)
    foreign = Pipeline([("f", FunctionTransformer(_not_sklearn)), ("s", StandardScaler())]).fit(X)
    register(database_url, TrainedModel(estimator=foreign, report=replace(trained.report, version="m-foreign")), activate=False)
    return {
        "m-corrupt": "model m-corrupt cannot be promoted: model m-corrupt: serving arrays are not a readable .npz file",
        "m-corrupt-artifact": "model m-corrupt-artifact cannot be promoted: model m-corrupt-artifact: "
                              "model artifact is not a readable skops file",
        "m-features": "model m-features cannot be promoted: model m-features needs features this code does not compute: churn_vibes",
        "m-foreign": "model m-foreign cannot be promoted: model m-foreign: model artifact contains untrusted types:",
    }


def test_broken_models_are_refused_and_the_previous_model_stays(
    scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, retrained(trained_model, OLD), activate=True)
    refusals = _register_broken(database_url, trained_model)
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        scoring = client.app_state["scoring"]
        wait_until(lambda: _serving(client, OLD), what="the good model loaded")
        for version, message in refusals.items():
            response = client.post(f"/v1/models/{version}/promote", headers=headers())
            assert response.status_code == 409, response.text
            assert response.json()["detail"].startswith(message), response.json()["detail"]
            assert [m["version"] for m in client.get("/v1/models", headers=headers()).json() if m["active"]] == [OLD]

        # activated behind the API's back (operator, or bytes damaged in the database): the
        # running scorer refuses to load it and keeps scoring with the model it has
        for version, error in (("m-corrupt", ModelLoadError), ("m-corrupt-artifact", ModelLoadError),
                               ("m-features", ModelLoadError), ("m-foreign", UntrustedArtifact)):
            assert cli_ops.activate(database_url, version)
            with pytest.raises(error, match=f"model {version}"):
                client.portal.call(scoring.refresh_model)
            assert scoring.predictor.version == OLD
            assert _serving(client, OLD)
            assert client.get("/readyz").json()["checks"]["model"] is True

        # a good model activated again is picked up as usual
        assert cli_ops.activate(database_url, OLD)
        client.portal.call(scoring.refresh_model)
        assert scoring.predictor.version == OLD


def test_a_tenant_sees_only_the_models_trained_on_its_own_history(
    scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel
) -> None:
    register(database_url, retrained(trained_model, OLD), activate=True, tenant="sim")  # scores everyone
    register(database_url, retrained(trained_model, NEW), activate=False, tenant="globex")
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        def versions(tenant: str) -> list[str]:
            return [m["version"] for m in client.get("/v1/models", headers=headers(tenant)).json()]

        assert versions("acme") == [NEW, OLD]  # an operator (model_admin_tenants) sees the registry
        assert versions("globex") == [NEW]
        assert versions("initech") == []
        assert client.get(f"/v1/models/{NEW}", headers=headers("globex")).status_code == 200
        for tenant, version in (("initech", NEW), ("initech", OLD), ("globex", OLD)):
            response = client.get(f"/v1/models/{version}", headers=headers(tenant))
            assert response.status_code == 404 and set(response.json()) == {"detail"}
