"""Scoring's Prometheus objects (process-global; HTTP metrics come from shared.metrics)."""

from __future__ import annotations

import math
import weakref
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import ConsumerMetrics

CONSUMER = ConsumerMetrics("scoring")

EVENTS_PROCESSED = Counter(
    "churnguard_scoring_events_processed_total",
    "Customer events consumed and scored (duplicates included), by event type.",
    ["type"],
)
EVENTS_DUPLICATE = Counter(
    "churnguard_scoring_events_duplicate_total",
    "Consumed events whose id was already stored for the tenant (redelivery or resent id).",
)
SCORES_PUBLISHED = Counter(
    "churnguard_scoring_scores_published_total",
    "Scores published on churn-scores, by risk band.",
    ["band"],
)
SCORING_LATENCY = Histogram(
    "churnguard_scoring_latency_seconds",
    "Per batch: loading history, computing features and predicting.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
EXPLAIN_SECONDS = Histogram(
    "churnguard_scoring_explain_seconds",
    "Per batch: computing the top reasons of each score (one predict_proba over rows x features).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SCORE = Histogram(
    "churnguard_scoring_score",
    "Distribution of churn probabilities produced.",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
)
ACTIVE_MODEL_INFO = Gauge(
    "churnguard_scoring_active_model_info",
    "1 for the model version this process scores with.",
    ["version"],
)
ACTIVE_MODEL_ROC_AUC = Gauge(
    "churnguard_scoring_active_model_roc_auc",
    "Holdout ROC AUC of the active model, as recorded when it was trained.",
)
ACTIVE_MODEL_TRAINED = Gauge(
    "churnguard_scoring_active_model_trained_timestamp_seconds",
    "When the active model was trained (Unix time): alert when it gets old.",
)
SCORE_DRIFT = Gauge(
    "churnguard_scoring_score_drift",
    "Population stability index of this process's latest event scores against the active model's "
    "validation scores (NaN until 200 scores; > 0.2: significant shift).",
)


def watch_score_drift(consumer: weakref.ref[Any]) -> None:
    """SCORE_DRIFT reads the consumer's `drift` when /metrics is scraped (a PSI per batch cost
    the event loop ~0.1 ms per poll); NaN once the consumer is gone (weak: the gauge does not
    keep it alive)."""

    def value() -> float:
        live = consumer()
        return live.drift.value() if live is not None else math.nan

    SCORE_DRIFT.set_function(value)


DEAD_LETTERS = Counter(
    "churnguard_scoring_dead_letters_total",
    "Records sent to customer-events.dlq, by reason (undecodable, unprocessable).",
    ["reason"],
)

EVENTS_FLAGGED = Counter(
    "churnguard_scoring_events_flagged_total",
    "Stored events whose data features cannot (fully) use, by reason (currency, contract_dates).",
    ["reason"],
)
SWEEP_RESCORED = Counter(
    "churnguard_scoring_sweep_rescored_total",
    "Customers re-scored by the periodic sweep (time alone moves risk).",
)
SWEEP_PUBLISHED = Counter(
    "churnguard_scoring_sweep_published_total",
    "Sweep scores published: the probability moved by more than the delta, or crossed a band.",
)
SWEEP_ROUNDS = Counter(
    "churnguard_scoring_sweep_rounds_total",
    "Sweep rounds, by outcome (done, skipped: another instance holds the lease or no model, failed).",
    ["outcome"],
)


def set_active_model(version: str, roc_auc: float, trained_at: datetime | None) -> None:
    ACTIVE_MODEL_INFO.clear()
    ACTIVE_MODEL_INFO.labels(version).set(1)
    ACTIVE_MODEL_ROC_AUC.set(roc_auc)
    ACTIVE_MODEL_TRAINED.set(trained_at.timestamp() if trained_at else math.nan)
    SCORE_DRIFT.set(math.nan)


def dead_lettered(_topic: str, reason: str) -> None:
    DEAD_LETTERS.labels(reason).inc()
ERASURES = Counter(
    "churnguard_scoring_erasures_total",
    "Erasure control records handled (a redelivered one counts again; deleting twice changes nothing).",
)
EVENTS_SUPPRESSED = Counter(
    "churnguard_scoring_events_suppressed_total",
    "Consumed events of erased customers: neither stored nor scored.",
)
HISTORY_PURGED = Counter(
    "churnguard_scoring_history_purged_events_total",
    "Raw events deleted by the retention job (older than the tenant's retention period).",
)
RETENTION_ROUNDS = Counter(
    "churnguard_scoring_retention_rounds_total",
    "Retention job rounds by outcome (done, skipped: lease held elsewhere, failed).",
    ["outcome"],
)

HISTORY_CACHE_CUSTOMERS = Gauge(
    "churnguard_scoring_history_cache_customers", "Customer histories the consumer keeps in memory"
)
HISTORY_CACHE_EVENTS = Gauge(
    "churnguard_scoring_history_cache_events", "Events in the consumer's in-memory customer histories"
)
HISTORY_CACHE_LOOKUPS = Counter(
    "churnguard_scoring_history_cache_lookups_total",
    "Customer history lookups of the consumer: hit (in memory) or miss (read from the database)",
    ["outcome"],
)


def set_history_cache(cache: Any) -> None:
    """Gauges and lookup counters from a services.scoring.history_cache.HistoryCache."""
    HISTORY_CACHE_CUSTOMERS.set(cache.customers)
    HISTORY_CACHE_EVENTS.set(cache.events)
    hits, misses = cache.take_lookups()
    HISTORY_CACHE_LOOKUPS.labels("hit").inc(hits)
    HISTORY_CACHE_LOOKUPS.labels("miss").inc(misses)
