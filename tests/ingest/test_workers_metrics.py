"""`churnguard serve ingest --workers 2`: whichever worker answers /metrics, the counters are the
whole instance's. A real two-worker process, real broker and database, fresh connections (the
kernel hands them to either worker)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from services.cli import Service, _metrics_for_workers, app
from shared.broker import free_port
from shared.metrics import MULTIPROCESS_DIR_ENV
from shared.settings import KafkaSettings
from tests.helpers import INTERNAL_TOKEN, answers, stop_processes, wait_until

EVENTS = 120
ACCEPTED = "churnguard_ingest_events_accepted"
IN_FLIGHT = "churnguard_ingest_http_requests_in_flight"


def _samples(text: str, name: str) -> list:
    return [s for family in text_string_to_metric_families(text) if family.name == name for s in family.samples]


def _accepted(text: str) -> float:
    return sum(s.value for s in _samples(text, ACCEPTED) if s.name == f"{ACCEPTED}_total")


def _dead_pid() -> int:
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    return probe.pid


def _write_value(directory: Path, kind: str, pid: int, name: str, value: float) -> None:
    """A value as a worker process with `pid` would have left it (prometheus_client's own file format)."""
    values = MmapedDict(str(directory / f"{kind}_{pid}.db"))
    try:
        values.write_value(mmap_key(name, name, (), (), name), value, 0.0)
    finally:
        values.close()


def test_every_scrape_counts_every_worker(kafka_settings: KafkaSettings, database_url: str, tmp_path: Path) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics" / f"ingest-{port}"  # serve's own under the operator's
    metrics_dir.mkdir(parents=True)
    # Left by an earlier run of the instance: must not be added to this one's.
    _write_value(metrics_dir, "counter", 4_000_000, f"{ACCEPTED}_total", 1000.0)
    env = {**os.environ, "CHURNGUARD_DATABASE_URL": database_url,
           "CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
           "CHURNGUARD_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
           "CHURNGUARD_INTERNAL_TOKEN": INTERNAL_TOKEN, MULTIPROCESS_DIR_ENV: str(tmp_path / "metrics")}
    log = tmp_path / "ingest.log"
    ingest = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "ingest", "--port", str(port), "--workers", "2"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    base = f"http://127.0.0.1:{port}"
    at = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    headers = {"X-Churnguard-Internal-Token": INTERNAL_TOKEN, "X-Churnguard-Tenant": "acme"}

    def send(i: int) -> int:
        with httpx.Client(timeout=30) as client:  # a connection of its own
            return client.post(f"{base}/v1/events", headers=headers, json={
                "id": f"w-{i}", "type": "session.recorded", "customer_id": f"c-{i % 7}",
                "occurred_at": at, "data": {"duration_seconds": i}}).status_code

    try:
        wait_until(lambda: answers(f"{base}/readyz", ingest), timeout_s=60, what="ingest ready")
        wait_until(lambda: log.read_text().count("Application startup complete") == 2, timeout_s=60,
                   what="both workers started")
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(send, range(EVENTS)))
        assert statuses == [202] * EVENTS, sorted(set(statuses))
        gone = _dead_pid()  # a worker that died with a request in flight, as uvicorn replaced it
        _write_value(metrics_dir, "gauge_livesum", gone, IN_FLIGHT, 1.0)
        scrapes = [httpx.get(f"{base}/metrics", timeout=10).text for _ in range(10)]
    finally:
        stop_processes([ingest])
    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    assert [_accepted(text) for text in scrapes] == [float(EVENTS)] * len(scrapes)
    # The scrape itself is the only request in flight, whichever worker took it.
    assert [[(s.labels, s.value) for s in _samples(text, IN_FLIGHT)] for text in scrapes] == [[({}, 1.0)]] * len(scrapes)
    assert not (metrics_dir / f"gauge_livesum_{gone}.db").exists()
    # The events were shared between the two workers (so the totals above are sums, not one worker's).
    per_worker = []
    for path in metrics_dir.glob("counter_*.db"):
        merged = MultiProcessCollector.merge([str(path)], accumulate=False)
        per_worker.append(sum(s.value for m in merged if m.name == ACCEPTED for s in m.samples))
    assert sorted(per_worker)[-2] > 0 and sum(per_worker) == EVENTS, per_worker


def test_consuming_services_refuse_workers() -> None:
    for service in ("scoring", "actions"):
        result = CliRunner().invoke(app, ["serve", service, "--workers", "2"])
        assert result.exit_code == 2, result.output
        assert "one worker per instance" in result.output and "--workers" in result.output


def test_consuming_services_keep_their_metrics_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An inherited multiprocess directory (say, set for every service alike) is dropped for
    scoring and actions, and used, in a directory of its own, by ingest and the gateway."""
    for service in (Service.scoring, Service.actions):
        monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(tmp_path))
        _metrics_for_workers(service, 1, 8002)()
        assert MULTIPROCESS_DIR_ENV not in os.environ
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(tmp_path))
    done = _metrics_for_workers(Service.gateway, 1, 8000)
    assert os.environ[MULTIPROCESS_DIR_ENV] == str(tmp_path / "gateway-8000")
    done()
