"""Plain functions for the `churnguard` CLI. Each one is an edge: it opens its own engine,
creates the gateway tables if missing, and owns one transaction."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.exc import IntegrityError

from services.gateway import service
from services.gateway.scopes import TENANT_SCOPES
from services.gateway.service import IssuedKey, KeyInfo
from services.gateway.tables import TABLES
from shared.clock import Clock, SystemClock
from shared.db import create_tables, make_engine, session_scope


def issue_key(
    database_url: str, name: str, clock: Clock | None = None,
    key_scopes: Iterable[str] = TENANT_SCOPES,
) -> IssuedKey:
    """Like create_tenant, with the key id and whether the tenant was new. The key gets every
    tenant scope unless told otherwise."""
    clock = clock or SystemClock()
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        for attempt in range(2):
            try:
                with session_scope(engine) as session:
                    return service.issue_key(session, name, clock, key_scopes)
            except IntegrityError:
                # Another process created the same tenant name between our read and insert;
                # the second attempt finds it and adds the key to it.
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")
    finally:
        engine.dispose()


def create_tenant(database_url: str, name: str, clock: Clock | None = None) -> tuple[str, str]:
    """(tenant_id, api_key). If the tenant exists, a new key is added to it (its other keys
    keep working). The key is returned once and stored only as its sha256."""
    issued = issue_key(database_url, name, clock)
    return issued.tenant_id, issued.api_key


def revoke_key(database_url: str, key_or_id: str, clock: Clock | None = None) -> bool:
    """Revoke a key given its id (`k_...`) or the raw key (`cg_...`). False if there is no
    such key or it was already revoked. Takes effect on the next request."""
    clock = clock or SystemClock()
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        with session_scope(engine) as session:
            return service.revoke(session, key_or_id, clock)
    finally:
        engine.dispose()


def list_keys(database_url: str, name: str) -> list[KeyInfo] | None:
    """The tenant's keys (id, prefix, timestamps; never hashes), or None if no such tenant."""
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        with session_scope(engine) as session:
            return service.list_keys(session, name)
    finally:
        engine.dispose()
