"""The admin API (/v1/admin/...): tenants, their keys and rate limits, and the audit log.

Only mounted when CHURNGUARD_GATEWAY_ADMIN_KEY is set. Callers: that bootstrap key, or an API
key with the `admin` scope (issued through this API). Every change is written to the audit log
in the same transaction as the change itself."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.exc import IntegrityError

from services.gateway import scopes, service
from services.gateway.deps import AdminDep, StateDep
from services.gateway.service import Conflict, IssuedKey, KeyInfo, NotFound, RateLimit
from services.gateway.tables import GatewayAuditEntry, GatewayTenant
from shared.db import session_scope

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_DETAIL = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}}}}}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such tenant or key.", **_DETAIL}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"description": "Contradicts what exists (named).", **_DETAIL}}

ScopeName = Annotated[str, Field(description="One of: " + ", ".join(scopes.ALL_SCOPES))]


class TenantIn(BaseModel):
    name: str = Field(min_length=1, max_length=service.MAX_TENANT_NAME_CHARS)


class RateLimitBody(BaseModel):
    # At least one request per 100 s: Retry-After stays a sensible number of seconds.
    requests_per_s: float = Field(ge=0.01, le=100_000, description="Token refill rate per key.")
    burst: int = Field(ge=1, le=1_000_000, description="Requests a key may send at once.")


class TenantOut(BaseModel):
    tenant_id: str
    name: str
    created_at: datetime
    rate_limit: RateLimitBody | None = Field(
        description="The tenant's own limit per key; null: the gateway's default."
    )

    @classmethod
    def of(cls, tenant: GatewayTenant) -> TenantOut:
        limit = None
        if tenant.rate_limit_per_s is not None and tenant.rate_limit_burst is not None:
            limit = RateLimitBody(requests_per_s=tenant.rate_limit_per_s,
                                  burst=tenant.rate_limit_burst)
        return cls(tenant_id=tenant.id, name=tenant.name, created_at=tenant.created_at,
                   rate_limit=limit)


class KeyIn(BaseModel):
    scopes: list[ScopeName] = Field(
        default_factory=lambda: list(scopes.TENANT_SCOPES), min_length=1, max_length=10,
        description="Default: every tenant scope (not admin).",
    )

    @field_validator("scopes")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return list(scopes.parse_scopes(value))


class KeyOut(BaseModel):
    key_id: str
    tenant_id: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None = Field(
        description="A key rotated with an overlap works until then, next to its successor."
    )

    @classmethod
    def of(cls, key: KeyInfo) -> KeyOut:
        return cls(key_id=key.key_id, tenant_id=key.tenant_id, prefix=key.prefix,
                   scopes=list(key.scopes), created_at=key.created_at,
                   last_used_at=key.last_used_at, revoked_at=key.revoked_at,
                   expires_at=key.expires_at)


class IssuedKeyOut(BaseModel):
    key_id: str
    tenant_id: str
    prefix: str
    scopes: list[str]
    api_key: str = Field(description="Shown this once; only its hash is stored.")

    @classmethod
    def of(cls, issued: IssuedKey) -> IssuedKeyOut:
        return cls(key_id=issued.key_id, tenant_id=issued.tenant_id, prefix=issued.prefix,
                   scopes=list(issued.scopes), api_key=issued.api_key)


class RotateIn(BaseModel):
    overlap_s: float = Field(
        0, ge=0, le=service.MAX_ROTATION_OVERLAP.total_seconds(),
        description="How long the old key keeps working next to the new one (0: revoked now).",
    )


class RotatedOut(BaseModel):
    new: IssuedKeyOut
    old: KeyOut


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str = Field(description='The admin key id, or "bootstrap".')
    action: str
    target: str
    tenant_id: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, entry: GatewayAuditEntry) -> AuditEntryOut:
        assert entry.id is not None
        return cls(id=entry.id, at=entry.at, actor=entry.actor, action=entry.action,
                   target=entry.target, tenant_id=entry.tenant_id, detail=json.loads(entry.detail))


def _not_found(exc: NotFound) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


@router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantOut,
             responses=CONFLICT)
def create_tenant(body: TenantIn, admin: AdminDep, gateway: StateDep) -> TenantOut:
    try:
        with session_scope(gateway.engine) as session:
            tenant = service.create_tenant(session, body.name, gateway.clock)
            service.audit(session, gateway.clock, actor=admin.actor, action="tenant.created",
                          target=tenant.id, tenant_id=tenant.id, detail={"name": tenant.name})
            return TenantOut.of(tenant)
    except ValueError as exc:  # a name of blanks only
        raise HTTPException(422, f"name: {exc}") from None
    except (Conflict, IntegrityError) as exc:  # IntegrityError: created concurrently
        detail = str(exc) if isinstance(exc, Conflict) else "a tenant of that name exists already"
        raise HTTPException(status.HTTP_409_CONFLICT, detail) from None


@router.get("/tenants", response_model=list[TenantOut])
def list_tenants(admin: AdminDep, gateway: StateDep) -> list[TenantOut]:
    with session_scope(gateway.engine) as session:
        return [TenantOut.of(t) for t in service.tenants(session)]


@router.post("/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED,
             response_model=IssuedKeyOut, responses=NOT_FOUND)
def create_key(tenant_id: str, body: KeyIn, admin: AdminDep, gateway: StateDep) -> IssuedKeyOut:
    try:
        with session_scope(gateway.engine) as session:
            issued = service.issue_key_for(session, tenant_id, body.scopes, gateway.clock)
            service.audit(session, gateway.clock, actor=admin.actor, action="key.created",
                          target=issued.key_id, tenant_id=issued.tenant_id,
                          detail={"scopes": list(issued.scopes), "prefix": issued.prefix})
            return IssuedKeyOut.of(issued)
    except NotFound as exc:
        raise _not_found(exc) from None


@router.get("/tenants/{tenant_id}/keys", response_model=list[KeyOut], responses=NOT_FOUND)
def list_keys(tenant_id: str, admin: AdminDep, gateway: StateDep) -> list[KeyOut]:
    try:
        with session_scope(gateway.engine) as session:
            return [KeyOut.of(k) for k in service.keys_of_tenant(session, tenant_id)]
    except NotFound as exc:
        raise _not_found(exc) from None


@router.post("/keys/{key_id}/revoke", response_model=KeyOut, responses=NOT_FOUND)
def revoke_key(key_id: str, admin: AdminDep, gateway: StateDep) -> KeyOut:
    """Refused from now on, by this gateway process at once (by others within their key cache
    time, CHURNGUARD_GATEWAY_AUTH_CACHE_S). Revoking a revoked key changes nothing."""
    try:
        with session_scope(gateway.engine) as session:
            key = service.revoke_key_id(session, key_id, gateway.clock)
            service.audit(session, gateway.clock, actor=admin.actor, action="key.revoked",
                          target=key.key_id, tenant_id=key.tenant_id)
    except NotFound as exc:
        raise _not_found(exc) from None
    gateway.authenticator.forget_key(key_id)
    return KeyOut.of(key)


@router.post("/keys/{key_id}/rotate", status_code=status.HTTP_201_CREATED,
             response_model=RotatedOut, responses={**NOT_FOUND, **CONFLICT})
def rotate_key(key_id: str, body: RotateIn, admin: AdminDep, gateway: StateDep) -> RotatedOut:
    try:
        with session_scope(gateway.engine) as session:
            issued, old = service.rotate(
                session, key_id, timedelta(seconds=body.overlap_s), gateway.clock
            )
            service.audit(session, gateway.clock, actor=admin.actor, action="key.rotated",
                          target=old.key_id, tenant_id=old.tenant_id,
                          detail={"new_key_id": issued.key_id, "overlap_s": body.overlap_s})
    except NotFound as exc:
        raise _not_found(exc) from None
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    gateway.authenticator.forget_key(key_id)  # its cached entry must learn the revocation time
    return RotatedOut(new=IssuedKeyOut.of(issued), old=KeyOut.of(old))


def _change_rate_limit(
    tenant_id: str, limit: RateLimit | None, admin: AdminDep, gateway: StateDep
) -> TenantOut:
    try:
        with session_scope(gateway.engine) as session:
            tenant = service.set_rate_limit(session, tenant_id, limit)
            service.audit(session, gateway.clock, actor=admin.actor, action="rate_limit.changed",
                          target=tenant.id, tenant_id=tenant.id,
                          detail={"requests_per_s": limit.per_s if limit else None,
                                  "burst": limit.burst if limit else None})
    except NotFound as exc:
        raise _not_found(exc) from None
    gateway.authenticator.forget_tenant(tenant_id)
    return TenantOut.of(tenant)


@router.put("/tenants/{tenant_id}/rate-limit", response_model=TenantOut, responses=NOT_FOUND)
def set_rate_limit(
    tenant_id: str, body: RateLimitBody, admin: AdminDep, gateway: StateDep
) -> TenantOut:
    """Each key of the tenant gets this token bucket, in each gateway process."""
    return _change_rate_limit(tenant_id, RateLimit(body.requests_per_s, body.burst), admin, gateway)


@router.delete("/tenants/{tenant_id}/rate-limit", response_model=TenantOut, responses=NOT_FOUND)
def reset_rate_limit(tenant_id: str, admin: AdminDep, gateway: StateDep) -> TenantOut:
    """Back to the gateway's default (CHURNGUARD_GATEWAY_RATE_LIMIT_PER_S / _BURST)."""
    return _change_rate_limit(tenant_id, None, admin, gateway)


@router.get("/audit", response_model=list[AuditEntryOut])
def audit_log(
    admin: AdminDep,
    gateway: StateDep,
    tenant_id: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[int | None, Query(ge=1, description="Entries with a smaller id.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[AuditEntryOut]:
    """Newest first."""
    with session_scope(gateway.engine) as session:
        return [AuditEntryOut.of(e) for e in service.audit_log(session, tenant_id, before, limit)]
