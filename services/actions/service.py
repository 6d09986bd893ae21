"""Business logic of the actions service. Imports neither fastapi nor aiokafka; the caller owns
the transaction (it passes a session from `shared.db.session_scope`) and the clock (`now`).

Webhook subscriptions, the outbox and deliveries live in `services.actions.webhooks`; the names
re-exported below keep older imports working."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm.attributes import set_committed_value
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
    ActionsDelivery,
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
    """Decide once per trigger (`decide_many` of one)."""
    return decide_many(session, [trigger], rules, now)[0]


def decide_many(
    session: Session,
    triggers: Sequence[ScoreRecord | TriggerInput],
    rules: Rules,
    now: datetime,
) -> list[DecisionResult]:
    """Decide once per trigger, in order: match the first policy, apply the guardrails, and
    create the offer and its outbox rows, or record why not. One result per trigger.

    Set-based: the customers are locked, and their earlier decisions, contracts and offer
    history, the budgets and the subscriptions are read, in a few queries for the whole batch;
    the batch's own offers count for the cooldowns and budgets of the triggers after them; the
    offers, outbox rows, decisions and customer scores are written together at the end (one
    statement on PostgreSQL: repository.write_rows).

    A trigger already decided (before, or earlier in this batch) returns the stored decision
    (so the caller may re-publish it) and writes nothing. The customer row locks serialise
    decisions about one customer across consumers; a policy's budget is read under a lock of
    its own (PostgreSQL advisory lock, until the commit), so two consumers never both spend its
    last unit; UNIQUE(tenant_id, score_id) backs the dedup up. An erased customer gets a
    "suppressed: erased" answer that is not stored (stored=False).
    """
    items = [score_trigger(t) if isinstance(t, ScoreRecord) else t for t in triggers]
    if not items:
        return []
    batch = _Batch.load(session, items, rules, now)
    results = [batch.decide(session, trigger) for trigger in items]
    batch.write(session)
    return results


@dataclass
class _Batch:
    """What one batch of decisions reads once, and keeps current as it decides. The offer
    history, budgets and subscriptions are read when the first trigger needs them (for the
    whole batch at once): a batch in which no policy matches reads none of them."""

    now: datetime
    rules: Rules
    items: Sequence[TriggerInput]
    states: dict[tuple[str, str], ActionsCustomer]
    existing: dict[tuple[str, str], ActionsDecision]
    documents: dict[str, PolicyDocument]
    contracts: dict[tuple[str, str], list[ActionsContract]]
    # per customer: {(policy, service): when its latest offer was created}
    history: dict[tuple[str, str], dict[tuple[str, bool], datetime]] | None = None
    # per (tenant, policy): [offers this period, their summed cost]
    budgets: dict[tuple[str, str], list[float]] | None = None
    subscriptions: dict[str, list[str]] = field(default_factory=dict)  # per tenant: subscription ids
    decided: dict[tuple[str, str], ActionRecord] = field(default_factory=dict)
    scored: dict[tuple[str, str], ActionsCustomer] = field(default_factory=dict)
    offers: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(
        cls, session: Session, items: Sequence[TriggerInput], rules: Rules, now: datetime
    ) -> _Batch:
        keys = sorted({(t.tenant_id, t.customer_id) for t in items})
        states = repository.lock_customers(session, keys)
        tenants = sorted({t.tenant_id for t in items})
        existing = repository.decisions_by_trigger(
            session, sorted({(t.tenant_id, t.trigger_id) for t in items})
        )
        documents = {tenant: policy_document(session, tenant, rules) for tenant in tenants}
        live = [t for t in items if states[(t.tenant_id, t.customer_id)].erased_at is None
                and (t.tenant_id, t.trigger_id) not in existing]
        contracts = repository.contracts_of_customers(session, sorted({
            (t.tenant_id, t.customer_id) for t in live if _needs_contracts(documents[t.tenant_id], t)
        }))
        return cls(now, rules, live, states, existing, documents, contracts)

    def _history(self, session: Session) -> dict[tuple[str, str], dict[tuple[str, bool], datetime]]:
        if self.history is None:
            self.history = repository.offer_history(
                session, sorted({(t.tenant_id, t.customer_id) for t in self.items})
            )
        return self.history

    def _budgets(self, session: Session) -> dict[tuple[str, str], list[float]]:
        """Every budget a trigger of this batch may spend, locked in key order (no deadlock
        between two consumers) and read under the lock."""
        if self.budgets is None:
            wanted: dict[tuple[str, str], Policy] = {}
            for t in self.items:
                for policy in self.documents[t.tenant_id].ordered():
                    if policy.budget is not None and t.trigger in policy.triggers:
                        wanted[(t.tenant_id, policy.name)] = policy
            repository.lock_budgets(session, sorted(wanted))
            self.budgets = {}
            for (tenant, name), policy in sorted(wanted.items()):
                assert policy.budget is not None
                count, cost = repository.budget_used(
                    session, tenant, name, period_start(self.now, policy.budget.period)
                )
                self.budgets[(tenant, name)] = [float(count), cost]
        return self.budgets

    def decide(self, session: Session, trigger: TriggerInput) -> DecisionResult:
        now, tenant, customer = self.now, trigger.tenant_id, trigger.customer_id
        key = (tenant, trigger.trigger_id)
        if key in self.existing:
            return DecisionResult(action_record(self.existing[key]), created=False, deliveries=0)
        if key in self.decided:  # the same trigger twice in one batch
            return DecisionResult(self.decided[key], created=False, deliveries=0)
        state = self.states[(tenant, customer)]
        if state.erased_at is not None:
            return DecisionResult(ActionRecord(
                decision_id=new_id(), tenant_id=tenant, score_id=trigger.trigger_id,
                customer_id=customer, trigger=trigger.trigger,  # type: ignore[arg-type]
                outcome=SUPPRESSED, reason=ERASED, decided_at=now,  # type: ignore[arg-type]
            ), created=False, deliveries=0, stored=False)
        document = self.documents[tenant]
        facts = _facts(trigger, state, now, self.contracts.get((tenant, customer), []))
        decision: dict[str, Any] = {
            "decision_id": new_id(),
            "tenant_id": tenant,
            "score_id": trigger.trigger_id,
            "customer_id": customer,
            "trigger": trigger.trigger,
            "policy": None,
            "outcome": SUPPRESSED,
            "reason": NO_MATCH,
            "offer_id": None,
            "offer_key": None,
            "offer_kind": None,
            "service": None,
            "offer_cost": None,
            "customer_value": facts.customer_value,
            "churn_probability": facts.probability,
            "band": facts.band,
            "model_version": trigger.score.model_version if trigger.score else state.last_model_version,
            "decided_at": now,
        }
        deliveries = 0
        policy = first_match(document.ordered(), facts)
        if policy is not None:
            offer_spec = document.offers[policy.offer]
            decision["policy"] = policy.name
            decision["offer_key"] = policy.offer
            decision["offer_kind"] = offer_spec.kind
            decision["service"] = offer_spec.service
            decision["offer_cost"] = offer_spec.cost
            decision["reason"] = self._guardrail(
                session, trigger, state, facts, policy, offer_spec, document
            )
            if decision["reason"] == MATCHED:
                offer = _offer_row(trigger, decision, policy, offer_spec, now)
                self.offers.append(offer)
                decision["outcome"] = OFFER_CREATED
                decision["offer_id"] = offer["offer_id"]
                self._history(session).setdefault((tenant, customer), {})[
                    (policy.name, offer_spec.service)
                ] = now
                if policy.budget is not None:
                    used = self._budgets(session)[(tenant, policy.name)]
                    used[0] += 1
                    used[1] += offer_spec.cost
                reasons = trigger.score.reasons if trigger.score else ()
                deliveries = self._enqueue_webhooks(session, offer, reasons)
        if trigger.score is not None and _remember_score(state, trigger.score, committed=True):
            self.scored[(tenant, customer)] = state
        self.decisions.append(decision)
        record = _record(decision)
        self.decided[key] = record
        return DecisionResult(record, created=True, deliveries=deliveries)

    def _guardrail(
        self,
        session: Session,
        trigger: TriggerInput,
        state: ActionsCustomer,
        facts: Facts,
        policy: Policy,
        offer: Offer,
        document: PolicyDocument,
    ) -> str:
        """MATCHED when the offer may be sent, else the first guardrail that stops it."""
        now, rules = self.now, self.rules
        tenant, customer = trigger.tenant_id, trigger.customer_id
        if not offer.service:
            consent = state.marketing_consent
            if consent is False or (consent is None and rules.consent_required):
                return CONSENT
        history = self._history(session).get((tenant, customer), {})
        last_of_policy = max(
            (at for (name, _), at in history.items() if name == policy.name), default=None
        )
        if in_cooldown(last_of_policy, now, timedelta(days=policy.cooldown_days)):
            return COOLDOWN
        if not offer.service and policy.respect_customer_cooldown:
            last_marketing = max(
                (at for (_, service), at in history.items() if not service), default=None
            )
            if in_cooldown(last_marketing, now, timedelta(days=document.customer_cooldown_days)):
                return COOLDOWN
        if policy.budget is not None:
            used_count, used_cost = self._budgets(session)[(tenant, policy.name)]
            if not within_budget(policy.budget, int(used_count), used_cost, offer.cost):
                return BUDGET
        if policy.value_gate is not None and not passes_value_gate(
            facts.probability, facts.customer_value, policy.value_gate, offer
        ):
            return VALUE_GATE
        if in_holdout(tenant, customer, rules.holdout_salt, rules.holdout_percent):
            return HOLDOUT
        return MATCHED

    def _enqueue_webhooks(
        self, session: Session, offer: dict[str, Any], reasons: Sequence[str]
    ) -> int:
        """The offer's outbox rows (one per subscribed endpoint), in the decision's transaction;
        the tenant's subscriptions are read once per batch."""
        tenant = offer["tenant_id"]
        if tenant not in self.subscriptions:
            self.subscriptions[tenant] = webhooks.subscribers(session, tenant, OFFER_CREATED_EVENT)
        payload = _payload(offer, reasons)
        for subscription_id in self.subscriptions[tenant]:
            self.deliveries.append(webhooks.outbox_row(
                subscription_id, tenant_id=tenant, offer_id=offer["offer_id"], payload=payload,
                now=self.now, event_type=OFFER_CREATED_EVENT,
            ))
        return len(self.subscriptions[tenant])

    def write(self, session: Session) -> None:
        """Offers, outbox rows (they reference the offers) and decisions, and the customers'
        latest scores: one statement on PostgreSQL (repository.write_rows)."""
        repository.write_rows(
            session,
            [(ActionsOffer, self.offers), (ActionsDelivery, self.deliveries), (ActionsDecision, self.decisions)],
            [(ActionsCustomer, [
                {"tenant_id": state.tenant_id, "customer_id": state.customer_id,
                 **{name: getattr(state, name) for name in _SCORE_COLUMNS}}
                for _, state in sorted(self.scored.items())
            ])],
        )


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
    trigger: TriggerInput,
    state: ActionsCustomer | None,
    now: datetime,
    contracts: list[ActionsContract],
) -> Facts:
    score = trigger.score
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


