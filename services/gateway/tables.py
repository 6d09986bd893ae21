"""The gateway's own tables: tenants (with their rate limit, if not the default), their API keys
(stored only as a hash, with scopes) and the audit log of admin actions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime


def _timestamp(nullable: bool = False, index: bool = False) -> Column:  # type: ignore[type-arg]
    return Column(UtcDateTime, nullable=nullable, index=index)


class GatewayTenant(SQLModel, table=True):
    __tablename__ = "gateway_tenants"

    id: str = Field(primary_key=True, max_length=64)  # t_<hex>
    name: str = Field(unique=True, index=True, max_length=200)
    created_at: datetime = Field(sa_column=_timestamp())
    # Both set, or both unset (= the gateway's default from its settings).
    rate_limit_per_s: float | None = Field(default=None)
    rate_limit_burst: int | None = Field(default=None)


class GatewayApiKey(SQLModel, table=True):
    __tablename__ = "gateway_api_keys"

    id: str = Field(primary_key=True, max_length=64)  # k_<hex>
    tenant_id: str = Field(foreign_key="gateway_tenants.id", index=True, max_length=64)
    prefix: str = Field(max_length=16, description="The key's first characters, for humans.")
    key_hash: str = Field(
        unique=True, index=True, max_length=64, description="sha256 hex of the key."
    )
    # Space-separated; keys issued without a choice (CLI, `make run`) get every tenant scope.
    scopes: str = Field(max_length=200)
    created_at: datetime = Field(sa_column=_timestamp())
    last_used_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=True))
    # A key rotated with an overlap keeps working next to its successor until then.
    expires_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=True))


class GatewayAuditEntry(SQLModel, table=True):
    __tablename__ = "gateway_audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=_timestamp(index=True))
    actor: str = Field(max_length=64, description='The admin key id, or "bootstrap".')
    action: str = Field(max_length=64)
    target: str = Field(max_length=64, description="The tenant or key acted on.")
    tenant_id: str | None = Field(default=None, index=True, max_length=64)
    detail: str = Field(default="{}", sa_column=Column(Text, nullable=False),
                        description="JSON: what changed (never a key or its hash).")


TABLES = (GatewayTenant, GatewayApiKey, GatewayAuditEntry)
