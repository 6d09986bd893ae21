"""Tenants and API keys: issuing keys (shown once, stored as a hash, scoped), rotating and
revoking them, per-tenant rate limits, the audit log of admin actions, and resolving a key to
its tenant. Imports neither fastapi nor httpx; callers own the transaction."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlmodel import Session

from services.gateway import repository, scopes
from services.gateway.tables import GatewayApiKey, GatewayAuditEntry, GatewayTenant
from shared.clock import Clock

KEY_PREFIX = "cg_"
SHOWN_PREFIX_CHARS = 10  # "cg_" + 7 characters: enough for a human to tell keys apart
MAX_KEY_CHARS = 200
MAX_TENANT_NAME_CHARS = 200
TOUCH_INTERVAL = timedelta(minutes=1)


def generate_key() -> str:
    """`cg_` + 32 random bytes, URL-safe: the key is shown once and never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """sha256 hex. Keys carry 256 bits of randomness, so a fast hash is enough (nothing to
    brute-force), and comparing hashes in the database leaks nothing useful about the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_tenant_id() -> str:
    return "t_" + secrets.token_hex(8)


def new_key_id() -> str:
    return "k_" + secrets.token_hex(8)


def normalize_tenant_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise ValueError("tenant name must not be empty")
    if len(name) > MAX_TENANT_NAME_CHARS:
        raise ValueError(f"tenant name is longer than {MAX_TENANT_NAME_CHARS} characters")
    return name


@dataclass(frozen=True)
class IssuedKey:
    tenant_id: str
    key_id: str
    api_key: str  # the only time the raw key exists outside the caller's hands
    prefix: str
    tenant_created: bool
    scopes: tuple[str, ...] = scopes.TENANT_SCOPES
    created_at: datetime | None = None


class NotFound(Exception):
    """No such tenant or key (the message names which)."""


class Conflict(Exception):
    """The change contradicts what exists (the message says what)."""


def issue_key(
    session: Session, tenant_name: str, clock: Clock,
    key_scopes: Iterable[str] = scopes.TENANT_SCOPES,
) -> IssuedKey:
    """A new key for the tenant called `tenant_name`, creating the tenant if it is new. An
    existing tenant keeps its other keys (so re-running a setup script never locks anyone out)."""
    name = normalize_tenant_name(tenant_name)
    tenant = repository.tenant_by_name(session, name)
    created = tenant is None
    if tenant is None:
        tenant = repository.add_tenant(session, new_tenant_id(), name, clock.now())
    issued = _new_key(session, tenant.id, scopes.parse_scopes(key_scopes), clock.now())
    return IssuedKey(**{**issued.__dict__, "tenant_created": created})


def _new_key(
    session: Session, tenant_id: str, key_scopes: tuple[str, ...], now: datetime
) -> IssuedKey:
    api_key = generate_key()
    key = repository.add_key(
        session, new_key_id(), tenant_id, api_key[:SHOWN_PREFIX_CHARS], hash_key(api_key),
        scopes.to_column(key_scopes), now,
    )
    return IssuedKey(tenant_id, key.id, api_key, key.prefix, False, key_scopes, now)


def create_tenant(session: Session, tenant_name: str, clock: Clock) -> GatewayTenant:
    name = normalize_tenant_name(tenant_name)
    if repository.tenant_by_name(session, name) is not None:
        raise Conflict(f"a tenant named {name!r} exists already")
    return repository.add_tenant(session, new_tenant_id(), name, clock.now())


def tenants(session: Session) -> list[GatewayTenant]:
    return list(repository.all_tenants(session))


def _tenant(session: Session, tenant_id: str) -> GatewayTenant:
    tenant = repository.tenant_by_id(session, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return tenant


def _key(session: Session, key_id: str) -> GatewayApiKey:
    key = repository.key_by_id(session, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id!r}")
    return key


def issue_key_for(
    session: Session, tenant_id: str, key_scopes: Iterable[str], clock: Clock
) -> IssuedKey:
    """A new key for an existing tenant (NotFound otherwise)."""
    tenant = _tenant(session, tenant_id)
    return _new_key(session, tenant.id, scopes.parse_scopes(key_scopes), clock.now())


def revoke_key_id(session: Session, key_id: str, clock: Clock) -> KeyInfo:
    """Revoked from now; a key revoked already stays as it was (idempotent)."""
    key = _key(session, key_id)
    repository.revoke_key(session, key.tenant_id, key.id, clock.now())
    session.refresh(key)
    return KeyInfo.of(key)


MAX_ROTATION_OVERLAP = timedelta(days=7)


def rotate(
    session: Session, key_id: str, overlap: timedelta, clock: Clock
) -> tuple[IssuedKey, KeyInfo]:
    """A new key with the old one's tenant and scopes; the old one is revoked after `overlap`
    (zero: at once), so callers can switch without a gap."""
    if overlap < timedelta(0) or overlap > MAX_ROTATION_OVERLAP:
        raise ValueError(f"overlap_s must be between 0 and {MAX_ROTATION_OVERLAP.total_seconds():g}")
    old = _key(session, key_id)
    now = clock.now()
    if _refused(old, now):
        raise Conflict(f"API key {key_id!r} is revoked or expired; issue a new key instead")
    issued = _new_key(session, old.tenant_id, tuple(sorted(
        scopes.from_column(old.scopes), key=scopes.ALL_SCOPES.index)), now)
    if overlap > timedelta(0):
        repository.expire_key(session, old.tenant_id, old.id, now + overlap)
    else:
        repository.revoke_key(session, old.tenant_id, old.id, now)
    session.refresh(old)
    return issued, KeyInfo.of(old)


@dataclass(frozen=True)
class RateLimit:
    per_s: float
    burst: int


def set_rate_limit(session: Session, tenant_id: str, limit: RateLimit | None) -> GatewayTenant:
    """The tenant's own limit for each of its keys; None: back to the gateway's default."""
    tenant = _tenant(session, tenant_id)
    repository.set_rate_limit(
        session, tenant.id, limit.per_s if limit else None, limit.burst if limit else None
    )
    session.refresh(tenant)
    return tenant


BOOTSTRAP_ACTOR = "bootstrap"


def audit(
    session: Session, clock: Clock, *, actor: str, action: str, target: str,
    tenant_id: str | None, detail: dict[str, Any] | None = None,
) -> GatewayAuditEntry:
    """One admin action, written in the caller's transaction: it is recorded if and only if
    the change itself is. `detail` holds ids and settings, never a key or its hash."""
    return repository.add_audit(session, GatewayAuditEntry(
        at=clock.now(), actor=actor, action=action, target=target, tenant_id=tenant_id,
        detail=json.dumps(detail or {}, sort_keys=True),
    ))


def audit_log(
    session: Session, tenant_id: str | None = None, before_id: int | None = None, limit: int = 100
) -> list[GatewayAuditEntry]:
    return list(repository.audit_entries(session, tenant_id, before_id, limit))


def revoke(session: Session, key_or_id: str, clock: Clock) -> bool:
    """Revoke by key id (`k_...`) or by the raw key itself (`cg_...`, e.g. one that leaked).
    Returns False if no such key exists or it was already revoked."""
    if key_or_id.startswith(KEY_PREFIX):
        key = repository.key_by_hash(session, hash_key(key_or_id))
    else:
        key = repository.key_by_id(session, key_or_id)
    if key is None:
        return False
    return repository.revoke_key(session, key.tenant_id, key.id, clock.now())


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    tenant_id: str = ""
    scopes: tuple[str, ...] = ()
    expires_at: datetime | None = None

    @classmethod
    def of(cls, key: GatewayApiKey) -> KeyInfo:
        granted = scopes.from_column(key.scopes)
        return cls(key.id, key.prefix, key.created_at, key.last_used_at, key.revoked_at,
                   key.tenant_id, tuple(s for s in scopes.ALL_SCOPES if s in granted),
                   key.expires_at)


def _refused(key: GatewayApiKey, now: datetime) -> bool:
    return key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now)


def list_keys(session: Session, tenant_name: str) -> list[KeyInfo] | None:
    """The tenant's keys (never their hashes); None if there is no such tenant."""
    tenant = repository.tenant_by_name(session, normalize_tenant_name(tenant_name))
    if tenant is None:
        return None
    return [KeyInfo.of(k) for k in repository.keys_of_tenant(session, tenant.id)]


