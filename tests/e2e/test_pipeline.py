"""The whole path on real parts: broker process, four service processes, a real database and a
real webhook receiver. A customer who should churn gets exactly one signed offer; a loyal one none."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from services.gateway import manage as gateway_ops
from services.scoring.model import TrainedModel, train
from shared.broker import free_port
from shared.settings import KafkaSettings
from tools import metrics_doc
from tests.helpers import answers, wait_until
from tests.scoring.conftest import register, simulated_histories
from tools.stack import SERVICES, ServiceStack

pytestmark = pytest.mark.e2e

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "churnguard-rules.yml"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Receiver:
    """A plain HTTP server that records every webhook exactly as it arrived."""

    port: int
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


@dataclass
class Stack:
    gateway: str
    api_key: str
    logs: Path
    ports: dict[str, int]

    def metrics(self, service: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.ports[service]}/metrics", timeout=5).text

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def e2e_model() -> TrainedModel:
    """A model trained once per session on simulated history (as `churnguard train` does)."""
    return train(simulated_histories(1500, seed=11), horizon_days=90)


@pytest.fixture
def stack(broker: str, database_url: str, tmp_path: Path, e2e_model: TrainedModel) -> Iterator[Stack]:
    # The model in scoring's registry, active, before scoring starts.
    register(database_url, e2e_model)
    _tenant_id, api_key = gateway_ops.create_tenant(database_url, "e2e-shop")
    logs = tmp_path / "logs"
    logs.mkdir()
    services = ServiceStack(
        workdir=logs, database_url=database_url,
        kafka=KafkaSettings(bootstrap_servers=broker, topic_prefix=f"e2e{uuid.uuid4().hex[:8]}-"),
        internal_token="e2e-internal-token",
        settings={
            # The control group is random per tenant id; this test is about the path, not uplift.
            "CHURNGUARD_ACTIONS_HOLDOUT_PERCENT": "0",
            # the test's webhook receiver is http on 127.0.0.1, which the SSRF guard refuses by default
            "CHURNGUARD_ACTIONS_WEBHOOK_ALLOW_LOCAL_URLS": "true",
        },
    )
    services.create_topics()
    try:
        services.start_all(timeout_s=60)
        yield Stack(services.url("gateway"), api_key, logs, services.ports)
    finally:
        codes = services.stop_all(timeout_s=20)
        stuck = [name for name, code in codes.items() if code is None]
        if stuck:
            pytest.fail(f"{stuck} did not stop within 20 s of SIGTERM")


@dataclass
class Prometheus:
    url: str

    def query(self, expression: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=5)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(stack: Stack, tmp_path: Path) -> Iterator[Prometheus]:
    """A real Prometheus server (Debian's package), loopback only, scraping the four services
    every second with the alert rules of deploy/prometheus loaded."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (Debian: apt-get install -y prometheus; `make install` does it as root)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": f"churnguard-{name}", "static_configs": [{"targets": [f"127.0.0.1:{stack.ports[name]}"]}]}
            for name in SERVICES
        ],
    }))
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(stack.logs / "prometheus.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    try:
        server = Prometheus(f"http://127.0.0.1:{port}")
        wait_until(lambda: answers(f"{server.url}/-/ready", process), timeout_s=30)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=20)


def _at(days_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=days_ago)).isoformat()


def _event(customer: str, n: int, type_: str, days_ago: float, data: dict) -> dict:
    return {"id": f"{customer}-{n}", "type": type_, "customer_id": customer,
            "occurred_at": _at(days_ago), "source": "e2e-shop", "data": data}


