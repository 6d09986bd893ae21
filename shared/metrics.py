"""Prometheus plumbing shared by every service: HTTP metrics by route template, /metrics.

Names follow `churnguard_<service>_<what>_<unit>`; labels are low-cardinality (route
template, method, status class), never a customer id or a raw path.
"""

from __future__ import annotations

import time
from functools import lru_cache

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

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
            f"churnguard_{service}_http_requests_in_flight", "HTTP requests being handled."
        )


@lru_cache(maxsize=None)
def http_metrics(service: str) -> HttpMetrics:
    """Metrics are process-global (one registry); several apps of one service share them."""
    return HttpMetrics(service)


def route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def instrument(app: FastAPI, service: str) -> None:
    metrics = http_metrics(service)

    @app.middleware("http")
    async def _observe(request: Request, call_next):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        metrics.in_flight.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.in_flight.dec()
            route = route_template(request)
            metrics.requests.labels(route, request.method, str(status)).inc()
            metrics.duration.labels(route, request.method).observe(time.perf_counter() - started)

    @app.get("/metrics", include_in_schema=False)
    def _metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
