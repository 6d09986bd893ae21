"""Customer state in actions, from `customer-events`: consent, segment and attributes, loyalty
tier, contracts, complaints, feedback, activity days and offer responses.

Idempotent and out-of-order safe: each fact remembers the occurred_at of the event it came from
and only a newer (or equally new) event replaces it; activity days and offer responses are sets
keyed by day / event id. Applying the same event twice, or an old event after a newer one,
leaves the latest state. Erased customers are not rebuilt from later events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlmodel import Session

from services.actions import repository
from services.actions.tables import ActionsContract, ActionsCustomer
from shared.events import EventRecord

# Event types whose arrival says nothing about the customer's own activity.
_NOT_ACTIVITY = frozenset({"customer.consent_changed", "customer.profile_updated"})
# Event types that trigger policies at once (when recent), and the trigger they raise.
EVENT_TRIGGERS = {
    "subscription.cancellation_notice": "cancellation",
    "support.complaint": "complaint",
    "feedback.nps": "feedback",
    "feedback.csat": "feedback",
}


@dataclass(frozen=True)
class EventTrigger:
    trigger: str
    tenant_id: str
    customer_id: str
    event_id: str


def _newer(incoming: datetime, stored: datetime | None) -> bool:
    return stored is None or incoming >= stored


def _day(value: Any) -> date | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, date) else date.fromisoformat(str(value))


@dataclass(frozen=True)
class Folded:
    trigger: EventTrigger | None
    suppressed: bool = False  # the customer is erased: nothing was stored


def apply_event(
    session: Session, record: EventRecord, now: datetime, trigger_max_age: timedelta
) -> EventTrigger | None:
    """Fold one event into the customer's state; returns the trigger it raises, if any (only for
    events that occurred within `trigger_max_age` of now: a backfilled complaint from last year
    must not send a service-recovery message today)."""
    return fold_event(session, record, now, trigger_max_age).trigger


def fold_event(session: Session, record: EventRecord, now: datetime, trigger_max_age: timedelta) -> Folded:
    """apply_event, also saying whether the event was suppressed (an erased customer)."""
    return fold_events(session, [record], now, trigger_max_age)[0]


def fold_events(
    session: Session, records: Sequence[EventRecord], now: datetime, trigger_max_age: timedelta
) -> list[Folded]:
    """Fold events into their customers' state, in order, set-based: the customers locked (and
    created if new) and their contracts read in a few queries, activity days and offer
    responses written in one INSERT each; one result per event."""
    if not records:
        return []
    states = repository.lock_customers(
        session, sorted({(r.tenant_id, r.event.customer_id) for r in records})
    )
    wanted = sorted({
        (r.tenant_id, str(r.event.data.model_dump(mode="json").get("contract_id")))
        for r in records
        if r.event.type.startswith("subscription.")
    })
    batch = _FoldBatch(contracts=repository.contracts_by_id(session, wanted))
    folded = []
    for record in records:
        state = states[(record.tenant_id, record.event.customer_id)]
        if state.erased_at is not None:
            folded.append(Folded(None, suppressed=True))
            continue
        folded.append(Folded(_fold(session, batch, record, state, now, trigger_max_age)))
    repository.add_activity_days(session, sorted(batch.days))
    repository.add_offer_responses(session, list(batch.responses.values()))
    return folded


@dataclass
class _FoldBatch:
    contracts: dict[tuple[str, str], ActionsContract | None]
    days: set[tuple[str, str, date]] = field(default_factory=set)
    responses: dict[tuple[str, str], dict[str, object]] = field(default_factory=dict)


def _fold(
    session: Session,
    batch: _FoldBatch,
    record: EventRecord,
    state: ActionsCustomer,
    now: datetime,
    trigger_max_age: timedelta,
) -> EventTrigger | None:
    event = record.event
    tenant, customer = record.tenant_id, event.customer_id
    at: datetime = event.occurred_at
    data = event.data.model_dump(mode="json")
    kind = event.type

    if kind not in _NOT_ACTIVITY:
        if _newer(at, state.last_activity_at):
            state.last_activity_at = at
        batch.days.add((tenant, customer, at.date()))

    if kind == "customer.profile_updated" and _newer(at, state.profile_at):
        state.segment = data.get("segment")
        state.attributes = dict(data.get("attributes") or {})
        state.profile_at = at
    elif kind == "customer.consent_changed" and _newer(at, state.consent_at):
        state.marketing_consent = bool(data["marketing"])
        state.consent_at = at
    elif kind == "loyalty.tier_changed" and _newer(at, state.tier_at):
        state.loyalty_tier = data["tier"]
        state.tier_at = at
    elif kind == "support.complaint" and _newer(at, state.last_complaint_at):
        state.last_complaint_at = at
    elif kind == "feedback.nps" and _newer(at, state.nps_at):
        state.last_nps, state.nps_at = int(data["score"]), at
    elif kind == "feedback.csat" and _newer(at, state.csat_at):
        state.last_csat, state.csat_at = int(data["score"]), at
    elif kind in ("offer.redeemed", "offer.declined"):
        batch.responses.setdefault((tenant, event.id), {
            "tenant_id": tenant,
            "event_id": event.id,
            "customer_id": customer,
            "offer_id": data["offer_id"],
            "response": kind.split(".", 1)[1],
            "occurred_at": at,
        })
    elif kind.startswith("subscription."):
        _apply_contract_event(session, batch, tenant, customer, kind, data, at)

    trigger = EVENT_TRIGGERS.get(kind)
    if trigger is None or now - at > trigger_max_age:
        return None
    return EventTrigger(trigger, tenant, customer, event.id)


def _apply_contract_event(
    session: Session,
    batch: _FoldBatch,
    tenant: str,
    customer: str,
    kind: str,
    data: dict[str, Any],
    at: datetime,
) -> None:
    key = (tenant, str(data["contract_id"]))
    contract = batch.contracts.get(key)
    if contract is None:
        contract = ActionsContract(
            tenant_id=tenant,
            contract_id=data["contract_id"],
            customer_id=customer,
            status="active",
            updated_at=at,
        )
        batch.contracts[key] = contract
    elif at < contract.updated_at:
        # An older event: only the end of a contract is a fact that cannot be superseded.
        if kind == "subscription.ended" and contract.ended_at is None:
            contract.ended_at = at
            session.add(contract)
        return
    contract.updated_at = at
    if kind in ("subscription.started", "subscription.renewed"):
        contract.status = "active"
        contract.end_date = _day(data.get("end_date"))
        contract.auto_renew = bool(data.get("auto_renew", False))
        contract.price = data.get("price")
        contract.notice_at = None
    elif kind == "subscription.cancellation_notice":
        contract.status = "notice"
        contract.notice_at = at
        contract.auto_renew = False
        effective = _day(data.get("effective_date"))
        if effective is not None:
            contract.end_date = effective
        elif contract.end_date is None:
            notice_days = int(data.get("notice_period_days") or 0)
            contract.end_date = (at + timedelta(days=notice_days)).date()
    elif kind == "subscription.ended":
        contract.status = "ended"
        contract.ended_at = at
        contract.end_date = _day(data.get("end_date")) or at.date()
        contract.auto_renew = False
    session.add(contract)


def contract_facts(
    contracts: list[ActionsContract], today: date
) -> tuple[float | None, bool | None, bool]:
    """(days to the nearest contract end, that contract's auto-renew, any notice given) over
    contracts that have not ended."""
    open_contracts = [c for c in contracts if c.status != "ended"]
    notice = any(c.status == "notice" for c in open_contracts)
    dated = [c for c in open_contracts if c.end_date is not None and c.end_date >= today]
    if not dated:
        return None, None, notice
    nearest = min(dated, key=lambda c: (c.end_date, c.contract_id))
    assert nearest.end_date is not None
    return float((nearest.end_date - today).days), nearest.auto_renew, notice


def customer_value(state: ActionsCustomer | None, features: dict[str, float] | None) -> float:
    """CLV for conditions and the value gate: the profile attribute `clv` when the tenant sends
    one, else the spend over the last 365 days (from the score's features or the last score)."""
    if state is not None:
        clv = (state.attributes or {}).get("clv")
        if isinstance(clv, (int, float)) and not isinstance(clv, bool):
            return float(clv)
    if features and "spend_365d" in features:
        return float(features["spend_365d"])
    if state is not None and state.spend_365d is not None:
        return float(state.spend_365d)
    return 0.0


def profile(
    session: Session, tenant_id: str, customer_id: str
) -> tuple[ActionsCustomer | None, list[ActionsContract]]:
    """What actions knows of a customer (state and contracts); (None, []) when nothing, and for
    an erased customer (whose row is only the tombstone)."""
    state = repository.get_customer(session, tenant_id, customer_id)
    if state is not None and state.erased_at is not None:
        return None, []
    return state, list(repository.customer_contracts(session, tenant_id, customer_id))


def export(session: Session, tenant_id: str, customer_id: str) -> dict[str, Any]:
    """Everything actions holds about one customer of one tenant (GDPR Art. 15/20): state,
    contracts, activity days, offer responses, decisions, offers and their webhook deliveries
    (payload and status; subscription secrets and URLs are not the customer's data)."""
    state = repository.get_customer(session, tenant_id, customer_id)
    offers = repository.customer_offers(session, tenant_id, customer_id)
    deliveries = repository.deliveries_of_offers(session, tenant_id, [o.offer_id for o in offers])
    erased_at = state.erased_at if state is not None else None
    section: dict[str, Any] = {
        "state": None if state is None or erased_at is not None else state.model_dump(
            exclude={"tenant_id", "customer_id", "erased_at"}, mode="json"),
        "contracts": [c.model_dump(exclude={"tenant_id"}, mode="json")
                      for c in repository.customer_contracts(session, tenant_id, customer_id)],
        "activity_days": [d.isoformat() for d in repository.customer_activity_days(session, tenant_id, customer_id)],
        "offer_responses": [r.model_dump(exclude={"tenant_id"}, mode="json")
                            for r in repository.customer_offer_responses(session, tenant_id, customer_id)],
        "decisions": [d.model_dump(exclude={"tenant_id"}, mode="json")
                      for d in repository.customer_decisions(session, tenant_id, customer_id)],
        "offers": [o.model_dump(exclude={"tenant_id"}, mode="json") for o in offers],
        "deliveries": [
            {"delivery_id": d.delivery_id, "offer_id": d.offer_id, "event_type": d.event_type,
             "status": d.status, "attempts": d.attempts, "created_at": d.created_at.isoformat(),
             "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
             "payload": json.loads(d.payload)}
            for d in deliveries
        ],
        "erased_at": erased_at.isoformat() if erased_at is not None else None,
    }
    section["held"] = any(section[name] for name in section)
    return section
