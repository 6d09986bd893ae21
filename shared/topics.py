"""Topic names. A prefix (settings) lets tests and tenants of a shared cluster stay apart."""

from __future__ import annotations

CUSTOMER_EVENTS = "customer-events"
CHURN_SCORES = "churn-scores"
RETENTION_ACTIONS = "retention-actions"
# scoring and actions report finished erasures here; ingest keeps the erasure record.
ERASURE_STATUS = "erasure-status"
ALL_TOPICS = (CUSTOMER_EVENTS, CHURN_SCORES, RETENTION_ACTIONS, ERASURE_STATUS)


def dead_letter(topic: str) -> str:
    return f"{topic}.dlq"


def with_dead_letters(topics: tuple[str, ...] = ALL_TOPICS) -> tuple[str, ...]:
    return tuple(t for topic in topics for t in (topic, dead_letter(topic)))
