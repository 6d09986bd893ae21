"""`churnguard`: run the services, the embedded broker, the whole stack, and the model tools."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="churnguard: event-driven churn prevention.", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants and API keys.", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
dlq_app = typer.Typer(help="Dead-letter topics: what could not be processed, and why.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

REPO_ROOT = Path(__file__).resolve().parent.parent
VAR = Path("var")
DEMO_TENANT = "demo"
DEMO_SECRET_FILE = VAR / "demo-webhook-secret"


class Service(str, Enum):
    gateway = "gateway"
    ingest = "ingest"
    scoring = "scoring"
    actions = "actions"


CONSUMING_SERVICES = (Service.scoring, Service.actions)
DEFAULT_PORTS = {Service.gateway: 8000, Service.ingest: 8001, Service.scoring: 8002, Service.actions: 8003}
RECEIVER_PORT = 8004
BROKER_PORT = 9092


def _database_url(service: str) -> str:
    from shared.settings import DatabaseSettings

    return DatabaseSettings().url_for(service)


def _metrics_for_workers(service: Service, workers: int, port: int) -> Callable[[], None]:
    """Scoring and actions run one worker, with their metrics in the process's own registry:
    their gauges (active model, history cache, score drift, open circuits) are one consumer's,
    and some are computed when scraped, which prometheus_client's multiprocess mode cannot
    export. So an inherited PROMETHEUS_MULTIPROC_DIR is dropped for them, before anything
    imports prometheus_client (it reads the variable then). Ingest and the gateway: see
    shared.metrics.multiprocess_metrics."""
    if service in CONSUMING_SERVICES:
        if workers > 1:
            raise typer.BadParameter(f"{service.value} runs one worker per instance: start more instances "
                                     "(they share the partitions) instead of --workers", param_hint="--workers")
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return lambda: None
    from shared.metrics import multiprocess_metrics

    return multiprocess_metrics(workers, f"{service.value}-{port}")


@app.command()
def serve(
    service: Service,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: the service's own).")] = None,
    log_level: Annotated[str | None, typer.Option(help="Overrides CHURNGUARD_LOG_LEVEL.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes sharing the port "
                                         "(ingest and the gateway: about one per CPU core; /metrics adds "
                                         "up all of them).")] = 1,
) -> None:
    """Run one service (scale with --workers on one machine, with more processes/pods beyond)."""
    import uvicorn

    from shared.logs import LogSettings, logging_config

    port = port or DEFAULT_PORTS[service]
    forget_metrics_directory = _metrics_for_workers(service, workers, port)
    log_settings = LogSettings(**({"level": log_level.upper()} if log_level else {}))
    try:
        uvicorn.run(
            f"services.{service.value}.app:create_app",
            factory=True,
            host=host,
            port=port,
            log_config=logging_config(log_settings),
            workers=workers,
            timeout_graceful_shutdown=20,
        )
    finally:
        forget_metrics_directory()


@app.command()
def broker(
    host: str = "127.0.0.1",
    port: int = BROKER_PORT,
    linger_s: Annotated[float, typer.Option(help="On SIGTERM, keep serving this long so "
                                            "consumers can commit and leave their groups.")] = 3.0,
) -> None:
    """Run the embedded Tansu broker (Kafka API, memory storage: nothing survives a restart)."""
    import subprocess

    from shared.broker import broker_command

    # Its own session, so a signal to our process group (honcho's stop) reaches only us and
    # the broker stops last, after the services that were signalled with it.
    process = subprocess.Popen(broker_command(host, port), start_new_session=True)
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stopping.append(number))
    while process.poll() is None and not stopping:
        time.sleep(0.2)
    if stopping:
        time.sleep(linger_s)
        process.terminate()
    sys.exit(process.wait())


@app.command()
def topics() -> None:
    """Create the topics (and their dead-letter topics) that do not exist yet."""
    from shared.kafka import ensure_topics
    from shared.settings import KafkaSettings
    from shared.topics import with_dead_letters

    created = asyncio.run(ensure_topics(KafkaSettings(), with_dead_letters()))
    typer.echo(f"created: {', '.join(created) or 'none (all existed)'}")


@app.command()
def simulate(
    customers: Annotated[int, typer.Option(help="How many customers to simulate.")] = 3000,
    seed: int = 7,
    tenant: Annotated[str, typer.Option(help="Tenant whose history is written.")] = "sim",
    out: Annotated[Path | None, typer.Option(help="Also write the events as NDJSON here.")] = None,
) -> None:
    """Write realistic synthetic customer history into scoring's event store."""
    from services.scoring import cli_ops

    count = cli_ops.simulate(_database_url("scoring"), tenant, customers, seed, None, out)
    typer.echo(f"simulated {count} events for {customers} customers (tenant {tenant!r})")


