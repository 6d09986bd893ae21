"""Business logic of the actions service. Imports neither fastapi nor aiokafka; the caller owns
the transaction (it passes a session from `shared.db.session_scope`) and the clock (`now`).

Webhook subscriptions, the outbox and deliveries live in `services.actions.webhooks`; the names
re-exported below keep older imports working."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import Session

from services.actions import repository, webhooks
from services.actions.customers import contract_facts, customer_value
from services.actions.errors import Conflict, NotFound
from services.actions.guardrails import (
    in_cooldown,
    in_holdout,
    passes_value_gate,
    period_start,
    within_budget,
)
from services.actions.policies import (
    BUDGET,
    CONSENT,
    COOLDOWN,
    ERASED,
    HOLDOUT,
    MATCHED,
    NO_MATCH,
    OFFER_CREATED,
    SUPPRESSED,
    VALUE_GATE,
    Facts,
    Offer,
    Policy,
    PolicyDocument,
    first_match,
)
from services.actions.tables import (
    ActionsContract,
    ActionsCustomer,
    ActionsDecision,
    ActionsOffer,
)
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
    created: bool  # False when the trigger had been decided before (a redelivery, a re-sweep)
    deliveries: int  # outbox rows written by this decision
    # False for an erased customer: the suppression is neither stored nor published, so
    # nothing about the customer is written again (the tombstone says enough).
    stored: bool = True


class PolicyCache:
    """Tenants' own documents (None: the tenant uses the default) kept for `ttl_s` seconds of
    process time, saving a query per decision. A write through this instance's API invalidates
    its entry at once; other instances see it within `ttl_s`. `ttl_s` 0 disables caching."""

    def __init__(self, ttl_s: float, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        self._entries: dict[str, tuple[float, PolicyDocument | None]] = {}

    def get(self, tenant_id: str) -> tuple[bool, PolicyDocument | None]:
        entry = self._entries.get(tenant_id)
        if entry is None or self._monotonic() - entry[0] >= self._ttl_s:
            return False, None
        return True, entry[1]

    def put(self, tenant_id: str, document: PolicyDocument | None) -> None:
        if self._ttl_s > 0:
            self._entries[tenant_id] = (self._monotonic(), document)

    def invalidate(self, tenant_id: str) -> None:
        self._entries.pop(tenant_id, None)


@dataclass(frozen=True)
class Rules:
    """What decide() needs besides the facts: the default policy document (the YAML file) and
    the guardrail settings."""

    default_document: PolicyDocument
    consent_required: bool = True  # no consent event yet = no marketing offer (EU opt-in)
    holdout_percent: float = 10.0
    holdout_salt: str = "churnguard-holdout-v1"
    cache: PolicyCache | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TriggerInput:
    """One reason to evaluate policies for one customer. `trigger_id` is the dedup key: the
    score id, or a deterministic id for the contract-end step or the triggering event."""

    trigger: str
    tenant_id: str
    customer_id: str
    trigger_id: str
    score: ScoreRecord | None = None
    contract: ActionsContract | None = None
    contract_offset: int | None = None


_TRIGGER_NAMESPACE = uuid.UUID("0f6c2c59-9a55-4b3e-8f0e-5b9b7d3a1e27")


def trigger_id(*parts: object) -> str:
    """A deterministic id for a non-score trigger (fits the decisions' score_id column)."""
    return uuid.uuid5(_TRIGGER_NAMESPACE, "/".join(str(p) for p in parts)).hex


def score_trigger(score: ScoreRecord) -> TriggerInput:
    return TriggerInput("score", score.tenant_id, score.customer_id, score.score_id, score=score)


def policy_document(session: Session, tenant_id: str, rules: Rules) -> PolicyDocument:
    """The tenant's own document when it defined one through the API, else the default file."""
    if rules.cache is not None:
        hit, cached = rules.cache.get(tenant_id)
        if hit:
            return cached or rules.default_document
    row = repository.get_policy_document(session, tenant_id)
    own = None if row is None else PolicyDocument.model_validate(row.document)
    if rules.cache is not None:
        rules.cache.put(tenant_id, own)
    return own or rules.default_document


def decide(
    session: Session, trigger: ScoreRecord | TriggerInput, rules: Rules, now: datetime
) -> DecisionResult:
    """Decide once per trigger: match the first policy, apply the guardrails, and create the
    offer and its outbox rows, or record why not.

    A trigger already decided returns the stored decision (so the caller may re-publish it)
    and writes nothing. The UNIQUE(tenant_id, score_id) constraint backs this up if two
    consumers race on one trigger: the loser's transaction fails and is retried as a duplicate.
    An erased customer gets a "suppressed: erased" answer that is not stored (stored=False).
    """
    if isinstance(trigger, ScoreRecord):
        trigger = score_trigger(trigger)
    tenant, customer = trigger.tenant_id, trigger.customer_id
    existing = repository.get_decision(session, tenant, trigger.trigger_id)
    if existing is not None:
        return DecisionResult(action_record(existing), created=False, deliveries=0)

    document = policy_document(session, tenant, rules)
    locked = repository.lock_customer(session, tenant, customer)
    if locked.erased_at is not None:
        return DecisionResult(action_record(ActionsDecision(
            decision_id=new_id(), tenant_id=tenant, score_id=trigger.trigger_id, customer_id=customer,
            trigger=trigger.trigger, outcome=SUPPRESSED, reason=ERASED, decided_at=now,
        )), created=False, deliveries=0, stored=False)
    state = locked
    facts = _facts(session, trigger, state, now, _needs_contracts(document, trigger))
    decision = ActionsDecision(
        decision_id=new_id(),
        tenant_id=tenant,
        score_id=trigger.trigger_id,
        customer_id=customer,
        trigger=trigger.trigger,
        policy=None,
        outcome=SUPPRESSED,
        reason=NO_MATCH,
        churn_probability=facts.probability,
        band=facts.band,
        model_version=trigger.score.model_version if trigger.score else (
            state.last_model_version if state else None
        ),
        customer_value=facts.customer_value,
        decided_at=now,
    )
    deliveries = 0
    policy = first_match(document.ordered(), facts)
    if policy is not None:
        offer_spec = document.offers[policy.offer]
        decision.policy = policy.name
        decision.offer_key = policy.offer
        decision.offer_kind = offer_spec.kind
        decision.service = offer_spec.service
        decision.offer_cost = offer_spec.cost
        decision.reason = _guardrail(
            session, trigger, state, facts, policy, offer_spec, document, rules, now
        )
        if decision.reason == MATCHED:
            offer = _create_offer(session, trigger, decision, policy, offer_spec, now)
            decision.outcome = OFFER_CREATED
            decision.offer_id = offer.offer_id
            reasons = trigger.score.reasons if trigger.score else ()
            deliveries = _enqueue_webhooks(session, offer, now, reasons)
    if state is not None and trigger.score is not None:
        _remember_score(state, trigger.score)
        session.add(state)
    session.add(decision)
    session.flush()
    return DecisionResult(action_record(decision), created=True, deliveries=deliveries)


def _needs_contracts(document: PolicyDocument, trigger: TriggerInput) -> bool:
    """Whether any policy listening to this trigger looks at contracts (saves a query per score
    when none does, as with the default file)."""
    return any(
        trigger.trigger in p.triggers
        and (
            p.when.days_to_contract_end is not None
            or p.when.auto_renew is not None
            or p.when.cancellation_notice is not None
        )
        for p in document.ordered()
    )


def _facts(
    session: Session,
    trigger: TriggerInput,
    state: ActionsCustomer | None,
    now: datetime,
    with_contracts: bool = True,
) -> Facts:
    score = trigger.score
    contracts = (
        list(repository.customer_contracts(session, trigger.tenant_id, trigger.customer_id))
        if state is not None and with_contracts
        else []
    )
    days_to_end, auto_renew, notice = contract_facts(contracts, now.date())
    if trigger.contract is not None and trigger.contract.end_date is not None:
        days_to_end = float((trigger.contract.end_date - now.date()).days)
        auto_renew = trigger.contract.auto_renew
    elif days_to_end is None and score is not None and score.features.get("has_contract"):
        # scoring knows a contract actions has not seen (yet): use the score's view
        days_to_end = score.features.get("days_to_contract_end")
        notice = notice or bool(score.features.get("cancellation_notice_given"))
    return Facts(
        trigger=trigger.trigger,
        now=now,
        probability=score.probability if score else (state.last_probability if state else None),
        band=score.band if score else (state.last_band if state else None),
        previous_probability=state.last_probability if state and score else None,
        segment=state.segment if state else None,
        customer_value=customer_value(state, score.features if score else None),
        loyalty_tier=state.loyalty_tier if state else None,
        days_to_contract_end=days_to_end,
        auto_renew=auto_renew,
        cancellation_notice=notice,
        last_complaint_at=state.last_complaint_at if state else None,
        last_nps=state.last_nps if state else None,
        last_csat=state.last_csat if state else None,
        attributes=(state.attributes or {}) if state else {},
        contract_offset=trigger.contract_offset,
    )


def _guardrail(
    session: Session,
    trigger: TriggerInput,
    state: ActionsCustomer | None,
    facts: Facts,
    policy: Policy,
    offer: Offer,
    document: PolicyDocument,
    rules: Rules,
    now: datetime,
) -> str:
    """MATCHED when the offer may be sent, else the first guardrail that stops it."""
    tenant, customer = trigger.tenant_id, trigger.customer_id
    if not offer.service:
        consent = state.marketing_consent if state else None
        if consent is False or (consent is None and rules.consent_required):
            return CONSENT
    last_of_policy, last_marketing = repository.last_offers(session, tenant, customer, policy.name)
    if in_cooldown(last_of_policy, now, timedelta(days=policy.cooldown_days)):
        return COOLDOWN
    if (
        not offer.service
        and policy.respect_customer_cooldown
        and in_cooldown(last_marketing, now, timedelta(days=document.customer_cooldown_days))
    ):
        return COOLDOWN
    if policy.budget is not None:
        used_count, used_cost = repository.budget_used(
            session, tenant, policy.name, period_start(now, policy.budget.period)
        )
        if not within_budget(policy.budget, used_count, used_cost, offer.cost):
            return BUDGET
    if policy.value_gate is not None and not passes_value_gate(
        facts.probability, facts.customer_value, policy.value_gate, offer
    ):
        return VALUE_GATE
    if in_holdout(tenant, customer, rules.holdout_salt, rules.holdout_percent):
        return HOLDOUT
    return MATCHED


def _create_offer(
    session: Session,
    trigger: TriggerInput,
    decision: ActionsDecision,
    policy: Policy,
    spec: Offer,
    now: datetime,
) -> ActionsOffer:
    offer = ActionsOffer(
        offer_id=new_id(),
        tenant_id=trigger.tenant_id,
        customer_id=trigger.customer_id,
        policy=policy.name,
        kind=spec.kind,
        discount_percent=spec.discount_percent,
        valid_until=now + timedelta(days=spec.validity_days),
        churn_probability=decision.churn_probability,
        band=decision.band,
        model_version=decision.model_version,
        score_id=trigger.trigger_id,
        created_at=now,
        trigger=trigger.trigger,
        offer_key=policy.offer,
        service=spec.service,
        cost=spec.cost,
        details=spec.details(),
    )
    session.add(offer)
    session.flush()  # the outbox rows reference the offer
    return offer


def _remember_score(state: ActionsCustomer, score: ScoreRecord) -> None:
    """Keep the latest score (by scored_at) for score-change conditions and later triggers."""
    if state.last_scored_at is not None and score.scored_at < state.last_scored_at:
        return
    state.last_score_id = score.score_id
    state.last_probability = score.probability
    state.last_band = score.band
    state.last_model_version = score.model_version
    state.last_scored_at = score.scored_at
    if "spend_365d" in score.features:
        state.spend_365d = float(score.features["spend_365d"])


def mark_erased(session: Session, tenant_id: str, customer_id: str, now: datetime) -> None:
    """Erase everything actions keeps about a customer (GDPR Art. 17): state, contracts,
    activity days, offer responses, offers, decisions and their webhook deliveries. The customer
    row stays as the tombstone (erased_at): the customer is never targeted again and never
    rebuilt from later events. Idempotent: erasing twice deletes nothing more."""
    repository.mark_erased(session, tenant_id, customer_id, now)


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
            "trigger": offer.trigger,
            "service": offer.service,
            "offer": dict(offer.details or {}),
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
        trigger=decision.trigger,  # type: ignore[arg-type]
        offer_kind=decision.offer_kind,
        service=decision.service,
        churn_probability=decision.churn_probability,
        band=decision.band,  # type: ignore[arg-type]
    )


def list_offers(
    session: Session, tenant_id: str, customer_id: str, limit: int = 100
) -> Sequence[ActionsOffer]:
    return repository.list_offers(session, tenant_id, customer_id, limit)


def list_decisions(
    session: Session, tenant_id: str, customer_id: str, limit: int = 100
) -> Sequence[ActionsDecision]:
    return repository.list_decisions(session, tenant_id, customer_id, limit)
