from prometheus_client import Counter, Histogram

from shared.metrics import LATENCY_BUCKETS

EVENTS_ACCEPTED = Counter(
    "churnguard_ingest_events_accepted_total",
    "Events the broker acknowledged, by event type.",
    ["type"],
)
EVENTS_REJECTED = Counter(
    "churnguard_ingest_events_rejected_total",
    "Events refused before publishing, by reason.",
    ["reason"],
)
PUBLISH_DURATION = Histogram(
    "churnguard_ingest_publish_duration_seconds",
    "Time from handing events to the producer until the broker acknowledged them.",
    buckets=LATENCY_BUCKETS,
)
BROKER_UNAVAILABLE = Counter(
    "churnguard_ingest_broker_unavailable_total",
    "Requests answered 503 because the broker did not acknowledge in time.",
)
EVENTS_DUPLICATE = Counter(
    "churnguard_ingest_events_duplicate_total",
    "Events not published again because this tenant already sent their id.",
)
DEDUP_UNAVAILABLE = Counter(
    "churnguard_ingest_dedup_unavailable_total",
    "Times the event id table could not be read or written (events were still published).",
)
SOURCE_WEBHOOKS = Counter(
    "churnguard_ingest_source_webhooks_total",
    "Webhooks of upstream sources (services/ingest/sources), by source and outcome.",
    ["source", "outcome"],
)
EVENTS_SUPPRESSED = Counter(
    "churnguard_ingest_events_suppressed_total",
    "Valid events of erased customers: answered 202 (counted as suppressed), not published.",
)
ERASURES_REQUESTED = Counter(
    "churnguard_ingest_erasures_requested_total",
    "Erasure requests (DELETE /v1/customers/{id}), by outcome: created, repeated (the customer's "
    "erasure existed already), broker_unavailable (recorded; the control record is re-sent on retry).",
    ["outcome"],
)
ERASURES_COMPLETED = Counter(
    "churnguard_ingest_erasures_completed_total",
    "Erasures that every service has reported done.",
)
