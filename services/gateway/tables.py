"""The gateway's own tables: tenants and their API keys (stored only as a hash)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime


def _timestamp(nullable: bool = False) -> Column:  # type: ignore[type-arg]
    return Column(UtcDateTime, nullable=nullable)


class GatewayTenant(SQLModel, table=True):
    __tablename__ = "gateway_tenants"

    id: str = Field(primary_key=True, max_length=64)  # t_<hex>
    name: str = Field(unique=True, index=True, max_length=200)
    created_at: datetime = Field(sa_column=_timestamp())


class GatewayApiKey(SQLModel, table=True):
    __tablename__ = "gateway_api_keys"

    id: str = Field(primary_key=True, max_length=64)  # k_<hex>
    tenant_id: str = Field(foreign_key="gateway_tenants.id", index=True, max_length=64)
    prefix: str = Field(max_length=16, description="The key's first characters, for humans.")
    key_hash: str = Field(
        unique=True, index=True, max_length=64, description="sha256 hex of the key."
    )
    created_at: datetime = Field(sa_column=_timestamp())
    last_used_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=_timestamp(nullable=True))


TABLES = (GatewayTenant, GatewayApiKey)
