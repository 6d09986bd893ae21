"""Erasure (GDPR Art. 17) and export (Art. 15/20) of one customer in scoring.

The erasure control record arrives on customer-events in the customer's partition, after their
earlier events and before later ones. Handling it deletes the customer's event history, flags,
features and scores and keeps a tombstone (tenant, customer, erasure id, erased_at); from then
on the customer's events are neither stored nor scored. Handling it again changes nothing.
The tombstone is permanent: a person who comes back is a new customer id for the tenant.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlmodel import Session

from services.scoring import repository
from services.scoring.features import as_utc
from shared.events import ErasureRecord, EventRecord


def erase(session: Session, record: ErasureRecord, now: datetime) -> dict[str, int]:
    """Delete what scoring holds about the customer and keep the tombstone (one transaction,
    the caller's). Returns the rows deleted per table."""
    deleted = repository.erase_customer(session, record.tenant_id, record.customer_id)
    repository.add_tombstone(session, record.tenant_id, record.customer_id, record.erasure_id, now)
    return deleted


def drop_erased(session: Session, records: Sequence[EventRecord]) -> tuple[list[EventRecord], int]:
    """The records whose customer is not erased, and how many were dropped."""
    by_tenant: dict[str, set[str]] = defaultdict(set)
    for record in records:
        by_tenant[record.tenant_id].add(record.event.customer_id)
    erased = {
        (tenant, customer)
        for tenant, customers in by_tenant.items()
        for customer in repository.erased_customers(session, tenant, customers)
    }
    if not erased:
        return list(records), 0
    kept = [r for r in records if (r.tenant_id, r.event.customer_id) not in erased]
    return kept, len(records) - len(kept)


def export(session: Session, tenant_id: str, customer_id: str) -> dict[str, Any]:
    """Everything scoring holds about one customer of one tenant."""
    events = repository.customer_events(session, tenant_id, customer_id)
    flags = repository.event_flags(session, tenant_id, customer_id)
    features = repository.customer_features(session, tenant_id, customer_id)
    stone = repository.tombstone(session, tenant_id, customer_id)
    return {
        "events": [
            {"id": e.event_id, "type": e.type, "occurred_at": as_utc(e.occurred_at),
             "received_at": as_utc(e.received_at), "data": e.payload, "flags": flags.get(e.event_id, [])}
            for e in events
        ],
        "features": None if features is None else {
            "values": dict(features.features), "updated_at": as_utc(features.updated_at)},
        "scores": [
            {"score_id": s.score_id, "probability": s.probability, "band": s.band, "model_version": s.model_version,
             "scored_at": as_utc(s.scored_at), "event_id": s.event_id, "reasons": list(s.reasons or [])}
            for s in repository.customer_scores(session, tenant_id, customer_id)
        ],
        "erased_at": None if stone is None else as_utc(stone.erased_at),
    }


def holds_anything(section: dict[str, Any]) -> bool:
    return bool(section["events"] or section["features"] or section["scores"] or section["erased_at"])
