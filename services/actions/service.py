"""Business logic of the actions service. Imports neither fastapi nor aiokafka; the caller owns
the transaction (it passes a session from `shared.db.session_scope`) and the clock (`now`).

Webhook subscriptions, the outbox and deliveries live in `services.actions.webhooks`; the names
re-exported below keep older imports working."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from services.actions import repository, webhooks
from services.actions.errors import Conflict, NotFound
from services.actions.policies import OFFER_CREATED, Policy, ScoreContext
from services.actions.tables import ActionsDecision, ActionsOffer
from services.actions.webhooks import (  # noqa: F401  (re-exported)
    OFFER_CREATED_EVENT,
    WEBHOOK_EVENT_TYPES,
    AttemptOutcome,
    AttemptResult,
    ClaimedDelivery,
    check_secret,
    claim_due_deliveries,
    generate_secret,
    outbox_counts,
    record_attempt,
    retry_delay,
)
from shared.events import ActionRecord, ScoreRecord, new_id

__all__ = ["Conflict", "NotFound"]


# --- scores -> decisions, offers and the webhook outbox ------------------------------


@dataclass(frozen=True)
class DecisionResult:
    record: ActionRecord
    created: bool  # False when the score had been decided before (a redelivery)
    deliveries: int  # outbox rows written by this decision


def decide(session: Session, score: ScoreRecord, policy: Policy, now: datetime) -> DecisionResult:
    """Decide once per score: evaluate the policy, create the offer and its outbox rows.

    A score already decided returns the stored decision (so the caller may re-publish it)
    and writes nothing. The UNIQUE(tenant_id, score_id) constraint backs this up if two
    consumers race on one score: the loser's transaction fails and is retried as a duplicate.
    """
    existing = repository.get_decision(session, score.tenant_id, score.score_id)
    if existing is not None:
        return DecisionResult(action_record(existing), created=False, deliveries=0)

    context = ScoreContext(
        probability=score.probability,
        band=score.band,
        now=now,
        last_offer_at=repository.last_offer_at(session, score.tenant_id, score.customer_id),
    )
    verdict = policy.evaluate(context)

    offer: ActionsOffer | None = None
    deliveries = 0
    if verdict.outcome == OFFER_CREATED and verdict.offer is not None:
        offer = ActionsOffer(
            offer_id=new_id(),
            tenant_id=score.tenant_id,
            customer_id=score.customer_id,
            policy=verdict.policy,
            kind=verdict.offer.kind,
            discount_percent=verdict.offer.discount_percent,
            valid_until=verdict.offer.valid_until,
            churn_probability=score.probability,
            band=score.band,
            model_version=score.model_version,
            score_id=score.score_id,
            created_at=now,
        )
        session.add(offer)
        session.flush()  # the outbox rows reference the offer
        deliveries = _enqueue_webhooks(session, offer, now, score.reasons)

    decision = ActionsDecision(
        decision_id=new_id(),
        tenant_id=score.tenant_id,
        score_id=score.score_id,
        customer_id=score.customer_id,
        policy=verdict.policy,
        outcome=verdict.outcome,
        reason=verdict.reason,
        offer_id=offer.offer_id if offer else None,
        churn_probability=score.probability,
        band=score.band,
        model_version=score.model_version,
        decided_at=now,
    )
    session.add(decision)
    session.flush()
    return DecisionResult(action_record(decision), created=True, deliveries=deliveries)


def _enqueue_webhooks(
    session: Session, offer: ActionsOffer, now: datetime, reasons: Sequence[str] = ()
) -> int:
    """The offer's outbox rows (one per subscribed endpoint), in the decision's transaction."""
    return webhooks.enqueue(
        session,
        tenant_id=offer.tenant_id,
        offer_id=offer.offer_id,
        payload=offer_payload(offer, reasons),
        now=now,
        event_type=OFFER_CREATED_EVENT,
    )


def offer_payload(offer: ActionsOffer, reasons: Sequence[str] = ()) -> str:
    """The webhook body: what the receiver needs to deliver the offer, and nothing else
    (no tenant id, no secrets). Stored as text so every retry signs the same bytes.
    `reasons` are the score's plain-language reasons (ScoreRecord.reasons), copied so the
    marketing tool can personalise the offer."""
    body = {
        "type": OFFER_CREATED_EVENT,
        "timestamp": offer.created_at.isoformat(),
        "data": {
            "offer_id": offer.offer_id,
            "customer_id": offer.customer_id,
            "kind": offer.kind,
            "discount_percent": offer.discount_percent,
            "valid_until": offer.valid_until.isoformat(),
            "policy": offer.policy,
            "churn_probability": offer.churn_probability,
            "band": offer.band,
            "model_version": offer.model_version,
            "reasons": list(reasons),
        },
    }
    return json.dumps(body, separators=(",", ":"))


def action_record(decision: ActionsDecision) -> ActionRecord:
    return ActionRecord(
        decision_id=decision.decision_id,
        tenant_id=decision.tenant_id,
        customer_id=decision.customer_id,
        score_id=decision.score_id,
        outcome=decision.outcome,  # type: ignore[arg-type]
        reason=decision.reason,
        policy=decision.policy,
        offer_id=decision.offer_id,
        decided_at=decision.decided_at,
    )


def list_offers(
    session: Session, tenant_id: str, customer_id: str, limit: int = 100
) -> Sequence[ActionsOffer]:
    return repository.list_offers(session, tenant_id, customer_id, limit)


def list_decisions(
    session: Session, tenant_id: str, customer_id: str, limit: int = 100
) -> Sequence[ActionsDecision]:
    return repository.list_decisions(session, tenant_id, customer_id, limit)
