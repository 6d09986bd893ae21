"""Structured logs on real processes: the gateway, ingest and actions serve real requests with
CHURNGUARD_LOG_FORMAT=json; every line is one JSON object, a request's lines carry its request id
and tenant, and no API key, webhook secret or internal token ever reaches the log."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from services.gateway import manage as gateway_ops
from shared.broker import free_port
from shared.logs import (
    TEXT_FORMAT,
    LogSettings,
    bind_tenant,
    logging_config,
    request_id_var,
    skip_unused_record_fields,
    tenant_var,
)
from tests.helpers import answers, stop_processes, wait_until

SERVICES = ("ingest", "actions", "gateway")
INTERNAL_TOKEN = "logs-test-internal-token-" + uuid.uuid4().hex
WEBHOOK_SECRET = "whsec_" + "TG9ncyBtdXN0IG5ldmVyIHNob3cgdGhpcyBzZWNyZXQ="
ADMIN_KEY = "logs-admin-key-" + uuid.uuid4().hex
MALFORMED_KEY = "not-ours-but-secret-" + uuid.uuid4().hex


def test_log_settings_reject_unknown_values() -> None:
    with pytest.raises(ValidationError, match="format"):
        LogSettings(format="xml")
    with pytest.raises(ValidationError, match="level"):
        LogSettings(level="LOUD")


def test_level_and_access_log_follow_the_settings() -> None:
    quiet = logging_config(LogSettings(level="WARNING", access_log=False))
    assert quiet["root"]["level"] == "WARNING"
    assert quiet["loggers"]["uvicorn"]["level"] == "WARNING"
    assert quiet["loggers"]["uvicorn.access"]["level"] == "WARNING"  # INFO access lines dropped
    verbose = logging_config(LogSettings(level="DEBUG"))
    assert verbose["root"]["level"] == "DEBUG"
    assert verbose["loggers"]["uvicorn.access"]["level"] == "DEBUG"
    assert verbose["formatters"]["default"] == {"format": TEXT_FORMAT}
    json_config = logging_config(LogSettings(format="json"))
    assert json_config["formatters"]["default"]["()"] == "pythonjsonlogger.json.JsonFormatter"


def test_records_skip_the_caller_thread_and_process_lookups_no_format_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both formats are written without the calling function, thread or process: with those
    lookups off (as every service configures logging), a caller lookup would fail the test."""
    for flag in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, flag, getattr(logging, flag))  # restored after the test
    skip_unused_record_fields()

    def no_caller_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError("the caller was looked up")

    monkeypatch.setattr(logging.Logger, "findCaller", no_caller_lookup)
    for settings in (LogSettings(format="text"), LogSettings(format="json")):
        config = logging_config(settings)
        factory = dict(config["formatters"]["default"])
        if "()" in factory:
            from pythonjsonlogger.json import JsonFormatter

            factory.pop("()")
            formatter: logging.Formatter = JsonFormatter(**factory)
        else:
            formatter = logging.Formatter(factory["format"])
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(config["filters"]["context"]["()"]())
        logger = logging.getLogger(f"churnguard.test.fields.{settings.format}")
        logger.propagate = False
        logger.addHandler(handler)
        try:
            logger.warning("a line")
        finally:
            logger.removeHandler(handler)
        line = stream.getvalue().strip()
        assert "a line" in line
        if settings.format == "json":
            record = json.loads(line)
            assert record["message"] == "a line" and record["level"] == "WARNING"
            assert not {"funcName", "lineno", "threadName", "processName"} & set(record)


