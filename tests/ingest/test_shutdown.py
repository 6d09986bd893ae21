"""SIGTERM while senders are busy: a real `churnguard serve ingest` process stops accepting,
answers the requests in flight, and every event it answered 202 for is on the topic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from shared.broker import free_port
from shared.events import EventRecord
from shared.settings import KafkaSettings
from shared.topics import CUSTOMER_EVENTS
from tests.helpers import INTERNAL_TOKEN, answers, read_topic, wait_until

BATCH = 50
SENDERS = 4


def _events(sender: int, n: int) -> list[dict]:
    at = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    return [{"id": f"s{sender}-b{n}-{i}", "type": "session.recorded", "customer_id": f"c-{i % 17}",
             "occurred_at": at, "data": {"duration_seconds": i}} for i in range(BATCH)]


async def test_sigterm_drains_and_every_accepted_event_is_on_the_topic(
    kafka_settings: KafkaSettings, database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHURNGUARD_DATABASE_URL": database_url,
           "CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
           "CHURNGUARD_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
           "CHURNGUARD_INTERNAL_TOKEN": INTERNAL_TOKEN}
    log = tmp_path / "ingest.log"
    ingest = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "ingest", "--port", str(port)],
                              env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}/v1/events/batch"
    headers = {"X-Churnguard-Internal-Token": INTERNAL_TOKEN, "X-Churnguard-Tenant": "acme"}
    accepted: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def send(sender: int) -> None:
        with httpx.Client(timeout=30) as client:
            for n in range(10_000):
                batch = _events(sender, n)
                try:
                    response = client.post(url, json={"events": batch}, headers=headers)
                except httpx.TransportError:
                    return  # the server is gone: the sender stops (a real one would retry later)
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code == 202:
                        assert response.json()["accepted"] == BATCH
                        accepted.extend(e["id"] for e in batch)

    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz", ingest), timeout_s=60, what="ingest ready")
        senders = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
        for thread in senders:
            thread.start()
        wait_until(lambda: len(accepted) >= 20 * BATCH, timeout_s=60, what="traffic flowing")
        ingest.send_signal(signal.SIGTERM)
        status = ingest.wait(timeout=30)
        for thread in senders:
            thread.join(timeout=30)
    finally:
        if ingest.poll() is None:
            ingest.kill()
    output = log.read_text()
    assert status in (0, -signal.SIGTERM), output[-3000:]  # uvicorn re-raises the signal after a clean stop
    assert "Application shutdown complete" in output and "Traceback" not in output, output[-3000:]
    assert set(statuses) <= {202, 503}, sorted(set(statuses))  # in-flight requests were answered, not cut

    def ids(records: list) -> list[str]:
        return [EventRecord.model_validate_json(r.value).event.id for r in records]

    # raises if any accepted event is missing from the topic
    records = await read_topic(kafka_settings, CUSTOMER_EVENTS, timeout_s=30,
                               until=lambda rs: set(accepted) <= set(ids(rs)))
    on_topic = ids(records)
    assert len(on_topic) == len(set(on_topic))  # and none of them twice


