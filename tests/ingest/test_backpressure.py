"""When the broker is slow or gone, ingest answers 503 + Retry-After in bounded time, never 202
for an event the broker did not take, and recovers by itself. Uses a broker of its own."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from services.ingest.app import create_app
from shared.broker import free_port, start_broker
from shared.events import EventRecord
from shared.joined import ANSWERS_HEADER, JOINED_CONTENT_TYPE, JOINED_PATH, LENGTHS_HEADER, join_bodies, split_answers
from shared.kafka import ensure_topics
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS, with_dead_letters
from tests.helpers import internal_headers, read_topic, wait_until
from tests.ingest.test_routes import event, settings_for

HEADERS = internal_headers("tenant-a")
PUBLISH_TIMEOUT_S = 1.5


class OwnBroker:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.settings = KafkaSettings(
            bootstrap_servers=f"127.0.0.1:{self.port}", topic_prefix=f"bp{uuid.uuid4().hex[:6]}-",
            request_timeout_ms=1000,
        )

    def start(self) -> None:
        self.process = start_broker("127.0.0.1", self.port)
        asyncio.run(ensure_topics(self.settings, with_dead_letters()))  # memory storage: topics are gone after a restart

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def own_broker() -> Iterator[OwnBroker]:
    broker = OwnBroker()
    broker.start()
    yield broker
    if broker.process and broker.process.poll() is None:
        broker.process.send_signal(signal.SIGCONT)
        broker.stop()


def post_timed(client: TestClient, n: int) -> tuple[int, float, dict[str, str]]:
    started = time.monotonic()
    response = client.post("/v1/events", json=event(n), headers=HEADERS)
    return response.status_code, time.monotonic() - started, dict(response.headers)


def test_broker_gone_then_back(own_broker: OwnBroker, database_url: str) -> None:
    settings = settings_for(own_broker.settings, database_url, publish_timeout_s=PUBLISH_TIMEOUT_S)
    with TestClient(create_app(settings)) as client:
        assert post_timed(client, 1)[0] == 202

        own_broker.stop()
        status, took, headers = post_timed(client, 2)
        assert status == 503 and headers["retry-after"] == "2"
        assert took < PUBLISH_TIMEOUT_S + 2, f"answered after {took:.1f}s"
        wait_until(lambda: client.get("/readyz").status_code == 503, timeout_s=10)

        own_broker.start()  # same address: ingest must find it again without a restart
        wait_until(lambda: post_timed(client, 2)[0] == 202, timeout_s=45, what="ingest recovered")
        assert client.get("/readyz").status_code == 200

    # evt-1 went down with the memory-only broker; evt-2 was taken after it came back.
    records = asyncio.run(read_topic(own_broker.settings, CUSTOMER_EVENTS, 1, timeout_s=5))
    assert [EventRecord.model_validate_json(r.value).event.id for r in records] == ["evt-2"]


def test_broker_gone_joined_events_answer_503_each_and_the_invalid_one_its_own_error(
    own_broker: OwnBroker, database_url: str
) -> None:
    """The gateway's joined single events (shared/joined.py): the broker's absence is each valid
    event's 503 with Retry-After; an invalid one still gets its own 422."""
    settings = settings_for(own_broker.settings, database_url, publish_timeout_s=PUBLISH_TIMEOUT_S)
    bodies = [json.dumps(event(1)).encode(), b'{"type": "order.completed"}', json.dumps(event(2)).encode()]
    body, lengths = join_bodies(bodies)
    with TestClient(create_app(settings)) as client:
        own_broker.stop()
        response = client.post(JOINED_PATH, content=body, headers={
            **HEADERS, "Content-Type": JOINED_CONTENT_TYPE, LENGTHS_HEADER: lengths})
    assert response.status_code == 200 and response.headers["retry-after"] == "2"
    answers = split_answers(response.content, response.headers[ANSWERS_HEADER], 3)
    assert [status for status, _ in answers] == [503, 422, 503]
    assert "broker did not acknowledge" in json.loads(answers[0][1])["detail"]


def test_frozen_broker_means_bounded_503(own_broker: OwnBroker, database_url: str) -> None:
    settings = settings_for(own_broker.settings, database_url, publish_timeout_s=PUBLISH_TIMEOUT_S)
    with TestClient(create_app(settings)) as client:
        assert post_timed(client, 1)[0] == 202
        assert own_broker.process is not None
        own_broker.process.send_signal(signal.SIGSTOP)
        try:
            status, took, headers = post_timed(client, 2)
            assert status == 503 and "retry-after" in headers
            assert took < PUBLISH_TIMEOUT_S + 2, f"answered after {took:.1f}s"
        finally:
            own_broker.process.send_signal(signal.SIGCONT)
        # The unacknowledged send may still land once the broker thaws (at-least-once): the
        # client resends the same id, and its effect is once (scoring's unique key).
        wait_until(lambda: post_timed(client, 3)[0] == 202, timeout_s=30, what="ingest recovered")
