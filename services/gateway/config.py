from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import DatabaseSettings, InternalAuthSettings


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHURNGUARD_GATEWAY_", extra="ignore")

    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    internal: InternalAuthSettings = Field(default_factory=InternalAuthSettings)
    port: int = 8000
    ingest_url: str = "http://127.0.0.1:8001"
    scoring_url: str = "http://127.0.0.1:8002"
    actions_url: str = "http://127.0.0.1:8003"
    max_body_bytes: int = Field(1024 * 1024, gt=0, description="Largest request body proxied.")
    # Upper bound for one upstream call, connect to last byte; past it the client gets 504.
    upstream_timeout_s: float = Field(10.0, gt=0)
    # Connections the gateway keeps to its upstreams, all of them together; more callers wait.
    upstream_max_connections: int = Field(200, gt=0)
    # The merged OpenAPI is re-fetched from the services at most this often.
    auth_cache_s: float = Field(
        2.0, ge=0,
        description="How long a gateway process remembers a checked API key (0: ask the database "
        "on every request). A key revoked elsewhere keeps working here for at most this long.",
    )
    openapi_cache_s: float = Field(30.0, ge=0)

    @field_validator("ingest_url", "scoring_url", "actions_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// base URL")
        return value.rstrip("/")

    def upstreams(self) -> dict[str, str]:
        """Upstream name -> base URL (the names used by the route table and in metrics)."""
        return {"ingest": self.ingest_url, "scoring": self.scoring_url, "actions": self.actions_url}
