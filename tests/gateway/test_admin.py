"""The admin API on a real gateway with real upstreams and a real database: tenants, scoped
keys (shown once), listing without hashes, revocation effective at once, rotation with an
overlap, per-tenant rate limits, and the audit log of all of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant
from services.gateway.service import hash_key
from shared.clock import ManualClock

ADMIN_KEY = "admin-" + "0123456789abcdef" * 3
BOOTSTRAP = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 6, 1, tzinfo=timezone.utc))


@pytest.fixture
def admin_settings(settings: GatewaySettings) -> GatewaySettings:
    # A long key cache: what the admin API changes must not wait for it to expire.
    return settings.model_copy(update={"admin_key": SecretStr(ADMIN_KEY), "auth_cache_s": 60.0})


@pytest.fixture
def admin(admin_settings: GatewaySettings, clock: ManualClock) -> Iterator[TestClient]:
    with TestClient(create_app(admin_settings, clock)) as client:
        yield client


def _tenant(admin: TestClient, name: str = "acme") -> str:
    response = admin.post("/v1/admin/tenants", json={"name": name}, headers=BOOTSTRAP)
    assert response.status_code == 201, response.text
    return response.json()["tenant_id"]


def _key(admin: TestClient, tenant_id: str, scopes: list[str] | None = None) -> dict:
    body = {} if scopes is None else {"scopes": scopes}
    response = admin.post(f"/v1/admin/tenants/{tenant_id}/keys", json=body, headers=BOOTSTRAP)
    assert response.status_code == 201, response.text
    return response.json()


def _as(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def test_no_admin_api_without_the_admin_key(client: TestClient) -> None:
    response = client.post("/v1/admin/tenants", json={"name": "x"}, headers=BOOTSTRAP)
    assert response.status_code == 404
    assert "no such endpoint" in response.json()["detail"]


def test_a_short_admin_key_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="admin_key") as error:
        GatewaySettings(admin_key=SecretStr("too-short"))
    assert "at least 32 characters" in str(error.value)
    assert "too-short" not in str(error.value)  # the secret is not echoed


def test_bootstrap_creates_a_tenant_and_a_scoped_key_shown_once(admin: TestClient) -> None:
    tenant_id = _tenant(admin)
    issued = _key(admin, tenant_id, ["events:write"])
    assert issued["api_key"].startswith("cg_") and issued["api_key"].startswith(issued["prefix"])
    assert issued["scopes"] == ["events:write"] and issued["tenant_id"] == tenant_id

    sent = admin.post("/v1/events", json={"id": "e1"}, headers=_as(issued["api_key"]))
    assert sent.status_code == 200 and sent.json()["tenant"] == tenant_id
    refused = admin.get("/v1/customers/c-1/score", headers=_as(issued["api_key"]))
    assert refused.status_code == 403
    assert "lacks the scope 'scores:read'" in refused.json()["detail"]
    assert admin.get("/v1/admin/tenants", headers=_as(issued["api_key"])).status_code == 403

    listed = admin.get(f"/v1/admin/tenants/{tenant_id}/keys", headers=BOOTSTRAP)
    assert listed.status_code == 200
    (key,) = listed.json()
    assert key["key_id"] == issued["key_id"] and key["scopes"] == ["events:write"]
    assert key["last_used_at"] is not None and key["revoked_at"] is None
    assert set(key) == {"key_id", "tenant_id", "prefix", "scopes", "created_at", "last_used_at",
                        "revoked_at", "expires_at"}
    assert issued["api_key"] not in listed.text and hash_key(issued["api_key"]) not in listed.text


def test_keys_get_every_tenant_scope_by_default_but_never_admin(
    admin: TestClient, database_url: str
) -> None:
    tenant_id = _tenant(admin)
    issued = _key(admin, tenant_id)
    assert issued["scopes"] == ["events:write", "scores:read", "models:admin", "actions:admin"]
    _, cli_key = create_tenant(database_url, "from-the-cli")  # keys issued before scopes existed
    for key in (issued["api_key"], cli_key):
        for method, path in (("POST", "/v1/events"), ("GET", "/v1/customers/c-1/score"),
                             ("POST", "/v1/models/m-1/activate"), ("GET", "/v1/webhooks"),
                             ("GET", "/v1/customers/c-1/offers"), ("PUT", "/v1/policies/p")):
            assert admin.request(method, path, headers=_as(key)).status_code == 200, (method, path)
        denied = admin.get("/v1/admin/tenants", headers=_as(key))
        assert denied.status_code == 403 and "'admin'" in denied.json()["detail"]


def test_each_scope_opens_its_own_routes_only(admin: TestClient) -> None:
    tenant_id = _tenant(admin)
    routes = {
        "events:write": [("POST", "/v1/events"), ("POST", "/v1/events/batch"), ("GET", "/v1/schema")],
        "scores:read": [("GET", "/v1/customers/c-1/score"), ("GET", "/v1/models"),
                        ("GET", "/v1/customers/c-1/decisions"), ("GET", "/v1/reports/uplift")],
        "models:admin": [("POST", "/v1/models/rollback")],
        "actions:admin": [("POST", "/v1/webhooks"), ("GET", "/v1/deliveries"), ("GET", "/v1/policies")],
    }
    keys = {scope: _key(admin, tenant_id, [scope])["api_key"] for scope in routes}
    for scope, key in keys.items():
        for route_scope, paths in routes.items():
            for method, path in paths:
                status = admin.request(method, path, headers=_as(key)).status_code
                assert status == (200 if route_scope == scope else 403), (scope, method, path)


def test_bad_admin_input_is_named(admin: TestClient) -> None:
    tenant_id = _tenant(admin)
    duplicate = admin.post("/v1/admin/tenants", json={"name": "acme"}, headers=BOOTSTRAP)
    assert duplicate.status_code == 409 and "exists already" in duplicate.json()["detail"]
    blank = admin.post("/v1/admin/tenants", json={"name": "   "}, headers=BOOTSTRAP)
    assert blank.status_code == 422 and "name" in blank.text
    unknown = admin.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"scopes": ["root"]},
                         headers=BOOTSTRAP)
    assert unknown.status_code == 422 and "unknown scope 'root'" in unknown.text
    assert "scopes" in json.dumps(unknown.json()["detail"][0]["loc"])
    empty = admin.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"scopes": []}, headers=BOOTSTRAP)
    assert empty.status_code == 422
    nobody = admin.post("/v1/admin/tenants/t_nobody/keys", json={}, headers=BOOTSTRAP)
    assert nobody.status_code == 404 and "t_nobody" in nobody.json()["detail"]
    assert admin.post("/v1/admin/keys/k_nobody/revoke", headers=BOOTSTRAP).status_code == 404
    overlap = admin.post("/v1/admin/keys/k_x/rotate", json={"overlap_s": -1}, headers=BOOTSTRAP)
    assert overlap.status_code == 422 and "overlap_s" in overlap.text
    limit = admin.put(f"/v1/admin/tenants/{tenant_id}/rate-limit",
                      json={"requests_per_s": 1e-300, "burst": 1}, headers=BOOTSTRAP)
    assert limit.status_code == 422 and "requests_per_s" in limit.text


def test_admin_callers_must_prove_themselves(admin: TestClient) -> None:
    assert admin.get("/v1/admin/tenants").status_code == 401
    wrong = admin.get("/v1/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}x"})
    assert wrong.status_code == 401 and ADMIN_KEY not in wrong.text
    assert admin.get("/v1/admin/tenants", headers=_as(ADMIN_KEY)).status_code == 200


def test_revocation_through_the_admin_api_is_immediate_in_this_process(admin: TestClient) -> None:
    tenant_id = _tenant(admin)
    issued = _key(admin, tenant_id)
    other = _key(admin, tenant_id)
    assert admin.get("/v1/models", headers=_as(issued["api_key"])).status_code == 200  # now cached
    revoked = admin.post(f"/v1/admin/keys/{issued['key_id']}/revoke", headers=BOOTSTRAP)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    # The key cache holds keys for 60 s here; the revocation does not wait for it.
    refused = admin.get("/v1/models", headers=_as(issued["api_key"]))
    assert refused.status_code == 401 and refused.json()["detail"] == "invalid API key"
    assert admin.get("/v1/models", headers=_as(other["api_key"])).status_code == 200
    again = admin.post(f"/v1/admin/keys/{issued['key_id']}/revoke", headers=BOOTSTRAP)
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]


def test_rotation_keeps_the_old_key_for_the_overlap_only(admin: TestClient, clock: ManualClock) -> None:
    tenant_id = _tenant(admin)
    old = _key(admin, tenant_id, ["scores:read"])
    assert admin.get("/v1/models", headers=_as(old["api_key"])).status_code == 200
    rotated = admin.post(f"/v1/admin/keys/{old['key_id']}/rotate", json={"overlap_s": 3600},
                         headers=BOOTSTRAP)
    assert rotated.status_code == 201, rotated.text
    new = rotated.json()["new"]
    assert new["scopes"] == ["scores:read"] and new["key_id"] != old["key_id"]
    assert rotated.json()["old"]["expires_at"] is not None
    for key in (old["api_key"], new["api_key"]):
        assert admin.get("/v1/models", headers=_as(key)).status_code == 200
    clock.advance(timedelta(seconds=3599))
    assert admin.get("/v1/models", headers=_as(old["api_key"])).status_code == 200
    clock.advance(timedelta(seconds=1))
    assert admin.get("/v1/models", headers=_as(old["api_key"])).status_code == 401
    assert admin.get("/v1/models", headers=_as(new["api_key"])).status_code == 200
    gone = admin.post(f"/v1/admin/keys/{old['key_id']}/rotate", json={}, headers=BOOTSTRAP)
    assert gone.status_code == 409 and "revoked or expired" in gone.json()["detail"]

    # Without an overlap the old key stops at once.
    at_once = admin.post(f"/v1/admin/keys/{new['key_id']}/rotate", json={}, headers=BOOTSTRAP)
    assert at_once.status_code == 201
    assert admin.get("/v1/models", headers=_as(new["api_key"])).status_code == 401
    newest = at_once.json()["new"]["api_key"]
    assert admin.get("/v1/models", headers=_as(newest)).status_code == 200


def test_an_admin_scoped_key_administers_and_is_named_in_the_audit_log(admin: TestClient) -> None:
    operators = _tenant(admin, "operators")
    operator = _key(admin, operators, ["admin"])
    assert admin.get("/v1/models", headers=_as(operator["api_key"])).status_code == 403
    shop = admin.post("/v1/admin/tenants", json={"name": "shop"}, headers=_as(operator["api_key"]))
    assert shop.status_code == 201
    shop_id = shop.json()["tenant_id"]
    shop_key = admin.post(f"/v1/admin/tenants/{shop_id}/keys", json={"scopes": ["events:write"]},
                          headers=_as(operator["api_key"])).json()
    assert admin.put(f"/v1/admin/tenants/{shop_id}/rate-limit",
                     json={"requests_per_s": 5, "burst": 10},
                     headers=_as(operator["api_key"])).json()["rate_limit"] == {
        "requests_per_s": 5.0, "burst": 10}
    assert admin.delete(f"/v1/admin/tenants/{shop_id}/rate-limit",
                        headers=_as(operator["api_key"])).json()["rate_limit"] is None
    admin.post(f"/v1/admin/keys/{shop_key['key_id']}/rotate", json={"overlap_s": 60},
               headers=_as(operator["api_key"]))
    admin.post(f"/v1/admin/keys/{shop_key['key_id']}/revoke", headers=_as(operator["api_key"]))

    log = admin.get("/v1/admin/audit", headers=BOOTSTRAP)
    assert log.status_code == 200
    entries = [(e["actor"], e["action"], e["target"], e["tenant_id"]) for e in reversed(log.json())]
    op = operator["key_id"]
    assert entries == [
        ("bootstrap", "tenant.created", operators, operators),
        ("bootstrap", "key.created", op, operators),
        (op, "tenant.created", shop_id, shop_id),
        (op, "key.created", shop_key["key_id"], shop_id),
        (op, "rate_limit.changed", shop_id, shop_id),
        (op, "rate_limit.changed", shop_id, shop_id),
        (op, "key.rotated", shop_key["key_id"], shop_id),
        (op, "key.revoked", shop_key["key_id"], shop_id),
    ]
    details = [e["detail"] for e in reversed(log.json())]
    assert details[1] == {"scopes": ["admin"], "prefix": operator["prefix"]}
    assert details[4] == {"requests_per_s": 5.0, "burst": 10}
    assert details[6]["overlap_s"] == 60 and details[6]["new_key_id"].startswith("k_")
    assert all(e["at"] for e in log.json())
    for secret in (operator["api_key"], shop_key["api_key"], ADMIN_KEY):
        assert secret not in log.text and hash_key(secret) not in log.text

    only_shop = admin.get(f"/v1/admin/audit?tenant_id={shop_id}&limit=2", headers=BOOTSTRAP).json()
    assert [e["action"] for e in only_shop] == ["key.revoked", "key.rotated"]
    older = admin.get(f"/v1/admin/audit?tenant_id={shop_id}&before={only_shop[-1]['id']}",
                      headers=BOOTSTRAP).json()
    assert [e["action"] for e in older][:1] == ["rate_limit.changed"] and len(older) == 4
    bad = admin.get("/v1/admin/audit?limit=0", headers=BOOTSTRAP)
    assert bad.status_code == 422 and "limit" in bad.text
    tenant_key = admin.get("/v1/admin/audit", headers=_as(shop_key["api_key"]))
    assert tenant_key.status_code == 401  # revoked by now; a live tenant key gets 403 (above)


def test_a_refused_change_leaves_no_audit_entry(admin: TestClient) -> None:
    _tenant(admin)
    assert admin.post("/v1/admin/tenants", json={"name": "acme"}, headers=BOOTSTRAP).status_code == 409
    assert admin.post("/v1/admin/tenants/t_nobody/keys", json={}, headers=BOOTSTRAP).status_code == 404
    actions = [e["action"] for e in admin.get("/v1/admin/audit", headers=BOOTSTRAP).json()]
    assert actions == ["tenant.created"]


def test_the_admin_api_is_described_in_the_merged_openapi_only_when_enabled(
    admin: TestClient, client: TestClient
) -> None:
    described = admin.get("/openapi.json").json()
    rotate = described["paths"]["/v1/admin/keys/{key_id}/rotate"]["post"]
    assert {"401", "403", "404", "409", "429", "201"} <= set(rotate["responses"])
    assert rotate["security"] == described["security"]
    assert "RotatedOut" in described["components"]["schemas"]
    events = described["paths"]["/v1/events"]["post"]
    assert {"401", "403", "429"} <= set(events["responses"])
    assert events["x-required-scope"] == "events:write" and "`events:write`" in events["description"]
    assert rotate["x-required-scope"] == "admin"
    promote = described["paths"]["/v1/models/{version}/activate"]["post"]
    assert promote["x-required-scope"] == "models:admin"
    assert described["paths"]["/v1/models"]["get"]["x-required-scope"] == "scores:read"
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/v1/admin")]


def test_operations_taking_a_body_document_the_gateways_400_and_413() -> None:
    from services.gateway.openapi import merge_openapi

    body = {"content": {"application/json": {"schema": {"type": "object"}}}}
    upstream = {"openapi": "3.1.0", "paths": {
        "/v1/webhooks": {"post": {"requestBody": body, "responses": {"201": {"description": "ok"}}},
                         "get": {"responses": {"200": {"description": "ok"}}}}}}
    merged = merge_openapi({"actions": upstream}, title="t", version="1", description="d")
    post, get = merged["paths"]["/v1/webhooks"]["post"], merged["paths"]["/v1/webhooks"]["get"]
    assert {"400", "413", "401", "403", "429"} <= set(post["responses"])
    assert "400" not in get["responses"] and "413" not in get["responses"]
    assert post["x-required-scope"] == get["x-required-scope"] == "actions:admin"
