"""Real parts for tests: a Tansu broker process, and PostgreSQL when reachable (SQLite otherwise).

CI (CI=true) must exercise PostgreSQL: there an unreachable server is an error, not a fallback.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.common import create_scratch_database, drop_scratch_database, postgres_reachable
from shared.broker import free_port, start_broker
from shared.kafka import ensure_topics
from shared.settings import KafkaSettings
from shared.topics import with_dead_letters

# Tansu holds a group's first JoinGroup for half the session timeout (3 s at the default 6 s),
# and stopping a consumer waits for that join: a test that starts a service and is done in a
# second would spend 3 s per consumer in it. Service processes started by tests inherit this.
os.environ.setdefault("CHURNGUARD_KAFKA_SESSION_TIMEOUT_MS", "2000")
os.environ.setdefault("CHURNGUARD_KAFKA_HEARTBEAT_INTERVAL_MS", "500")

PG_ADMIN_DSN = os.environ.get("CHURNGUARD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    available = postgres_reachable(PG_ADMIN_DSN)
    if not available and os.environ.get("CI"):
        pytest.fail(f"CI must exercise PostgreSQL, but {PG_ADMIN_DSN} is unreachable")
    return available


@contextmanager
def fresh_database(postgres: bool, directory: Path) -> Iterator[str]:
    """A new, empty database: its own PostgreSQL database (dropped afterwards), or a SQLite file
    in `directory`."""
    if not postgres:
        yield f"sqlite:///{directory / 'test.db'}"
        return
    name, url = create_scratch_database(PG_ADMIN_DSN, prefix="cg_test_")
    try:
        yield url
    finally:
        drop_scratch_database(name, PG_ADMIN_DSN)


@pytest.fixture
def database_url(postgres_available: bool, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test: its own PostgreSQL database, or a SQLite file."""
    with fresh_database(postgres_available, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Tansu broker process for the session; tests keep apart by topic prefix."""
    port = free_port()
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    process = start_broker("127.0.0.1", port, log_path=str(log))
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
async def kafka_settings(broker: str) -> KafkaSettings:
    """Settings with a topic prefix of this test's own, and its topics created."""
    settings = KafkaSettings(bootstrap_servers=broker, topic_prefix=f"t{uuid.uuid4().hex[:10]}-")
    await ensure_topics(settings, with_dead_letters())
    return settings
