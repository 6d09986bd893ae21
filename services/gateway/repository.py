"""All SQL of the gateway. Callers own the transaction (session_scope at the edge)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import update
from sqlmodel import Session, select

from services.gateway.tables import GatewayApiKey, GatewayTenant


def tenant_by_name(session: Session, name: str) -> GatewayTenant | None:
    return session.exec(select(GatewayTenant).where(GatewayTenant.name == name)).first()


def add_tenant(session: Session, tenant_id: str, name: str, now: datetime) -> GatewayTenant:
    tenant = GatewayTenant(id=tenant_id, name=name, created_at=now)
    session.add(tenant)
    session.flush()  # surface a duplicate name here, inside the caller's transaction
    return tenant


def add_key(
    session: Session, key_id: str, tenant_id: str, prefix: str, key_hash: str, now: datetime
) -> GatewayApiKey:
    key = GatewayApiKey(
        id=key_id, tenant_id=tenant_id, prefix=prefix, key_hash=key_hash, created_at=now
    )
    session.add(key)
    session.flush()
    return key


def key_by_hash(session: Session, key_hash: str) -> GatewayApiKey | None:
    """The one lookup that yields a tenant: the hash of the presented key is the credential."""
    return session.exec(select(GatewayApiKey).where(GatewayApiKey.key_hash == key_hash)).first()


def key_by_id(session: Session, key_id: str) -> GatewayApiKey | None:
    return session.get(GatewayApiKey, key_id)


def keys_of_tenant(session: Session, tenant_id: str) -> Sequence[GatewayApiKey]:
    return session.exec(
        select(GatewayApiKey)
        .where(GatewayApiKey.tenant_id == tenant_id)
        .order_by(GatewayApiKey.created_at)
    ).all()


def touch_key(session: Session, tenant_id: str, key_id: str, now: datetime) -> None:
    session.execute(
        update(GatewayApiKey)
        .where(GatewayApiKey.id == key_id, GatewayApiKey.tenant_id == tenant_id)
        .values(last_used_at=now)
    )


def revoke_key(session: Session, tenant_id: str, key_id: str, now: datetime) -> bool:
    """Returns False if the key was already revoked."""
    result = session.execute(
        update(GatewayApiKey)
        .where(
            GatewayApiKey.id == key_id,
            GatewayApiKey.tenant_id == tenant_id,
            GatewayApiKey.revoked_at.is_(None),  # type: ignore[union-attr]
        )
        .values(revoked_at=now)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
