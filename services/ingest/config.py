from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import DatabaseSettings, InternalAuthSettings, KafkaSettings


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_INGEST_", extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    internal: InternalAuthSettings = Field(default_factory=InternalAuthSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    port: int = 8001
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 512 * 1024
    max_batch_events: int = 500
    # Upstream sources' webhooks (a Shopify order with many line items is large).
    max_source_bytes: int = 256 * 1024
    # Upper bound for one publish; past it the client gets 503 + Retry-After, never a hang.
    publish_timeout_s: float = 5.0
    retry_after_s: int = 2
    # Erasure: how often each instance re-reads the erased customers it suppresses (the instance
    # taking a DELETE knows at once; scoring and actions suppress on their own tombstones anyway).
    erasure_refresh_s: float = Field(5.0, gt=0.0)
