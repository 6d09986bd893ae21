"""Settings of the actions service (env prefix CHURNGUARD_ACTIONS_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveFloat
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings

# Standard Webhooks / Svix-like schedule after the first attempt: 5 s, 5 min, 30 min, 2 h,
# 5 h, 10 h, 10 h -- about 27.6 h in total, so a receiver may be down for more than a day.
# Shipped inside the package (package data), so an installed copy finds it as a checkout does.
DEFAULT_POLICIES_FILE = Path(__file__).resolve().parent / "default_policies.yaml"
DEFAULT_RETRY_SCHEDULE_S = [5.0, 300.0, 1_800.0, 7_200.0, 18_000.0, 36_000.0, 36_000.0]


class ActionsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_ACTIONS_", extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    internal: InternalAuthSettings = Field(default_factory=InternalAuthSettings)

    group_id: str = "actions"
    client_id: str = "actions"
    port: int = 8003

    # Policies: the default set (for tenants that defined none through the API).
    policies_file: Path = Field(
        DEFAULT_POLICIES_FILE,
        description="YAML policy document (offer catalog + policies); a bad file stops start-up.",
    )
    policy_cache_s: float = Field(
        5.0, ge=0, description="How long an instance reuses a tenant's policy document (0: never)."
    )
    consent_required: bool = Field(
        True,
        description="A customer with no consent event gets no marketing offer (EU opt-in); "
        "service messages are always allowed.",
    )
    holdout_percent: float = Field(
        10.0, ge=0.0, le=100.0, description="Share of customers in the control group."
    )
    holdout_salt: str = Field(
        "churnguard-holdout-v1", min_length=1, description="A new salt draws a new control group."
    )
    event_trigger_max_age_hours: float = Field(
        48.0, gt=0, description="Only events this recent trigger policies at once (not backfills)."
    )
    contract_sweep_enabled: bool = True
    contract_sweep_interval_s: float = Field(
        3_600.0, gt=0, description="How often the contract-end sweep runs (one instance at a time)."
    )
    contract_sweep_batch: int = Field(500, gt=0, le=10_000)
    uplift_horizon_days: int = Field(
        90, gt=0, le=3650, description="Churned = no renewal or no activity within this horizon."
    )

    # Webhook delivery (the outbox worker).
    delivery_poll_s: float = Field(
        1.0, gt=0, description="Poll interval when nothing wakes the worker."
    )
    delivery_batch_size: int = Field(
        200, gt=0, le=1_000, description="Most deliveries claimed per database round trip."
    )
    delivery_max_in_flight: int = Field(
        256, gt=0, le=10_000, description="Most webhook attempts in flight at once, all endpoints."
    )
    webhook_timeout_s: float = Field(15.0, gt=0, le=120, description="Timeout of one attempt.")
    retry_schedule_s: list[PositiveFloat] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE_S),
        min_length=1,
        description="Wait before each retry after a failed attempt; then the delivery is parked.",
    )
    retry_jitter: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Each retry waits its schedule step times 1 + U(0, jitter): upward only, so "
        "the schedule still spans at least its nominal length (about 27.6 h by default).",
    )
    retry_after_cap_s: float = Field(
        3_600.0, gt=0, description="Longest Retry-After (of a 429/503) that is honoured."
    )
    endpoint_concurrency: int = Field(
        8, gt=0, le=1_000, description="Most attempts in flight to one subscription's URL."
    )
    breaker_failure_threshold: int = Field(
        5, gt=0, description="Consecutive failed attempts that open an endpoint's circuit."
    )
    breaker_cooldown_s: float = Field(
        60.0, gt=0, description="How long an open circuit waits before one probe attempt."
    )
    secret_rotation_overlap_s: float = Field(
        86_400.0,
        ge=0,
        description="After a secret rotation, requests carry the old signature too for this long.",
    )
    webhook_allow_local_urls: bool = Field(
        False,
        description="Local development and tests only: allow http:// and loopback/private "
        "addresses as webhook URLs. Off: https only, public addresses only (SSRF guard).",
    )
