"""SIGTERM mid-stream: a real `churnguard serve scoring` process finishes and commits the batch in
hand, leaves its group and exits; the next instance goes on from there. Nothing is lost, and
nothing is redone beyond one batch in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, select

from services.scoring.model import TrainedModel
from services.scoring.tables import ScoringEvent
from shared.broker import free_port
from shared.db import make_engine, session_scope
from shared.events import ScoreRecord
from shared.settings import KafkaSettings
from shared.topics import CHURN_SCORES
from tests.helpers import INTERNAL_TOKEN

from .conftest import event_record, read_topic, register, wait_until
from .test_consumer import _publish

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
CUSTOMERS, PER_CUSTOMER = 60, 50
MAX_POLL = 200  # records per batch: small, so that SIGTERM comes mid-stream


def _stored(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return int(session.execute(select(func.count()).select_from(ScoringEvent)).scalar_one())
    finally:
        engine.dispose()


def _start(kafka_settings: KafkaSettings, database_url: str, group: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CHURNGUARD_DATABASE_URL": database_url,
        "CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "CHURNGUARD_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "CHURNGUARD_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "CHURNGUARD_SCORING_GROUP_ID": group,
        "CHURNGUARD_SCORING_SWEEP_ENABLED": "false",
        "CHURNGUARD_SCORING_MODEL_REFRESH_S": "0.2",
        "CHURNGUARD_SCORING_MAX_POLL_RECORDS": str(MAX_POLL),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "scoring", "--port", str(free_port())],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )


async def test_sigterm_mid_stream_loses_nothing_and_redoes_at_most_the_batch_in_flight(
    kafka_settings: KafkaSettings, database_url: str, trained_model: TrainedModel, tmp_path: Path
) -> None:
    register(database_url, trained_model)
    records = [
        event_record(f"c-{c}", "session.recorded", NOW - timedelta(days=30) + timedelta(hours=k), {"duration_seconds": k})
        for k in range(PER_CUSTOMER) for c in range(CUSTOMERS)
    ]
    total = len(records)
    await _publish(kafka_settings, records)

    first = _start(kafka_settings, database_url, "scoring-shutdown", tmp_path / "first.log")
    try:
        wait_until(lambda: _stored(database_url) >= 200, timeout_s=60, interval_s=0.02, what="scoring under way")
        first.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        # uvicorn re-raises the signal once it has shut down cleanly: -SIGTERM is its normal status
        assert first.wait(timeout=30) in (0, -signal.SIGTERM), (tmp_path / "first.log").read_text()[-3000:]
        stopped_after = _stored(database_url)
    finally:
        if first.poll() is None:
            first.kill()
    log = (tmp_path / "first.log").read_text()
    assert 0 < stopped_after < total, f"stopped after {stopped_after} of {total}: not mid-stream"
    assert time.monotonic() - stopping < 30
    assert "Traceback" not in log, log[-3000:]
    assert "Application shutdown complete" in log  # the consumer finished its batch and left

    second = _start(kafka_settings, database_url, "scoring-shutdown", tmp_path / "second.log")
    try:
        wait_until(lambda: _stored(database_url) == total, timeout_s=120, what="the rest scored by the next instance")
        published = await read_topic(
            kafka_settings, CHURN_SCORES, timeout_s=60,
            until=lambda rs: len({ScoreRecord.model_validate_json(r.value).score_id for r in rs}) >= total,
        )
    finally:
        second.terminate()
        second.wait(timeout=30)

    per_score = Counter(ScoreRecord.model_validate_json(r.value).score_id for r in published)
    assert len(per_score) == total  # every event scored: nothing lost
    redone = sum(per_score.values()) - total
    assert redone <= MAX_POLL, f"{redone} events scored twice; at most one batch ({MAX_POLL}) may be"