def test_text_format_names_request_and_tenant_only_when_known() -> None:
    config = logging_config(LogSettings(format="text"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(config["formatters"]["default"]["format"]))
    handler.addFilter(config["filters"]["context"]["()"]())
    logger = logging.getLogger("churnguard.test.text")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("outside a request")
        rid, tenant = request_id_var.set("r-1"), tenant_var.set(None)
        bind_tenant("t-9")
        logger.warning("inside a request")
        request_id_var.reset(rid)
        tenant_var.reset(tenant)
    finally:
        logger.removeHandler(handler)
    outside, inside = stream.getvalue().splitlines()
    assert "churnguard.test.text: outside a request" in outside
    assert "churnguard.test.text [request=r-1 tenant=t-9]: inside a request" in inside


@pytest.fixture
def services(broker: str, database_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """(gateway URL, API key, logs directory) of real service processes logging JSON."""
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CHURNGUARD_LOG_FORMAT": "json",
        "CHURNGUARD_LOG_LEVEL": "DEBUG",  # the most a production operator could turn on
        "CHURNGUARD_DATABASE_URL": database_url,
        "CHURNGUARD_KAFKA_BOOTSTRAP_SERVERS": broker,
        "CHURNGUARD_KAFKA_TOPIC_PREFIX": f"logs{uuid.uuid4().hex[:8]}-",
        "CHURNGUARD_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "CHURNGUARD_ACTIONS_WEBHOOK_ALLOW_LOCAL_URLS": "true",  # the subscription below is http on 127.0.0.1
        "CHURNGUARD_GATEWAY_ADMIN_KEY": ADMIN_KEY,
        "CHURNGUARD_GATEWAY_INGEST_URL": f"http://127.0.0.1:{ports['ingest']}",
        "CHURNGUARD_GATEWAY_ACTIONS_URL": f"http://127.0.0.1:{ports['actions']}",
        # scoring is not started: its routes answer 502/503 through the gateway, also logged.
        "CHURNGUARD_GATEWAY_SCORING_URL": f"http://127.0.0.1:{free_port()}",
    }
    _tenant_id, api_key = gateway_ops.create_tenant(database_url, "logs-shop")
    subprocess.run([sys.executable, "-m", "services.cli", "topics"], env=env, check=True, capture_output=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in SERVICES:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", name, "--port", str(ports[name])],
                env=env, stdout=open(logs / f"{name}.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            )
        for name in SERVICES:
            wait_until(lambda name=name: answers(f"http://127.0.0.1:{ports[name]}/readyz", processes[name]),
                       timeout_s=60, what=f"{name} ready")
        yield f"http://127.0.0.1:{ports['gateway']}", api_key, logs
    finally:
        stop_processes(processes.values())


def _lines(logs: Path) -> dict[str, list[dict]]:
    parsed: dict[str, list[dict]] = {}
    for name in SERVICES:
        text = (logs / f"{name}.log").read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        for line in lines:
            try:
                json.loads(line)
            except json.JSONDecodeError:
                raise AssertionError(f"{name}: not a JSON line: {line!r}") from None
        parsed[name] = [json.loads(line) for line in lines]
    return parsed


def _request_lines(logs: Path, request_id: str) -> dict[str, list[dict]]:
    return {name: [entry for entry in entries if entry.get("request_id") == request_id]
            for name, entries in _lines(logs).items()}


def test_json_lines_carry_request_id_and_tenant_and_never_a_secret(services: tuple[str, str, Path]) -> None:
    gateway, api_key, logs = services
    listed = httpx.get(f"{gateway}/v1/webhooks", headers={"X-API-Key": api_key}, timeout=10)
    assert listed.status_code == 200, listed.text

    event_request = "log-test-" + uuid.uuid4().hex[:8]
    event = {"id": "e-1", "type": "order.completed", "customer_id": "c-1",
             "occurred_at": "2026-11-20T10:00:00Z", "source": "logs-shop",
             "data": {"order_id": "o-1", "amount": "10.00", "currency": "EUR"}}
    answer = httpx.post(f"{gateway}/v1/events", json=event, timeout=10,
                        headers={"Authorization": f"Bearer {api_key}", "X-Request-ID": event_request})
    assert answer.status_code == 202, answer.text

    webhook_request = "log-test-" + uuid.uuid4().hex[:8]
    created = httpx.post(f"{gateway}/v1/webhooks", timeout=10,
                         json={"url": "http://127.0.0.1:9/hooks", "secret": WEBHOOK_SECRET},
                         headers={"X-API-Key": api_key, "X-Request-ID": webhook_request})
    assert created.status_code == 201, created.text
    # The key also arrives as ?key= on a source webhook and in a rejected request.
    httpx.post(f"{gateway}/v1/sources/shopify?key={api_key}", content=b"{}", timeout=10)
    rejected = httpx.get(f"{gateway}/v1/webhooks", headers={"X-API-Key": api_key + "x"}, timeout=10)
    assert rejected.status_code == 401
    malformed = httpx.get(f"{gateway}/v1/webhooks", headers={"Authorization": f"Bearer {MALFORMED_KEY}"},
                          timeout=10)
    assert malformed.status_code == 401 and MALFORMED_KEY not in malformed.text
    # The admin API: the bootstrap key, and a key it issues (shown once, in the answer only).
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created_tenant = httpx.post(f"{gateway}/v1/admin/tenants", json={"name": "logs-admin"}, headers=admin,
                                timeout=10)
    assert created_tenant.status_code == 201, created_tenant.text
    issued = httpx.post(f"{gateway}/v1/admin/tenants/{created_tenant.json()['tenant_id']}/keys", json={},
                        headers=admin, timeout=10)
    assert issued.status_code == 201
    issued_key = issued.json()["api_key"]
    rotated = httpx.post(f"{gateway}/v1/admin/keys/{issued.json()['key_id']}/rotate", json={}, headers=admin,
                         timeout=10)
    assert rotated.status_code == 201
    assert httpx.get(f"{gateway}/v1/admin/audit", headers={"X-API-Key": ADMIN_KEY + "x"},
                     timeout=10).status_code == 401

    def logged() -> dict[str, list[dict]] | None:
        lines = _request_lines(logs, event_request)
        return lines if lines["gateway"] and lines["ingest"] else None

    lines = wait_until(logged, what="access lines of the event request")
    # The tenant is the one the gateway resolved from the key, also in the service it called.
    gateway_line, ingest_line = lines["gateway"][-1], lines["ingest"][-1]
    tenant = ingest_line["tenant"]
    assert tenant and gateway_line["tenant"] == tenant
    for line in (gateway_line, ingest_line):
        assert line["logger"] == "uvicorn.access"
        assert line["level"] == "INFO"
        assert line["method"] == "POST"
        assert line["time"].startswith("20")
    assert gateway_line["path"] == "/v1/events" and gateway_line["status"] == 202
    # The gateway sends single events to ingest joined (services/gateway/joiner.py): ingest's line
    # is the joined request's, under the (first) caller's request id.
    assert ingest_line["path"] == "/v1/events/joined" and ingest_line["status"] == 200

    actions_lines = wait_until(lambda: _request_lines(logs, webhook_request)["actions"], what="actions line")
    assert actions_lines[-1]["tenant"] == tenant and actions_lines[-1]["status"] == 201

    everything = "\n".join((logs / f"{name}.log").read_text() for name in SERVICES)
    for secret, what in ((api_key, "API key"), (WEBHOOK_SECRET, "webhook secret"),
                         (WEBHOOK_SECRET.removeprefix("whsec_"), "webhook secret body"),
                         (INTERNAL_TOKEN, "internal token"), (ADMIN_KEY, "admin key"),
                         (MALFORMED_KEY, "malformed key"), (issued_key, "issued key"),
                         (rotated.json()["new"]["api_key"], "rotated key")):
        assert secret not in everything, f"the {what} appears in the logs"
    # No client address either: at the gateway it is the caller's personal data.
    assert "127.0.0.1:" not in "\n".join(
        json.dumps(entry) for entries in _lines(logs).values() for entry in entries
        if entry["logger"] == "uvicorn.access"
    )
