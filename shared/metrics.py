"""Prometheus plumbing shared by every service: HTTP metrics by route template, /metrics.

Names follow `churnguard_<service>_<what>_<unit>`; labels are low-cardinality (route
template, method, status class), never a customer id or a raw path.

Several uvicorn workers sharing a port (`churnguard serve --workers N`) answer /metrics for the
whole instance: `serve` points prometheus_client's multiprocess mode at a directory
(MULTIPROCESS_DIR_ENV, one per service and port) before the workers start, each worker's values
go to files there, and whichever worker is scraped adds them up. Without it a scrape would see
one worker's counters, a different one each time.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    def __init__(self, service: str) -> None:
        self.requests = Counter(
            f"churnguard_{service}_http_requests_total",
            "HTTP requests handled, by route template, method and status code.",
            ["route", "method", "status"],
        )
        self.duration = Histogram(
            f"churnguard_{service}_http_request_duration_seconds",
            "HTTP request latency, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            f"churnguard_{service}_http_requests_in_flight", "HTTP requests being handled.",
            multiprocess_mode="livesum",
        )


@lru_cache(maxsize=None)
def http_metrics(service: str) -> HttpMetrics:
    """Metrics are process-global (one registry); several apps of one service share them."""
    return HttpMetrics(service)


class _MetricsMiddleware:
    """Plain ASGI (no BaseHTTPMiddleware: that costs a task and a stream per request)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Labelled children by label values: `labels()` takes a lock and checks its arguments on
        # every call; the label sets are few (route templates x methods x statuses).
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            counted = self._counted.get((route, method, status))
            if counted is None:
                counted = self._counted[(route, method, status)] = self.metrics.requests.labels(
                    route, method, str(status))
            counted.inc()
            timed = self._timed.get((route, method))
            if timed is None:
                timed = self._timed[(route, method)] = self.metrics.duration.labels(route, method)
            timed.observe(time.perf_counter() - started)


def instrument(app: FastAPI, service: str) -> None:
    app.add_middleware(_MetricsMiddleware, metrics=http_metrics(service))

    @app.get("/metrics", include_in_schema=False)
    def _metrics() -> Response:
        return Response(generate_latest(scrape_registry()), media_type=CONTENT_TYPE_LATEST)


MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own: read when it is imported
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


def scrape_registry() -> CollectorRegistry:
    """This process's registry; with several workers, one that adds up every worker's files
    (process_* and python_* metrics are then left out: they would describe one worker)."""
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if not directory:
        return REGISTRY
    forget_dead_workers(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


def forget_dead_workers(directory: str) -> None:
    """A worker that died (uvicorn starts another in its place) leaves its live gauges' file,
    e.g. the requests it had in flight: dropped at the next scrape. Its counters stay counted."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        match = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
        if match and not _alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, someone else's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def multiprocess_metrics(workers: int, name: str) -> Callable[[], None]:
    """Before starting the worker processes of the server `name` (service and port): under an
    operator's MULTIPROCESS_DIR_ENV (e.g. a pod's emptyDir) it gets a directory of its own, so
    services sharing the variable neither add up nor wipe each other's values, emptied of an
    earlier run's files (a restarted process would otherwise add its predecessor's counters).
    Without one, several workers get a temporary directory. Returns what to call once they are gone."""
    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    if given:
        own = Path(given) / name
        own.mkdir(parents=True, exist_ok=True)
        for stale in glob.glob(os.path.join(own, "*.db")):
            os.remove(stale)
        os.environ[MULTIPROCESS_DIR_ENV] = str(own)
        return lambda: os.environ.__setitem__(MULTIPROCESS_DIR_ENV, given)
    if workers <= 1:
        return lambda: None
    made = tempfile.mkdtemp(prefix="churnguard-metrics-")
    os.environ[MULTIPROCESS_DIR_ENV] = made

    def remove() -> None:
        os.environ.pop(MULTIPROCESS_DIR_ENV, None)
        shutil.rmtree(made, ignore_errors=True)

    return remove


class ConsumerMetrics:
    """What every consuming service exports about its consumer: lag per partition (records
    not yet processed, from the broker's high watermark at the last fetch) and batch sizes.
    Pass `on_batch` to shared.kafka.ConsumeLoop."""

    def __init__(self, service: str) -> None:
        self.lag = Gauge(
            f"churnguard_{service}_consumer_lag",
            "Records of the partition not yet processed by this consumer (high watermark at the "
            "last fetch minus the next offset to process).",
            ["topic", "partition"],
        )
        self.batch_size = Histogram(
            f"churnguard_{service}_batch_size",
            "Records per processed batch (one partition's share of a poll).",
            buckets=(1, 5, 10, 25, 50, 100, 200, 500, 1000, 2000),
        )

    def on_batch(self, tp: Any, records: int, lag: int | None) -> None:
        self.batch_size.observe(records)
        if lag is not None:
            self.lag.labels(tp.topic, str(tp.partition)).set(lag)