def churner_history(customer: str) -> list[dict]:
    today = datetime.now(timezone.utc).date()
    events = [_event(customer, 0, "subscription.started", 350, {
        "contract_id": f"k-{customer}", "plan": "basic", "price": "19.90", "currency": "EUR",
        "start_date": str(today - timedelta(days=350)), "end_date": str(today + timedelta(days=12)),
        "auto_renew": False, "notice_period_days": 30})]
    events += [_event(customer, 1 + i, "order.completed", 300 - i * 60,
                      {"order_id": f"o-{customer}-{i}", "amount": "35.00", "currency": "EUR"}) for i in range(3)]
    events += [_event(customer, 10 + i, "support.complaint", 20 - i * 5, {"severity": "high"}) for i in range(3)]
    events += [_event(customer, 20, "support.ticket_opened", 9, {"ticket_id": f"t-{customer}"}),
               _event(customer, 21, "feedback.nps", 6, {"score": 1, "comment": "never again"}),
               _event(customer, 22, "order.refunded", 40,
                      {"order_id": f"o-{customer}-2", "amount": "35.00", "currency": "EUR"}),
               _event(customer, 23, "support.ticket_opened", 8, {"ticket_id": f"t2-{customer}"}),
               _event(customer, 24, "feedback.csat", 5, {"score": 1})]
    return events


def loyal_history(customer: str) -> list[dict]:
    today = datetime.now(timezone.utc).date()
    events = [_event(customer, 0, "subscription.started", 700, {
        "contract_id": f"k-{customer}", "plan": "premium", "price": "49.90", "currency": "EUR",
        "start_date": str(today - timedelta(days=700)), "end_date": str(today - timedelta(days=335)),
        "auto_renew": True}),
        _event(customer, 1, "subscription.renewed", 335, {
        "contract_id": f"k-{customer}", "plan": "premium", "price": "49.90", "currency": "EUR",
        "start_date": str(today - timedelta(days=335)), "end_date": str(today + timedelta(days=395)),
        "auto_renew": True})]
    events += [_event(customer, 10 + i, "order.completed", 360 - i * 15,
                      {"order_id": f"o-{customer}-{i}", "amount": "80.00", "currency": "EUR"}) for i in range(24)]
    events += [_event(customer, 50, "feedback.nps", 30, {"score": 10})]
    return events


