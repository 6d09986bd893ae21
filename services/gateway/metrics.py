"""The gateway's Prometheus objects (HTTP metrics per route template come from shared.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from shared.metrics import LATENCY_BUCKETS

UPSTREAM_REQUESTS = Counter(
    "churnguard_gateway_upstream_requests_total",
    "Requests proxied to an upstream service, by outcome: the status class (2xx..5xx) of the "
    "upstream's answer, or timeout / unavailable / error when there was none.",
    ["upstream", "outcome"],
)
UPSTREAM_DURATION = Histogram(
    "churnguard_gateway_upstream_duration_seconds",
    "Time from sending a proxied request to having the upstream's full response (or failing).",
    ["upstream"],
    buckets=LATENCY_BUCKETS,
)
AUTH_FAILURES = Counter(
    "churnguard_gateway_auth_failures_total",
    "Requests refused for their API key, by reason (missing, invalid, revoked, scope: the key "
    "lacks the scope the route needs).",
    ["reason"],
)
RATE_LIMITED = Counter(
    "churnguard_gateway_rate_limited_total",
    "Requests answered 429, by reason (key: the API key's token bucket was empty).",
    ["reason"],
)
JOINED_EVENTS = Histogram(
    "churnguard_gateway_joined_events",
    "Single events (POST /v1/events) per request to ingest: concurrent ones of a tenant travel "
    "together (services/gateway/joiner.py); 1 when nothing else was waiting.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
