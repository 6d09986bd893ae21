from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
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
    join_events: bool = Field(
        True,
        description="Single events (POST /v1/events) of one tenant that arrive while earlier ones "
        "are on their way to ingest go with the next in one request; each caller still gets its "
        "own answer. false: one request to ingest per event.",
    )
    auth_cache_s: float = Field(
        2.0, ge=0,
        description="How long a gateway process remembers a checked API key (0: ask the database "
        "on every request). A key revoked elsewhere keeps working here for at most this long.",
    )
    # The merged OpenAPI is re-fetched from the services at most this often.
    openapi_cache_s: float = Field(30.0, ge=0)
    admin_key: SecretStr | None = Field(
        None,
        description="Bootstraps the admin API (/v1/admin/...): whoever presents it may create "
        "tenants and keys. Unset: no admin API. At least 32 characters.",
    )
    rate_limit_per_s: float = Field(
        200.0, ge=0, le=100_000,
        description="Default requests per second per API key (token bucket refill rate), per "
        "gateway process; 0: no limit. A tenant's own limit is set through the admin API.",
    )
    rate_limit_burst: int = Field(
        400, gt=0, le=1_000_000, description="Default bucket size: requests a key may send at once."
    )
    cors_origins: str = Field(
        "",
        description="Comma-separated origins allowed to call the API from a browser (CORS). "
        "Empty: no CORS headers at all.",
    )
    docs_enabled: bool = Field(
        True, description="Serve /docs and /openapi.json (the production overlay turns them off)."
    )

    @field_validator("admin_key")
    @classmethod
    def _long_admin_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 32:
            raise ValueError("the admin key must be at least 32 characters (e.g. openssl rand -hex 32)")
        return value

    @field_validator("rate_limit_per_s")
    @classmethod
    def _sensible_rate(cls, value: float) -> float:
        if 0 < value < 0.01:
            raise ValueError("must be 0 (no limit) or at least 0.01 (one request per 100 s)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin {origin!r} must start with http:// or https://")
        return value

    def allowed_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @field_validator("ingest_url", "scoring_url", "actions_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// base URL")
        return value.rstrip("/")

    def upstreams(self) -> dict[str, str]:
        """Upstream name -> base URL (the names used by the route table and in metrics)."""
        return {"ingest": self.ingest_url, "scoring": self.scoring_url, "actions": self.actions_url}
