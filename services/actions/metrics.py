"""Prometheus objects of the actions service (process-global, low-cardinality labels only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import ConsumerMetrics

CONSUMER = ConsumerMetrics("actions")

DECISIONS = Counter(
    "churnguard_actions_decisions_total",
    "Decisions taken (every trigger), by policy (none when no policy matched), outcome and "
    "reason (matched, no_match, cooldown, consent, holdout, budget, value_gate, erased).",
    ["policy", "outcome", "reason"],
)
OFFERS_CREATED = Counter(
    "churnguard_actions_offers_created_total",
    "Retention offers created, by policy.",
    ["policy"],
)
WEBHOOK_ATTEMPTS = Counter(
    "churnguard_actions_webhook_attempts_total",
    "Webhook delivery attempts: delivered (2xx), failed (other status, retry scheduled), "
    "error (network error, timeout or SSRF refusal, retry scheduled), rate_limited (429/503, "
    "retry not before Retry-After), gone (410: subscription disabled), parked (retry schedule "
    "exhausted, or the subscription deleted or disabled).",
    ["outcome"],
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "churnguard_actions_webhook_delivery_seconds",
    "Duration of one webhook HTTP attempt.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
WEBHOOK_END_TO_END_SECONDS = Histogram(
    "churnguard_actions_webhook_end_to_end_seconds",
    "From the outbox row's creation (the decision) to its successful delivery, retries included.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3_600.0, 21_600.0, 86_400.0, 172_800.0),
)
OPEN_CIRCUITS = Gauge(
    "churnguard_actions_webhook_open_circuits",
    "Webhook endpoints whose circuit breaker is open or half-open (this worker's view).",
)
OUTBOX_DEPTH = Gauge(
    "churnguard_actions_outbox_depth",
    "Webhook deliveries pending (not yet delivered, not parked).",
)
PARKED_DELIVERIES = Gauge(
    "churnguard_actions_parked_deliveries",
    "Webhook deliveries parked after exhausting retries, waiting for a replay.",
)
DEAD_LETTERS = Counter(
    "churnguard_actions_dead_letters_total",
    "Records the actions consumer sent to a dead-letter topic, by reason.",
    ["reason"],
)
TRIGGERS = Counter(
    "churnguard_actions_triggers_total",
    "Decisions taken, by what triggered them (score, contract_end, cancellation, complaint, "
    "feedback).",
    ["trigger"],
)
CUSTOMER_EVENTS = Counter(
    "churnguard_actions_customer_events_total",
    "Customer events folded into the actions customer state, by event type.",
    ["type"],
)
CONTRACT_SWEEP_ROUNDS = Counter(
    "churnguard_actions_contract_sweep_rounds_total",
    "Contract-end sweep rounds, by outcome (done, skipped: lease held elsewhere, failed).",
    ["outcome"],
)

UPLIFT_CUSTOMERS = Gauge(
    "churnguard_actions_uplift_customers",
    "Customers whose decision's horizon is over, by policy and group (treated: got the offer; "
    "control: the holdout), all tenants; refreshed by the contract sweep.",
    ["policy", "group"],
)
UPLIFT_CHURNED = Gauge(
    "churnguard_actions_uplift_churned_customers",
    "Of those, the customers who churned within the horizon, by policy and group. Uplift = "
    "control churned / control customers - treated churned / treated customers.",
    ["policy", "group"],
)


def set_uplift(totals: dict[tuple[str, str], tuple[int, int]]) -> None:
    UPLIFT_CUSTOMERS.clear()
    UPLIFT_CHURNED.clear()
    for (policy, group), (customers, churned) in totals.items():
        UPLIFT_CUSTOMERS.labels(policy, group).set(customers)
        UPLIFT_CHURNED.labels(policy, group).set(churned)

ERASURES = Counter(
    "churnguard_actions_erasures_total",
    "Erasure control records handled (a redelivered one counts again; erasing twice deletes nothing more).",
)
ERASED_SUPPRESSED = Counter(
    "churnguard_actions_erased_suppressed_total",
    "Events (source=event) and decision triggers (source=trigger) of erased customers: nothing "
    "stored, nothing decided or published.",
    ["source"],
)
