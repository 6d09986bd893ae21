"""The read API through TestClient (lifespan runs): auth, tenancy, 404s, bad input, the registry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient

from services.scoring import service
from services.scoring.app import create_app
from services.scoring.config import ScoringSettings
from services.scoring.model import Predictor, TrainedModel
from services.scoring.tables import TABLES
from shared.clock import ManualClock
from shared.db import create_tables, make_engine, session_scope

from .conftest import event_record, headers, register, retrained

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)


def _seed_scores(database_url: str, trained: TrainedModel) -> None:
    """Score two customers of tenant acme through the real service code and database."""
    predictor = Predictor(trained.report.version, trained.report.feature_names, trained.estimator, trained.report.roc_auc)
    records = [
        event_record("c-1", "order.completed", NOW - timedelta(days=3), {"order_id": "o1", "amount": "59.90", "currency": "EUR"}),
        event_record("c-1", "support.complaint", NOW - timedelta(days=1), {"severity": "high"}),
        event_record("c-2", "feedback.nps", NOW - timedelta(days=2), {"score": 10}),
        # same customer id at another tenant, in the same batch: a different customer
        event_record("c-1", "feedback.nps", NOW - timedelta(days=5), {"score": 4}, tenant="globex"),
    ]
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        with session_scope(engine) as session:
            service.process_batch(session, records, predictor, service.Bands(), NOW)
    finally:
        engine.dispose()


def test_latest_score_with_features(scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel) -> None:
    _seed_scores(database_url, trained_model)
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        response = client.get("/v1/customers/c-1/score", headers=headers())
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["customer_id"] == "c-1"
        assert 0.0 <= body["probability"] <= 1.0
        assert body["band"] == service.Bands().band(body["probability"])
        assert body["model_version"] == trained_model.report.version
        assert datetime.fromisoformat(body["scored_at"]) == NOW
        assert body["features"]["orders_30d"] == 1.0 and body["features"]["complaints_90d"] == 1.0
        assert body["features"]["spend_90d"] == 59.9

        other = client.get("/v1/customers/c-2/score", headers=headers()).json()
        assert other["features"]["last_nps"] == 10.0


def test_tenants_auth_and_bad_input(scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel) -> None:
    _seed_scores(database_url, trained_model)
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        missing = client.get("/v1/customers/c-404/score", headers=headers())
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no score for customer 'c-404' yet"

        # another tenant cannot see acme's customers; its own c-1 is its own
        assert client.get("/v1/customers/c-2/score", headers=headers(tenant="globex")).status_code == 404
        theirs = client.get("/v1/customers/c-1/score", headers=headers(tenant="globex")).json()
        assert theirs["features"]["last_nps"] == 4.0 and theirs["features"]["orders_30d"] == 0.0
        assert client.get("/v1/customers/c-1/score", headers=headers(tenant="initech")).status_code == 404

        assert client.get("/v1/customers/c-1/score", headers=headers(token=None)).status_code == 401
        assert client.get("/v1/customers/c-1/score", headers=headers(token="wrong")).status_code == 401
        assert client.get("/v1/models", headers=headers(token=None)).status_code == 401
        no_tenant = client.get("/v1/customers/c-1/score", headers={"X-Churnguard-Internal-Token": "test-internal-token"})
        assert no_tenant.status_code == 400 and "X-Churnguard-Tenant" in no_tenant.json()["detail"]

        too_long = client.get(f"/v1/customers/{'x' * 129}/score", headers=headers())
        assert too_long.status_code == 422
        assert too_long.json()["detail"][0]["loc"] == ["path", "customer_id"]


def test_models_lists_the_registry_without_artifacts(
    scoring_settings: ScoringSettings, database_url: str, trained_model: TrainedModel
) -> None:
    older = register(database_url, retrained(trained_model, "m-20260101000000-aaaa"), activate=True)
    newer = register(database_url, retrained(trained_model, "m-20260102000000-bbbb"), activate=True)
    with TestClient(create_app(scoring_settings, ManualClock(NOW))) as client:
        response = client.get("/v1/models", headers=headers())
        assert response.status_code == 200
        models = {m["version"]: m for m in response.json()}
        assert set(models) == {older.version, newer.version}
        assert models[newer.version]["active"] and not models[older.version]["active"]
        assert models[newer.version]["roc_auc"] == trained_model.report.roc_auc
        assert models[newer.version]["baseline_auc"] == trained_model.report.baseline_auc
        assert models[newer.version]["feature_names"] == list(trained_model.report.feature_names)
        assert all("artifact" not in m for m in models.values())