def keys_of_tenant(session: Session, tenant_id: str) -> list[KeyInfo]:
    tenant = _tenant(session, tenant_id)
    return [KeyInfo.of(k) for k in repository.keys_of_tenant(session, tenant.id)]


RejectReason = Literal["missing", "invalid", "revoked"]


class KeyRejected(Exception):
    def __init__(self, reason: RejectReason) -> None:
        super().__init__(reason)
        self.reason: RejectReason = reason


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str
    scopes: frozenset[str] = frozenset(scopes.TENANT_SCOPES)
    rate_limit: RateLimit | None = None  # None: the gateway's default
    expires_at: datetime | None = None  # a rotated key's end of overlap


class KeyAuthenticator:
    """Resolves a presented key to its tenant. `last_used_at` is written at most once per
    TOUCH_INTERVAL per key and process, so a busy key does not turn every request into a write.

    A key found in the database is remembered for `cache_ttl` (by its hash, never the key):
    most requests are then answered without a database round trip. The price: a key revoked
    by another process keeps working here for at most `cache_ttl`."""

    def __init__(self, clock: Clock, touch_interval: timedelta = TOUCH_INTERVAL,
                 cache_ttl: timedelta = timedelta(seconds=2), cache_size: int = 10_000) -> None:
        self._clock = clock
        self._touch_interval = touch_interval
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._touched: dict[str, datetime] = {}
        self._known: dict[str, tuple[Caller | None, datetime]] = {}  # hash -> (caller or revoked, until)
        self._lock = threading.Lock()  # authenticate() runs in worker threads

    def cached(self, presented: str | None) -> Caller | None:
        """The answer without the database, when there is a fresh one (raises KeyRejected);
        None when the database must be asked (unknown, expired, or last_used_at is due)."""
        if not presented:
            raise KeyRejected("missing")
        if not presented.startswith(KEY_PREFIX) or len(presented) > MAX_KEY_CHARS:
            raise KeyRejected("invalid")  # cannot be one of ours; spare the database
        entry = self._known.get(hash_key(presented))
        now = self._clock.now()
        if entry is None or now >= entry[1]:
            return None  # (a rotated key's entry ends when its overlap does: see _remember)
        caller = entry[0]
        if caller is None:
            raise KeyRejected("revoked")
        with self._lock:
            last = self._touched.get(caller.key_id)
        return caller if last is not None and now - last < self._touch_interval else None

    def authenticate(self, session: Session, presented: str | None) -> Caller:
        if not presented:
            raise KeyRejected("missing")
        if not presented.startswith(KEY_PREFIX) or len(presented) > MAX_KEY_CHARS:
            raise KeyRejected("invalid")  # cannot be one of ours; spare the database
        hashed = hash_key(presented)
        found = repository.key_and_tenant_by_hash(session, hashed)
        if found is None:
            raise KeyRejected("invalid")  # not remembered: guessing must not fill the cache
        key, tenant = found
        now = self._clock.now()
        if _refused(key, now):
            self._remember(hashed, None, now)
            raise KeyRejected("revoked")
        if self._due(key.id, now):
            repository.touch_key(session, key.tenant_id, key.id, now)
        limit = (RateLimit(tenant.rate_limit_per_s, tenant.rate_limit_burst)
                 if tenant.rate_limit_per_s is not None and tenant.rate_limit_burst is not None
                 else None)
        caller = Caller(tenant_id=key.tenant_id, key_id=key.id,
                        scopes=scopes.from_column(key.scopes), rate_limit=limit,
                        expires_at=key.expires_at)
        self._remember(hashed, caller, now)
        return caller

    def forget_key(self, key_id: str) -> None:
        """Drop what this process remembers of a key (revoked or rotated here: effective at
        once here; other gateway processes notice within `cache_ttl`)."""
        with self._lock:
            for hashed, (caller, _) in list(self._known.items()):
                if caller is not None and caller.key_id == key_id:
                    del self._known[hashed]

    def forget_tenant(self, tenant_id: str) -> None:
        """Drop the tenant's keys (its rate limit changed)."""
        with self._lock:
            for hashed, (caller, _) in list(self._known.items()):
                if caller is not None and caller.tenant_id == tenant_id:
                    del self._known[hashed]

    def _remember(self, hashed: str, caller: Caller | None, now: datetime) -> None:
        if self._cache_ttl <= timedelta(0):
            return
        until = now + self._cache_ttl
        if caller is not None and caller.expires_at is not None:
            until = min(until, caller.expires_at)  # never remembered past its expiry
        with self._lock:
            if len(self._known) >= self._cache_size:
                self._known.clear()  # bounded; refilled from the database as keys come back
            self._known[hashed] = (caller, until)

    def _due(self, key_id: str, now: datetime) -> bool:
        with self._lock:
            last = self._touched.get(key_id)
            if last is not None and now - last < self._touch_interval:
                return False
            self._touched[key_id] = now
            return True
