from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.manage import create_tenant
from shared.broker import free_port
from shared.settings import DatabaseSettings, InternalAuthSettings
from tests.gateway.upstreams import ServerThread, upstream_app

INTERNAL_TOKEN = "gateway-test-internal-token"


@dataclass(frozen=True)
class Upstreams:
    ingest: str
    scoring: str
    actions: str


@pytest.fixture(scope="session")
def upstreams() -> Iterator[Upstreams]:
    servers = {name: ServerThread(upstream_app(name, INTERNAL_TOKEN)).start()
               for name in ("ingest", "scoring", "actions")}
    try:
        yield Upstreams(**{name: server.url for name, server in servers.items()})
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def dead_url() -> str:
    """A URL nobody listens on: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def settings(database_url: str, upstreams: Upstreams) -> GatewaySettings:
    return GatewaySettings(
        database=DatabaseSettings(database_url=database_url),
        internal=InternalAuthSettings(internal_token=SecretStr(INTERNAL_TOKEN)),
        ingest_url=upstreams.ingest,
        scoring_url=upstreams.scoring,
        actions_url=upstreams.actions,
        max_body_bytes=64 * 1024,
        upstream_timeout_s=5.0,
        # The upstreams here echo what reaches them, request by request; single events joined
        # for the real ingest are tested against it (tests/gateway/test_joined_events.py).
        join_events=False,
    )


@pytest.fixture
def client(settings: GatewaySettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def tenant(database_url: str) -> tuple[str, str]:
    """(tenant_id, api_key) of a fresh tenant."""
    return create_tenant(database_url, "acme")


@pytest.fixture
def auth(tenant: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant[1]}"}