def test_an_event_becomes_a_score_and_a_signed_offer_only_for_the_churner(
    stack: Stack, receiver: Receiver, prometheus: Prometheus
) -> None:
    client = httpx.Client(base_url=stack.gateway, headers=stack.headers(), timeout=15)
    created = client.post("/v1/webhooks", json={"url": receiver.url, "secret": SECRET})
    assert created.status_code == 201, created.text

    churner, loyal = "c-churner", "c-loyal"
    # Marketing offers need consent (opt-in); actions must know it before the churner's scores.
    consent = _event(churner, 99, "customer.consent_changed", 360, {"marketing": True})
    assert client.post("/v1/events", json=consent).status_code == 202
    wait_until(lambda: client.get(f"/v1/customers/{churner}/state").json().get("marketing_consent"),
               timeout_s=30)
    histories = {loyal: loyal_history(loyal), churner: churner_history(churner)}
    for history in histories.values():
        response = client.post("/v1/events/batch", json={"events": history})
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == len(history)

    scores = {c: wait_until(lambda c=c: _score(client, c, histories[c]), timeout_s=60) for c in histories}
    assert scores[churner]["band"] == "high", scores
    assert scores[loyal]["band"] == "low", scores

    # Every score of both customers has been decided; only then is "no offer" meaningful.
    for customer, history in histories.items():
        wait_until(lambda c=customer, n=len(history): len(client.get(f"/v1/customers/{c}/decisions").json()) >= n,
                   timeout_s=60)
    wait_until(lambda: receiver.received, timeout_s=30)

    delivered = [(h, json.loads(b)) for h, b in receiver.received]
    assert [payload["data"]["customer_id"] for _, payload in delivered] == [churner]
    headers, body = receiver.received[0]
    verified = Webhook(SECRET).verify(body, headers)
    assert verified["type"] == "offer.created"
    assert verified["data"]["churn_probability"] >= 0.5
    assert client.get(f"/v1/customers/{loyal}/offers").json() == []
    assert len(client.get(f"/v1/customers/{churner}/offers").json()) == 1

    # Sending the same history again changes nothing: every id is a duplicate, no new offer.
    again = client.post("/v1/events/batch", json={"events": histories[churner]})
    assert (again.json()["accepted"], again.json()["duplicates"]) == (0, len(histories[churner]))

    # Each service counts its own part of the journey.
    events_sent = sum(len(h) for h in histories.values())
    assert f'churnguard_ingest_events_accepted_total{{type="order.completed"}}' in stack.metrics("ingest")
    scoring_metrics = stack.metrics("scoring")
    published = sum(float(line.rsplit(" ", 1)[1]) for line in scoring_metrics.splitlines()
                    if line.startswith("churnguard_scoring_scores_published_total{"))
    assert published >= events_sent
    assert 'churnguard_actions_offers_created_total{policy="high-risk-discount"} 1.0' in stack.metrics("actions")
    assert 'route="/v1/events/batch",status="202"' in stack.metrics("gateway")

    # Every metric of the catalog (docs/operations.md) is exposed by its service.
    scraped = {name: stack.metrics(name) for name in SERVICES}
    missing = [m.name for m in metrics_doc.catalog() if f"# HELP {m.name} " not in scraped[m.service]]
    assert not missing, missing

    # A real Prometheus scraping the four services sees the same journey.
    wait_until(lambda: prometheus.value("sum(churnguard_actions_offers_created_total)") == 1.0, timeout_s=30)
    wait_until(lambda: len(prometheus.query('up{job=~"churnguard-.*"}')) == len(SERVICES), timeout_s=15,
               what="every service scraped")
    assert {r["metric"]["job"]: r["value"][1] for r in prometheus.query('up{job=~"churnguard-.*"}')} == {
        f"churnguard-{name}": "1" for name in SERVICES}
    assert prometheus.value("sum(churnguard_ingest_events_accepted_total)") == events_sent + 1  # + consent
    assert prometheus.value("sum(churnguard_ingest_events_duplicate_total)") == len(histories[churner])
    assert prometheus.value("sum(churnguard_scoring_scores_published_total)") >= events_sent
    assert prometheus.value('sum(churnguard_scoring_scores_published_total{band="high"})') >= 1
    assert prometheus.value("max(churnguard_scoring_consumer_lag)") == 0.0  # drained
    assert prometheus.value("churnguard_scoring_active_model_roc_auc") > 0.6
    assert prometheus.value("time() - churnguard_scoring_active_model_trained_timestamp_seconds") < 3600
    assert prometheus.value('sum(churnguard_actions_decisions_total{outcome="offer_created"})') == 1.0
    assert prometheus.value(
        'sum(churnguard_gateway_http_requests_total{route="/v1/events/batch",status="202"})') == len(histories) + 1
    assert prometheus.value("sum(churnguard_gateway_http_requests_total)") > 0
    rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert rules and all(rule["health"] == "ok" for group in rules for rule in group["rules"]), rules
    firing = [a["labels"]["alertname"] for a in httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=5)
              .json()["data"]["alerts"] if a["state"] == "firing"]
    assert not {"ChurnguardServiceDown", "ChurnguardIngestErrorRateHigh", "ChurnguardConsumerLagGrowing"} & set(firing), firing


def test_the_gateway_refuses_bad_keys_and_bad_events_before_anything_is_published(stack: Stack) -> None:
    client = httpx.Client(base_url=stack.gateway, timeout=15)
    assert client.post("/v1/events", json={}).status_code == 401
    assert client.post("/v1/events", json={}, headers={"Authorization": "Bearer cg_wrong"}).status_code == 401
    response = client.post("/v1/events", headers={**stack.headers(), "X-Request-ID": "req-e2e-1"},
                           json={"id": "x", "type": "order.completed", "occurred_at": _at(1), "data": {}})
    assert response.status_code == 422
    assert response.headers["X-Request-ID"] == "req-e2e-1"
    assert {e["field"] for e in response.json()["errors"]} >= {"customer_id", "data.order_id"}
    # Direct calls that bypass the gateway are refused by the service itself.
    direct = httpx.post(f"http://127.0.0.1:{stack.ports['ingest']}/v1/events", json={}, timeout=5)
    assert direct.status_code == 401


def _score(client: httpx.Client, customer: str, history: list[dict]) -> dict | None:
    """The score once it reflects the whole history (every event consumed)."""
    response = client.get(f"/v1/customers/{customer}/score")
    if response.status_code != 200:
        return None
    body = response.json()
    return body if body["event_id"] == history[-1]["id"] else None
