"""Scoring settings (env prefix CHURNGUARD_SCORING_); composes the shared Kafka/DB/internal ones."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_SCORING_", extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    internal: InternalAuthSettings = Field(default_factory=InternalAuthSettings)

    group_id: str = "scoring"
    client_id: str = "scoring"
    high_threshold: float = Field(0.5, gt=0.0, le=1.0, description="probability >= this is band 'high'")
    medium_threshold: float = Field(0.2, ge=0.0, lt=1.0, description="probability >= this is band 'medium'")
    model_refresh_s: float = Field(10.0, gt=0.0, description="how often the model registry is re-read")
    sweep_enabled: bool = Field(True, description="run the periodic re-score sweep in this instance")
    sweep_interval_s: float = Field(
        3600.0, gt=0.0, description="how often time-driven risk (inactivity, contract end) is re-scored"
    )
    sweep_delta: float = Field(
        0.05, ge=0.0, le=1.0, description="publish a sweep score only when the probability moved by more than this"
    )
    sweep_batch: int = Field(500, ge=1, le=5000, description="customers per sweep transaction")
    history_retention_days: int = Field(
        730, ge=1, le=36500, description="raw events that occurred longer ago than this are purged (per tenant: "
        "history_retention_overrides)"
    )
    history_retention_overrides: dict[str, int] = Field(
        default_factory=dict,
        description='per-tenant retention in days, JSON, e.g. {"t_1a2b": 365}; tenants not listed use '
        "history_retention_days",
    )
    retention_enabled: bool = Field(True, description="run the history retention job in this instance")
    retention_interval_s: float = Field(21600.0, gt=0.0, description="how often the retention job runs")
    history_cache_events: int = Field(
        # A 10-minute soak of new customers grew scoring from 226 MB to 263 MB with 50,000 and to
        # 254 MB with 20,000 (the 250 MB goal); 10,000 leaves room for the rest of the process.
        10_000, ge=0, description="customer histories kept in memory by the consumer, at most this many events "
        "in all (services.scoring.history_cache); 0 turns the cache off; about 1-1.2 KB of memory each"
    )
    max_poll_records: int = Field(
        2000, ge=1, le=100_000, description="records one fetch may return (all partitions together); they are "
        "stored and scored in one transaction, one model call. Larger polls cost less CPU per event in a backlog "
        "(2,000 against 1,000: 22-29% less in the scoring bench) and more resident memory (about 20 MB more at "
        "peak); at steady rates below the instance's capacity polls are smaller than this anyway"
    )
    port: int = 8002
    # The registry is shared by every tenant: only these tenants may promote or roll back.
    model_admin_tenants: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _retention_overrides_valid(self) -> "ScoringSettings":
        for tenant, days in self.history_retention_overrides.items():
            if not 1 <= days <= 36500:
                raise ValueError(
                    f"history_retention_overrides[{tenant!r}]: {days} days is outside 1..36500"
                )
        return self

    def retention_days(self, tenant_id: str) -> int:
        return self.history_retention_overrides.get(tenant_id, self.history_retention_days)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "ScoringSettings":
        if self.medium_threshold >= self.high_threshold:
            raise ValueError("medium_threshold must be below high_threshold")
        return self

    @property
    def database_url(self) -> str:
        return self.database.url_for("scoring")
