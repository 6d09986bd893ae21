"""Fixtures for the actions service: settings on the real broker and database, a real HTTP
webhook receiver and a scripted one, a manual clock, and a score publisher."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import pytest

from services.actions.config import ActionsSettings
from shared.clock import ManualClock
from shared.events import ScoreRecord
from shared.kafka import Publisher
from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings
from shared.topics import CHURN_SCORES
from tests.actions.actions_support import START, TOKEN, Receiver
from tests.actions.webhook_support import ScriptedReceiver


ServerT = TypeVar("ServerT", Receiver, ScriptedReceiver)


def _serving(server: ServerT) -> Iterator[ServerT]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _serving(Receiver())


@pytest.fixture
def scripted() -> Iterator[ScriptedReceiver]:
    yield from _serving(ScriptedReceiver())


@pytest.fixture
def healthy() -> Iterator[ScriptedReceiver]:
    """A second scripted receiver, beside `scripted` (a healthy endpoint next to a failing one)."""
    yield from _serving(ScriptedReceiver())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def make_settings(
    kafka_settings: KafkaSettings, database_url: str
) -> Callable[..., ActionsSettings]:
    def _make(**overrides: Any) -> ActionsSettings:
        options: dict[str, Any] = {
            "kafka": kafka_settings,
            "database": DatabaseSettings(database_url=database_url),
            "internal": InternalAuthSettings(internal_token=TOKEN),
            "group_id": f"actions-{uuid.uuid4().hex[:8]}",
            "delivery_poll_s": 0.05,
            "webhook_timeout_s": 2.0,
            # Off unless a test is about them: plumbing tests need every high score to be sent.
            # tests/actions/test_actions_guardrails.py runs with the production defaults.
            "holdout_percent": 0.0,
            "consent_required": False,
            "contract_sweep_enabled": False,  # tests call run_once() with a moved clock
            # The receivers here are on 127.0.0.1 over http (tests of the SSRF guard turn it off),
            # and exact retry times are asserted (jitter has its own tests).
            "webhook_allow_local_urls": True,
            "retry_jitter": 0.0,
        }
        options.update(overrides)
        return ActionsSettings(**options)

    return _make


@pytest.fixture
async def publish(kafka_settings: KafkaSettings) -> AsyncIterator[Callable[..., Any]]:
    """publish(*records) puts ScoreRecords (or raw (key, value) pairs) on churn-scores."""
    publisher = Publisher(kafka_settings, "actions-test")

    async def _publish(*records: ScoreRecord | tuple[bytes, bytes]) -> None:
        messages = [
            r if isinstance(r, tuple) else (r.key, r.model_dump_json().encode()) for r in records
        ]
        await publisher.publish_many(CHURN_SCORES, messages)

    try:
        yield _publish
    finally:
        await publisher.close()
