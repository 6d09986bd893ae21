"""Tenants and API keys: issuing keys (shown once, stored as a hash) and resolving a key to
its tenant. Imports neither fastapi nor httpx; callers own the transaction."""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlmodel import Session

from services.gateway import repository
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


def issue_key(session: Session, tenant_name: str, clock: Clock) -> IssuedKey:
    """A new key for the tenant called `tenant_name`, creating the tenant if it is new. An
    existing tenant keeps its other keys (so re-running a setup script never locks anyone out)."""
    name = normalize_tenant_name(tenant_name)
    now = clock.now()
    tenant = repository.tenant_by_name(session, name)
    created = tenant is None
    if tenant is None:
        tenant = repository.add_tenant(session, new_tenant_id(), name, now)
    api_key = generate_key()
    key = repository.add_key(
        session, new_key_id(), tenant.id, api_key[:SHOWN_PREFIX_CHARS], hash_key(api_key), now
    )
    return IssuedKey(tenant.id, key.id, api_key, key.prefix, created)


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


def list_keys(session: Session, tenant_name: str) -> list[KeyInfo] | None:
    """The tenant's keys (never their hashes); None if there is no such tenant."""
    tenant = repository.tenant_by_name(session, normalize_tenant_name(tenant_name))
    if tenant is None:
        return None
    return [
        KeyInfo(k.id, k.prefix, k.created_at, k.last_used_at, k.revoked_at)
        for k in repository.keys_of_tenant(session, tenant.id)
    ]


RejectReason = Literal["missing", "invalid", "revoked"]


class KeyRejected(Exception):
    def __init__(self, reason: RejectReason) -> None:
        super().__init__(reason)
        self.reason: RejectReason = reason


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str


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
            return None
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
        key = repository.key_by_hash(session, hashed)
        if key is None:
            raise KeyRejected("invalid")  # not remembered: guessing must not fill the cache
        now = self._clock.now()
        if key.revoked_at is not None:
            self._remember(hashed, None, now)
            raise KeyRejected("revoked")
        if self._due(key.id, now):
            repository.touch_key(session, key.tenant_id, key.id, now)
        caller = Caller(tenant_id=key.tenant_id, key_id=key.id)
        self._remember(hashed, caller, now)
        return caller

    def _remember(self, hashed: str, caller: Caller | None, now: datetime) -> None:
        if self._cache_ttl <= timedelta(0):
            return
        with self._lock:
            if len(self._known) >= self._cache_size:
                self._known.clear()  # bounded; refilled from the database as keys come back
            self._known[hashed] = (caller, now + self._cache_ttl)

    def _due(self, key_id: str, now: datetime) -> bool:
        with self._lock:
            last = self._touched.get(key_id)
            if last is not None and now - last < self._touch_interval:
                return False
            self._touched[key_id] = now
            return True