def _offer_row(
    trigger: TriggerInput,
    decision: dict[str, Any],
    policy: Policy,
    spec: Offer,
    now: datetime,
) -> dict[str, Any]:
    return {
        "offer_id": new_id(),
        "tenant_id": trigger.tenant_id,
        "customer_id": trigger.customer_id,
        "policy": policy.name,
        "kind": spec.kind,
        "discount_percent": spec.discount_percent,
        "valid_until": now + timedelta(days=spec.validity_days),
        "churn_probability": decision["churn_probability"],
        "band": decision["band"],
        "model_version": decision["model_version"],
        "score_id": trigger.trigger_id,
        "created_at": now,
        "trigger": trigger.trigger,
        "offer_key": policy.offer,
        "service": spec.service,
        "cost": spec.cost,
        "details": spec.details(),
    }


_SCORE_COLUMNS = (
    "last_score_id", "last_probability", "last_band", "last_model_version", "last_scored_at",
    "spend_365d",
)


def _remember_score(state: ActionsCustomer, score: ScoreRecord, committed: bool = False) -> bool:
    """Keep the latest score (by scored_at) for score-change conditions and later triggers.
    Returns whether it changed the state. `committed`: set the values without marking them for
    the ORM's flush (the caller writes them itself, in one statement for the batch)."""
    if state.last_scored_at is not None and score.scored_at < state.last_scored_at:
        return False
    values: dict[str, object] = {
        "last_score_id": score.score_id,
        "last_probability": score.probability,
        "last_band": score.band,
        "last_model_version": score.model_version,
        "last_scored_at": score.scored_at,
    }
    if "spend_365d" in score.features:
        values["spend_365d"] = float(score.features["spend_365d"])
    for name, value in values.items():
        if committed:
            set_committed_value(state, name, value)
        else:
            setattr(state, name, value)
    return True


