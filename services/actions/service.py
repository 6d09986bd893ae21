"""Business logic of the actions service. Imports neither fastapi nor aiokafka; the caller owns
the transaction (it passes a session from `shared.db.session_scope`) and the clock (`now`)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlmodel import Session

from services.actions import repository
from services.actions.policies import OFFER_CREATED, Policy, ScoreContext
from services.actions.tables import (
    ActionsDecision,
    ActionsDelivery,
    ActionsOffer,
    ActionsWebhookSubscription,
)
from shared.events import ActionRecord, ScoreRecord, new_id

OFFER_CREATED_EVENT = "offer.created"
WEBHOOK_EVENT_TYPES = (OFFER_CREATED_EVENT,)

SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES, SECRET_MAX_BYTES = 24, 64  # Standard Webhooks: 24..64 bytes of key
GENERATED_SECRET_BYTES = 32
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
MAX_ERROR_CHARS = 1000


class NotFound(Exception):
    """The thing does not exist for this tenant (another tenant's id included)."""


class Conflict(Exception):
    """The request is valid but the thing is in a state that does not allow it."""


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
    payload = offer_payload(offer, reasons)
    count = 0
    for subscription in repository.active_subscriptions(session, offer.tenant_id):
        if OFFER_CREATED_EVENT not in subscription.event_types:
            continue
        session.add(
            ActionsDelivery(
                delivery_id=f"msg_{new_id()}",
                tenant_id=offer.tenant_id,
                subscription_id=subscription.id,
                offer_id=offer.offer_id,
                event_type=OFFER_CREATED_EVENT,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        count += 1
    return count


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


# --- webhook subscriptions -----------------------------------------------------------


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(GENERATED_SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """Accept `whsec_` + standard base64 of 24..64 bytes; raise ValueError saying what is wrong."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with '{SECRET_PREFIX}'")
    encoded = secret[len(SECRET_PREFIX) :]
    if not _BASE64.match(encoded) or len(encoded) % 4:
        raise ValueError(f"must be '{SECRET_PREFIX}' followed by standard base64")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be '{SECRET_PREFIX}' followed by standard base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(
            f"key must be {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes, got {len(key)}"
        )
    return secret


def create_subscription(
    session: Session,
    tenant_id: str,
    url: str,
    now: datetime,
    secret: str | None = None,
    event_types: Sequence[str] = (OFFER_CREATED_EVENT,),
) -> ActionsWebhookSubscription:
    subscription = ActionsWebhookSubscription(
        id=new_id(),
        tenant_id=tenant_id,
        url=url,
        secret=check_secret(secret) if secret is not None else generate_secret(),
        event_types=list(dict.fromkeys(event_types)),
        active=True,
        created_at=now,
    )
    session.add(subscription)
    session.flush()
    return subscription


def list_subscriptions(session: Session, tenant_id: str) -> Sequence[ActionsWebhookSubscription]:
    return repository.active_subscriptions(session, tenant_id)


def delete_subscription(
    session: Session, tenant_id: str, subscription_id: str, now: datetime
) -> int:
    """Deactivate a subscription (the row stays for the delivery history) and park its pending
    deliveries: nobody is listening any more. Returns how many deliveries were parked."""
    subscription = repository.get_subscription(session, tenant_id, subscription_id)
    if subscription is None or not subscription.active:
        raise NotFound(f"webhook subscription {subscription_id} not found")
    subscription.active = False
    session.add(subscription)
    pending = repository.pending_deliveries_of_subscription(session, tenant_id, subscription_id)
    for delivery in pending:
        _park(delivery, "subscription deleted")
        session.add(delivery)
    return len(pending)


# --- deliveries ----------------------------------------------------------------------


def list_deliveries(
    session: Session, tenant_id: str, status: str | None = None, limit: int = 100
) -> Sequence[ActionsDelivery]:
    return repository.list_deliveries(session, tenant_id, status, limit)


def replay_delivery(
    session: Session, tenant_id: str, delivery_id: str, now: datetime
) -> ActionsDelivery:
    """Send a parked (or failing) delivery again now, with a fresh retry schedule."""
    delivery = repository.get_delivery(session, tenant_id, delivery_id)
    if delivery is None:
        raise NotFound(f"delivery {delivery_id} not found")
    if delivery.status == "delivered":
        raise Conflict(f"delivery {delivery_id} was already delivered")
    subscription = repository.get_subscription(session, tenant_id, delivery.subscription_id)
    if subscription is None or not subscription.active:
        raise Conflict(f"the webhook subscription of delivery {delivery_id} was deleted")
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_attempt_at = now
    session.add(delivery)
    session.flush()
    return delivery


def retry_delay(attempts: int, schedule: Sequence[float]) -> timedelta | None:
    """How long to wait after the `attempts`-th failed attempt; None once the schedule is spent.

    The first attempt is immediate; `schedule[i]` is the wait before attempt i + 2.
    """
    if attempts < 1:
        raise ValueError("attempts counts failed attempts and starts at 1")
    if attempts > len(schedule):
        return None
    return timedelta(seconds=schedule[attempts - 1])


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery_id: str
    url: str
    secret: str
    payload: str
    attempts: int  # attempts made before this one


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None = None
    error: str | None = None  # a network error or timeout; None when the receiver answered

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


AttemptOutcome = Literal["delivered", "failed", "error", "parked", "stale"]


def claim_due_deliveries(
    session: Session, now: datetime, limit: int, lease: timedelta
) -> tuple[list[ClaimedDelivery], int]:
    """Claim due deliveries for one attempt (system-wide, the worker's job).

    A claim moves `next_attempt_at` to `now + lease`: if this process dies mid-attempt, the
    delivery becomes due again after the lease and is retried with the same webhook-id.
    Deliveries whose subscription was deleted are parked instead. Returns (claimed, parked).
    """
    rows = repository.lock_due_deliveries(session, now, limit)
    subscriptions = repository.subscriptions_by_id(
        session, sorted({r.subscription_id for r in rows})
    )
    claimed: list[ClaimedDelivery] = []
    parked = 0
    for row in rows:
        subscription = subscriptions.get(row.subscription_id)
        if subscription is None or not subscription.active:
            _park(row, "subscription deleted")
            parked += 1
        else:
            row.next_attempt_at = now + lease
            claimed.append(
                ClaimedDelivery(
                    row.delivery_id,
                    subscription.url,
                    subscription.secret,
                    row.payload,
                    row.attempts,
                )
            )
        session.add(row)
    return claimed, parked


def record_attempt(
    session: Session,
    claimed: ClaimedDelivery,
    result: AttemptResult,
    now: datetime,
    schedule: Sequence[float],
) -> AttemptOutcome:
    """Book one attempt: delivered on 2xx; otherwise schedule the next retry, or park the
    delivery (replayable) once the schedule is spent."""
    row = repository.lock_delivery(session, claimed.delivery_id)
    if row is None or row.status != "pending" or row.attempts != claimed.attempts:
        return "stale"  # replayed, parked or handled elsewhere meanwhile
    row.attempts += 1
    row.last_status_code = result.status_code
    if result.ok:
        row.status = "delivered"
        row.delivered_at = now
        row.last_error = None
        outcome: AttemptOutcome = "delivered"
    else:
        error = result.error or f"receiver answered HTTP {result.status_code}"
        delay = retry_delay(row.attempts, schedule)
        if delay is None:
            _park(
                row, f"retry schedule exhausted after {row.attempts} attempts; last error: {error}"
            )
            outcome = "parked"
        else:
            row.last_error = error[:MAX_ERROR_CHARS]
            row.next_attempt_at = now + delay
            outcome = "error" if result.error else "failed"
    session.add(row)
    return outcome


def _park(delivery: ActionsDelivery, reason: str) -> None:
    delivery.status = "parked"
    delivery.last_error = reason[:MAX_ERROR_CHARS]


def outbox_counts(session: Session) -> dict[str, int]:
    return repository.count_open_deliveries(session)
