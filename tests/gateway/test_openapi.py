"""The merged API description at /openapi.json and /docs, and /readyz."""

from __future__ import annotations

from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.openapi import merge_openapi
from tests.conftest import PG_ADMIN_DSN


def test_merged_openapi_holds_the_public_upstream_paths_and_requires_a_key(client: TestClient) -> None:
    response = client.get("/openapi.json")  # no key needed to read the description
    assert response.status_code == 200
    doc = response.json()
    paths = doc["paths"]
    assert set(paths["/v1/events"]) == {"post"}
    assert "/v1/events/batch" in paths and "/v1/schema" in paths
    assert set(paths["/v1/customers/{customer_id}/score"]) == {"get"}
    assert "/v1/models/{version}/activate" in paths
    assert {"get", "post"} <= set(paths["/v1/webhooks"])
    assert "put" not in paths["/v1/webhooks"]  # scoring's PUT: that path belongs to actions
    assert "/v1/customers/{customer_id}/offers" in paths and "/v1/deliveries/{delivery_id}/replay" in paths
    assert "/internal/thing" not in paths  # not in the route table
    assert "/healthz" not in paths and "/metrics" not in paths

    schemes = doc["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {**schemes["HTTPBearer"], "type": "http", "scheme": "bearer"}
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key" and schemes["APIKeyHeader"]["in"] == "header"
    for path, item in paths.items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                assert operation["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}], (method, path)
                assert "401" in operation["responses"]

    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" in schemas
    # ingest's Thing is used only by an internal path, so it stays out; scoring's and actions'
    # differ, so both survive under distinct names, each operation pointing at its own
    assert schemas["Thing"]["properties"]["value"]["type"] == "integer"
    assert schemas["actions_Thing"]["properties"]["value"]["type"] == "string"
    ok = paths["/v1/webhooks/thing"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/actions_Thing"}
    assert "Incomplete" not in doc["info"]["description"]


def test_docs_render_swagger_ui_for_the_merged_description(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in response.text and "/openapi.json" in response.text
    assert client.get("/redoc").status_code == 404  # FastAPI's own docs are gone


def test_openapi_with_an_upstream_down_serves_the_rest_and_says_so(settings: GatewaySettings, dead_url: str) -> None:
    with TestClient(create_app(settings.model_copy(update={"actions_url": dead_url}))) as client:
        doc = client.get("/openapi.json").json()
    assert "/v1/events" in doc["paths"] and "/v1/models" in doc["paths"]
    assert not any(p.startswith(("/v1/webhooks", "/v1/deliveries")) for p in doc["paths"])
    assert "actions" in doc["info"]["description"] and "Incomplete" in doc["info"]["description"]


def test_merge_renames_clashing_schemas_and_rewrites_their_refs() -> None:
    def doc(path: str, value_type: str) -> dict:
        ref = {"$ref": "#/components/schemas/Thing"}
        return {
            "openapi": "3.1.0",
            "paths": {path: {"get": {"operationId": "get_thing", "responses": {
                "200": {"content": {"application/json": {"schema": ref}}}}}}},
            "components": {"schemas": {
                "Thing": {"type": "object", "properties": {"v": {"type": value_type}}},
                "Private": {"type": "object"},  # referenced by no public operation
            }},
        }

    merged = merge_openapi(
        {"scoring": doc("/v1/models", "integer"), "actions": doc("/v1/webhooks", "string"), "ingest": None},
        title="t", version="1", description="d",
    )
    schemas = merged["components"]["schemas"]
    assert schemas["Thing"]["properties"]["v"]["type"] == "integer"
    assert schemas["actions_Thing"]["properties"]["v"]["type"] == "string"
    assert "Private" not in schemas
    webhooks = merged["paths"]["/v1/webhooks"]["get"]
    assert webhooks["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/actions_Thing"
    assert webhooks["operationId"] == "actions_get_thing"  # operation ids stay unique
    assert "ingest" in merged["info"]["description"]


def test_readyz_is_the_database_and_reports_upstreams(settings: GatewaySettings, dead_url: str) -> None:
    with TestClient(create_app(settings.model_copy(update={"scoring_url": dead_url}))) as client:
        response = client.get("/readyz")
    assert response.status_code == 200  # an upstream being down does not make the gateway unready
    body = response.json()
    assert body["checks"] == {"database": True}
    assert body["diagnostics"]["upstreams"] == {"ingest": "reachable", "scoring": "unreachable", "actions": "reachable"}


def test_readyz_fails_when_the_database_goes_away(settings: GatewaySettings, database_url: str) -> None:
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        _take_database_away(database_url)
        app.state.gateway.engine.dispose()  # no pooled connection to an already-open file
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not ready" and response.json()["checks"] == {"database": False}


def _take_database_away(database_url: str) -> None:
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
        path.mkdir()  # a directory where the database file was: SQLite cannot open it
        return
    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