@app.command()
def train(
    tenant: Annotated[str, typer.Option(help="Tenant whose history trains the model.")] = "sim",
    horizon_days: Annotated[int, typer.Option(help="Churned = no renewal/activity within this many days.")] = 90,
    activate: Annotated[bool, typer.Option(help="Make the new model the active one.")] = True,
) -> None:
    """Fit a calibrated classifier on stored history and register it with its holdout ROC AUC."""
    from services.scoring import cli_ops

    try:
        report = cli_ops.train(_database_url("scoring"), tenant, horizon_days, activate)
    except ValueError as exc:
        typer.echo(f"training refused: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(report.summary() if hasattr(report, "summary") else str(report))


@app.command()
def evaluate(
    version: Annotated[str | None, typer.Option(help="Model version (default: the active model, else the newest).",
                                                show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Reports directory; the report goes to OUT/<version>/index.html.")]
    = Path("var/reports"),
) -> None:
    """Draw a model's evaluation report: an HTML page with ROC, calibration, gain/lift,
    score distribution and feature importance charts."""
    from services.scoring import cli_ops
    from services.scoring.evaluate import ReportUnavailable
    from services.scoring.service import ModelNotFound

    try:
        path = cli_ops.evaluate(_database_url("scoring"), version, out)
    except (ModelNotFound, ReportUnavailable) as exc:
        typer.echo(f"evaluate failed: {exc.args[0] if exc.args else exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"report written to {path}")


@tenant_app.command("create")
def tenant_create(name: str) -> None:
    """Create a tenant (or add a key to an existing one) and print its API key once."""
    from services.gateway import manage as cli_ops

    tenant_id, api_key = cli_ops.create_tenant(_database_url("gateway"), name)
    typer.echo(f"tenant {name} ({tenant_id})\nAPI key (shown once): {api_key}")


@app.command("import")
def import_history(
    file: Annotated[Path, typer.Argument(help="NDJSON (one event per line) or CSV history.",
                                         exists=True, dir_okay=False, readable=True)],
    key: Annotated[str, typer.Option("--key", envvar="CHURNGUARD_API_KEY", show_default=False,
                                     help="The tenant's API key.")],
    url: Annotated[str, typer.Option("--url", envvar="CHURNGUARD_API_URL",
                                     help="The gateway's base URL.")] = "http://127.0.0.1:8000",
    fmt: Annotated[str | None, typer.Option("--format", show_default=False,
                                            help="ndjson or csv (default: from the file extension).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=500,
                                            help="Events per request.")] = 500,
    rejected: Annotated[Path | None, typer.Option("--rejected", show_default=False,
                                                  help="Where rejected rows go (default: FILE.rejected.ndjson).")] = None,
    state: Annotated[Path | None, typer.Option("--state", show_default=False,
                                               help="Saved progress (default: FILE.import-state.json).")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Ignore saved progress; start at the top.")] = False,
    retry_for: Annotated[float, typer.Option("--retry-for", min=0,
                                             help="Seconds to keep retrying a batch while the API is unavailable.")] = 600.0,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (for CI and logs).")] = False,
) -> None:
    """Send a history file through the public API in batches; resumable, rejects go to a file."""
    from services.ingest import backfill

    if fmt is not None and fmt.lower() not in backfill.FORMATS:
        raise typer.BadParameter("must be ndjson or csv", param_hint="--format")
    reporter = backfill.PlainReporter() if no_progress else backfill.RichProgress()
    try:
        report = backfill.run_import(
            file, url=url, api_key=key, fmt=fmt, batch_size=batch_size, rejected_path=rejected,
            state_path=state, restart=restart, retry_for_s=retry_for, reporter=reporter,
        )
    except backfill.BackfillError as exc:
        typer.echo(f"import failed: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from exc
    typer.echo(report.summary())


@dlq_app.command("list")
def dlq_list(
    topic: Annotated[str, typer.Option(help="The topic whose dead letters to show.")] = "customer-events",
    full: Annotated[bool, typer.Option(help="Print whole values, not a preview.")] = False,
) -> None:
    """Show every dead letter of a topic with its reason and origin."""
    from shared.dead_letters import list_dead_letters
    from shared.settings import KafkaSettings

    letters = asyncio.run(list_dead_letters(KafkaSettings(), topic))
    for letter in letters:
        value = letter.value.decode(errors="replace")
        by = f" by {letter.group}" if letter.group else ""
        typer.echo(f"[{letter.partition}]@{letter.offset} {'replayed' if letter.replayed else 'pending '} "
                   f"from {letter.source}{by}: {letter.reason}\n    {value if full else value[:200]}")
    pending = sum(not letter.replayed for letter in letters)
    typer.echo(f"{len(letters)} dead letters on {topic}.dlq, {pending} not replayed")


@dlq_app.command("replay")
def dlq_replay(
    topic: Annotated[str, typer.Option(help="The topic whose dead letters to re-publish.")] = "customer-events",
) -> None:
    """Re-publish the dead letters not replayed before to their topic (after fixing the cause)."""
    from shared.dead_letters import replay_dead_letters
    from shared.settings import KafkaSettings

    count = asyncio.run(replay_dead_letters(KafkaSettings(), topic))
    typer.echo(f"replayed {count} dead letters to {topic}")


def _demo_secret() -> str:
    if not DEMO_SECRET_FILE.exists():
        DEMO_SECRET_FILE.parent.mkdir(parents=True, exist_ok=True)
        DEMO_SECRET_FILE.write_text("whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())
    return DEMO_SECRET_FILE.read_text().strip()


@app.command()
def receiver(port: int = RECEIVER_PORT, secret: Annotated[str | None, typer.Option()] = None) -> None:
    """A local webhook receiver that verifies signatures and prints each offer."""
    import uvicorn

    from services.demo_receiver import create_receiver_app

    uvicorn.run(create_receiver_app(secret or _demo_secret()), host="127.0.0.1", port=port, log_level="warning")


def _wait_http(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s}s")


@app.command()
def bootstrap(
    stay: Annotated[bool, typer.Option(help="Keep running afterwards (for the Procfile).")] = False,
    customers: int = 3000,
) -> None:
    """Prepare a running stack for a first try: topics, a model, the demo tenant and webhook."""
    import httpx

    from services.scoring import cli_ops as scoring_ops
    from shared.broker import wait_for_port
    from shared.kafka import ensure_topics
    from shared.settings import KafkaSettings
    from shared.topics import with_dead_letters

    kafka = KafkaSettings()
    host, port = kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    wait_for_port(host, int(port), timeout_s=60)
    created = asyncio.run(ensure_topics(kafka, with_dead_letters()))
    typer.echo(f"topics ready ({len(created)} created)")

    _wait_http(f"http://127.0.0.1:{DEFAULT_PORTS[Service.scoring]}/healthz")  # its tables exist
    scoring_db = _database_url("scoring")
    if scoring_ops.has_active_model(scoring_db):
        typer.echo("an active churn model exists")
    else:
        typer.echo(f"no active model: simulating {customers} customers and training one ...")
        scoring_ops.simulate(scoring_db, "sim", customers, 7, None, None)
        report = scoring_ops.train(scoring_db, "sim", 90, True)
        typer.echo(report.summary() if hasattr(report, "summary") else str(report))

    gateway = f"http://127.0.0.1:{DEFAULT_PORTS[Service.gateway]}"
    _wait_http(f"{gateway}/readyz")
    from services.gateway import manage as gateway_ops

    _tenant_id, api_key = gateway_ops.create_tenant(_database_url("gateway"), DEMO_TENANT)
    auth = {"Authorization": f"Bearer {api_key}"}
    _wait_http(f"http://127.0.0.1:{DEFAULT_PORTS[Service.actions]}/readyz")
    receiver_url = f"http://127.0.0.1:{RECEIVER_PORT}/webhooks"
    existing = httpx.get(f"{gateway}/v1/webhooks", headers=auth, timeout=10).json()
    if not any(w.get("url") == receiver_url for w in existing):
        response = httpx.post(f"{gateway}/v1/webhooks", headers=auth, timeout=10,
                              json={"url": receiver_url, "secret": _demo_secret()})
        response.raise_for_status()

    typer.echo(_banner(gateway, api_key))
    while stay:  # honcho ends the whole stack when any process exits
        signal.pause()


def _banner(gateway: str, api_key: str) -> str:
    sample = json.dumps({
        "id": "evt-1", "type": "support.complaint", "customer_id": "c-1042",
        "occurred_at": "2026-11-20T10:00:00Z", "source": "shop-de",
        "data": {"severity": "high", "category": "delivery"},
    })
    return f"""
================================================================================
 churnguard is up.
   gateway (the public API)  {gateway}        docs: {gateway}/docs
   demo tenant API key       {api_key}
   demo webhook receiver     http://127.0.0.1:{RECEIVER_PORT}/webhooks (its lines show as 'receiver')
   internal services         ingest :8001, scoring :8002, actions :8003 (gateway only)
   metrics                   http://127.0.0.1:<port>/metrics on every service
 send a first event:
   curl -s -X POST {gateway}/v1/events -H 'Authorization: Bearer {api_key}' \\
        -H 'Content-Type: application/json' -d {shlex.quote(sample)}
 Ctrl-C stops everything.
================================================================================"""


@app.command()
def dev() -> None:
    """Broker, the four services, a demo webhook receiver and the setup step, in one terminal."""
    from honcho.manager import Manager
    from honcho.printer import Printer

    VAR.mkdir(exist_ok=True)
    # The demo webhook receiver is http on 127.0.0.1, which the SSRF guard refuses by default; and
    # the demo's at-risk customer must get its offer, so no control group unless asked for
    # (e.g. CHURNGUARD_ACTIONS_HOLDOUT_PERCENT=10 make run).
    env = {"CHURNGUARD_ACTIONS_WEBHOOK_ALLOW_LOCAL_URLS": "true", "CHURNGUARD_ACTIONS_HOLDOUT_PERCENT": "0",
           **os.environ, "PYTHONUNBUFFERED": "1"}
    manager = Manager(Printer(sys.stdout))
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, command = line.split(":", 1)
        command = command.strip()
        if command.startswith("python "):
            command = shlex.quote(sys.executable) + command[len("python"):]
        command = f"exec {command}"  # the shell hands over, so exit codes and signals are the process's own
        manager.add_process(name.strip(), command, env=env, cwd=str(Path.cwd()))
    manager.loop()
    sys.exit(manager.returncode)


def main() -> None:
    from shared.logs import configure_logging

    configure_logging()
    app()


if __name__ == "__main__":
    main()
