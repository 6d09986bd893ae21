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
    port: int = 8002

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "ScoringSettings":
        if self.medium_threshold >= self.high_threshold:
            raise ValueError("medium_threshold must be below high_threshold")
        return self

    @property
    def database_url(self) -> str:
        return self.database.url_for("scoring")
