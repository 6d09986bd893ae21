"""What an API key may do. A small fixed set; the route table says which scope each public
route needs (proxy.py), and the admin API needs `admin`.

| scope | allows |
|---|---|
| `events:write` | sending events (single, batch, sources) and managing source secrets; reading the event schema |
| `scores:read` | reading results: a customer's score, offers, decisions and state; the model list; the uplift report |
| `models:admin` | changing scoring's model registry (activating, training, deleting models) |
| `actions:admin` | policies, webhook subscriptions and deliveries (read and write: they are configuration) |
| `admin` | the gateway's admin API: tenants, keys, rate limits, audit log, across all tenants |
"""

from __future__ import annotations

from collections.abc import Iterable

EVENTS_WRITE = "events:write"
SCORES_READ = "scores:read"
MODELS_ADMIN = "models:admin"
ACTIONS_ADMIN = "actions:admin"
ADMIN = "admin"

# What a key gets when nobody chose its scopes: the CLI (`churnguard tenant create`), `make
# run`'s bootstrap, keys issued before scopes existed. Everything a tenant can do, never `admin`.
TENANT_SCOPES: tuple[str, ...] = (EVENTS_WRITE, SCORES_READ, MODELS_ADMIN, ACTIONS_ADMIN)
ALL_SCOPES: tuple[str, ...] = (*TENANT_SCOPES, ADMIN)


def parse_scopes(values: Iterable[str]) -> tuple[str, ...]:
    """Known scopes, deduplicated, in the canonical order; ValueError naming an unknown one."""
    chosen = set()
    for value in values:
        if value not in ALL_SCOPES:
            raise ValueError(f"unknown scope {value!r}; known: {', '.join(ALL_SCOPES)}")
        chosen.add(value)
    if not chosen:
        raise ValueError("at least one scope is needed")
    return tuple(s for s in ALL_SCOPES if s in chosen)


def to_column(scopes: Iterable[str]) -> str:
    return " ".join(scopes)


def from_column(text: str) -> frozenset[str]:
    return frozenset(text.split())