def mark_erased(session: Session, tenant_id: str, customer_id: str, now: datetime) -> None:
    """Erase everything actions keeps about a customer (GDPR Art. 17): state, contracts,
    activity days, offer responses, offers, decisions and their webhook deliveries. The customer
    row stays as the tombstone (erased_at): the customer is never targeted again and never
    rebuilt from later events. Idempotent: erasing twice deletes nothing more."""
    repository.mark_erased(session, tenant_id, customer_id, now)


def offer_payload(offer: ActionsOffer, reasons: Sequence[str] = ()) -> str:
    """The webhook body: what the receiver needs to deliver the offer, and nothing else
    (no tenant id, no secrets). Stored as text so every retry signs the same bytes.
    `reasons` are the score's plain-language reasons (ScoreRecord.reasons), copied so the
    marketing tool can personalise the offer."""
    return _payload({name: getattr(offer, name) for name in _PAYLOAD_FIELDS}, reasons)


_PAYLOAD_FIELDS = (
    "created_at", "offer_id", "customer_id", "kind", "discount_percent", "valid_until", "policy",
    "churn_probability", "band", "model_version", "trigger", "service", "details",
)


def _payload(offer: Mapping[str, Any], reasons: Sequence[str] = ()) -> str:
    body = {
        "type": OFFER_CREATED_EVENT,
        "timestamp": offer["created_at"].isoformat(),
        "data": {
            "offer_id": offer["offer_id"],
            "customer_id": offer["customer_id"],
            "kind": offer["kind"],
            "discount_percent": offer["discount_percent"],
            "valid_until": offer["valid_until"].isoformat(),
            "policy": offer["policy"],
            "churn_probability": offer["churn_probability"],
            "band": offer["band"],
            "model_version": offer["model_version"],
            "reasons": list(reasons),
            "trigger": offer["trigger"],
            "service": offer["service"],
            "offer": dict(offer["details"] or {}),
        },
    }
    return json.dumps(body, separators=(",", ":"))


_RECORD_FIELDS = (
    "decision_id", "tenant_id", "customer_id", "score_id", "outcome", "reason", "policy",
    "offer_id", "decided_at", "trigger", "offer_kind", "service", "churn_probability", "band",
)


def _record(decision: Mapping[str, Any]) -> ActionRecord:
    return ActionRecord(**{name: decision[name] for name in _RECORD_FIELDS})


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
