"""All SQL of the gateway. Callers own the transaction (session_scope at the edge)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, update
from sqlmodel import Session, col, select

from services.gateway.tables import GatewayApiKey, GatewayAuditEntry, GatewayTenant


def tenant_by_name(session: Session, name: str) -> GatewayTenant | None:
    return session.exec(select(GatewayTenant).where(GatewayTenant.name == name)).first()


def add_tenant(session: Session, tenant_id: str, name: str, now: datetime) -> GatewayTenant:
    tenant = GatewayTenant(id=tenant_id, name=name, created_at=now)
    session.add(tenant)
    session.flush()  # surface a duplicate name here, inside the caller's transaction
    return tenant


def tenant_by_id(session: Session, tenant_id: str) -> GatewayTenant | None:
    return session.get(GatewayTenant, tenant_id)


def all_tenants(session: Session) -> Sequence[GatewayTenant]:
    return session.exec(select(GatewayTenant).order_by(col(GatewayTenant.created_at))).all()


def add_key(
    session: Session, key_id: str, tenant_id: str, prefix: str, key_hash: str, scopes: str,
    now: datetime,
) -> GatewayApiKey:
    key = GatewayApiKey(
        id=key_id, tenant_id=tenant_id, prefix=prefix, key_hash=key_hash, scopes=scopes,
        created_at=now,
    )
    session.add(key)
    session.flush()
    return key


def key_by_hash(session: Session, key_hash: str) -> GatewayApiKey | None:
    """The one lookup that yields a tenant: the hash of the presented key is the credential."""
    return session.exec(select(GatewayApiKey).where(GatewayApiKey.key_hash == key_hash)).first()


def key_and_tenant_by_hash(
    session: Session, key_hash: str
) -> tuple[GatewayApiKey, GatewayTenant] | None:
    row = session.exec(
        select(GatewayApiKey, GatewayTenant)
        .join(GatewayTenant, col(GatewayTenant.id) == col(GatewayApiKey.tenant_id))
        .where(GatewayApiKey.key_hash == key_hash)
    ).first()
    return (row[0], row[1]) if row else None


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


def expire_key(session: Session, tenant_id: str, key_id: str, at: datetime) -> None:
    """The key stops working at `at` (kept if it would stop sooner already)."""
    session.execute(
        update(GatewayApiKey)
        .where(
            GatewayApiKey.id == key_id,
            GatewayApiKey.tenant_id == tenant_id,
            or_(GatewayApiKey.expires_at.is_(None),  # type: ignore[union-attr]
                col(GatewayApiKey.expires_at) > at),
        )
        .values(expires_at=at)
    )


def set_rate_limit(
    session: Session, tenant_id: str, per_s: float | None, burst: int | None
) -> None:
    session.execute(
        update(GatewayTenant)
        .where(col(GatewayTenant.id) == tenant_id)
        .values(rate_limit_per_s=per_s, rate_limit_burst=burst)
    )


def add_audit(session: Session, entry: GatewayAuditEntry) -> GatewayAuditEntry:
    session.add(entry)
    session.flush()
    return entry


def audit_entries(
    session: Session, tenant_id: str | None, before_id: int | None, limit: int
) -> Sequence[GatewayAuditEntry]:
    """Newest first; `before_id` pages back."""
    query = select(GatewayAuditEntry)
    if tenant_id is not None:
        query = query.where(GatewayAuditEntry.tenant_id == tenant_id)
    if before_id is not None:
        query = query.where(col(GatewayAuditEntry.id) < before_id)
    return session.exec(query.order_by(col(GatewayAuditEntry.id).desc()).limit(limit)).all()
