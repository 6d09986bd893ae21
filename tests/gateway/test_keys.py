"""Tenants and API keys in the real database: hashed at rest, several keys per tenant."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant, issue_key, list_keys, revoke_key
from services.gateway.service import hash_key
from shared.clock import ManualClock
from shared.db import make_engine


def _rows(database_url: str, sql: str) -> list[tuple]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return [tuple(r) for r in connection.execute(text(sql))]
    finally:
        engine.dispose()


def test_keys_are_stored_only_as_their_hash(database_url: str) -> None:
    tenant_id, key = create_tenant(database_url, "acme")
    assert tenant_id.startswith("t_") and key.startswith("cg_") and len(key) >= 3 + 43

    rows = _rows(database_url, "SELECT id, tenant_id, prefix, key_hash FROM gateway_api_keys")
    assert len(rows) == 1
    key_id, row_tenant, prefix, key_hash = rows[0]
    assert row_tenant == tenant_id
    assert key_hash == hash_key(key) and len(key_hash) == 64
    assert key.startswith(prefix) and len(prefix) < len(key) // 3
    every_value = repr(_rows(database_url, "SELECT * FROM gateway_api_keys")) + repr(
        _rows(database_url, "SELECT * FROM gateway_tenants"))
    assert key not in every_value and key[len(prefix):] not in every_value


def test_creating_a_tenant_twice_adds_a_second_working_key(settings: GatewaySettings, database_url: str) -> None:
    tenant_id, first = create_tenant(database_url, "demo")
    same_tenant, second = create_tenant(database_url, "demo")
    assert same_tenant == tenant_id and second != first
    assert _rows(database_url, "SELECT count(*) FROM gateway_tenants") == [(1,)]

    with TestClient(create_app(settings)) as client:
        for key in (first, second):
            response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            assert response.json()["tenant"] == tenant_id


def test_tenants_get_their_own_ids(settings: GatewaySettings, database_url: str) -> None:
    a, key_a = create_tenant(database_url, "tenant-a")
    b, key_b = create_tenant(database_url, "tenant-b")
    assert a != b
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models", headers={"X-API-Key": key_a}).json()["tenant"] == a
        assert client.get("/v1/models", headers={"X-API-Key": key_b}).json()["tenant"] == b


def test_bad_tenant_names_are_refused(database_url: str) -> None:
    for name in ("", "   ", "x" * 201):
        with pytest.raises(ValueError, match="tenant name"):
            create_tenant(database_url, name)


def test_last_used_is_recorded_at_most_once_a_minute(settings: GatewaySettings, database_url: str) -> None:
    clock = ManualClock()
    issued = issue_key(database_url, "acme", clock)
    assert issued.tenant_created and issued.key_id.startswith("k_")
    headers = {"X-API-Key": issued.api_key}

    def last_used():
        (info,) = list_keys(database_url, "acme") or []
        return info.last_used_at

    assert last_used() is None
    with TestClient(create_app(settings, clock)) as client:
        client.get("/v1/models", headers=headers)
        first = last_used()
        assert first is not None
        clock.advance(timedelta(seconds=30))
        client.get("/v1/models", headers=headers)
        assert last_used() == first  # within the minute: no write
        clock.advance(timedelta(seconds=31))
        client.get("/v1/models", headers=headers)
        assert last_used() > first


def test_revoke_by_key_id(settings: GatewaySettings, database_url: str) -> None:
    issued = issue_key(database_url, "acme")
    other = issue_key(database_url, "acme")
    assert revoke_key(database_url, issued.key_id) is True
    assert revoke_key(database_url, "k_does_not_exist") is False
    keys = {k.key_id: k for k in list_keys(database_url, "acme") or []}
    assert keys[issued.key_id].revoked_at is not None and keys[other.key_id].revoked_at is None
    assert list_keys(database_url, "nobody") is None
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models", headers={"X-API-Key": issued.api_key}).status_code == 401
        assert client.get("/v1/models", headers={"X-API-Key": other.api_key}).status_code == 200


def test_requests_arriving_during_a_key_lookup_share_it(settings: GatewaySettings, database_url: str) -> None:
    """When a busy key's remembered entry expires, the requests in flight must not each ask the
    database (and queue for its threads): one lookup per key at a time, its answer shared."""
    from sqlalchemy import event

    from services.gateway.deps import _looked_up
    from services.gateway.service import KeyRejected

    _, key = create_tenant(database_url, "busy")
    with TestClient(create_app(settings)) as client:
        gateway = client.app.state.gateway  # type: ignore[attr-defined]
        lookups: list[str] = []

        def count(_conn, _cursor, statement: str, *_args: object) -> None:  # type: ignore[no-untyped-def]
            if "gateway_api_keys" in statement and statement.lstrip().upper().startswith("SELECT"):
                lookups.append(statement)

        event.listen(gateway.engine, "before_cursor_execute", count)

        async def burst(presented: str) -> list[object]:
            # Created before any of them runs: all of them ask while the first lookup is running.
            tasks = [asyncio.create_task(_looked_up(gateway, presented)) for _ in range(20)]
            return await asyncio.gather(*tasks, return_exceptions=True)

        callers = client.portal.call(burst, key)
        assert len(lookups) == 1
        assert len({c.key_id for c in callers}) == 1  # type: ignore[attr-defined]
        lookups.clear()
        refused = client.portal.call(burst, "cg_" + "x" * 40)
        assert len(lookups) == 1
        assert all(isinstance(r, KeyRejected) and r.reason == "invalid" for r in refused)
        assert gateway.lookups == {}  # nothing left behind
