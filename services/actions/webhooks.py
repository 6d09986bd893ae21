"""Webhooks of the actions service: subscriptions (with secret rotation), the outbox (enqueue,
claim, book each attempt), and the deliveries API (list with attempts, replay).

Imports neither fastapi nor an HTTP client; the caller owns the transaction (a session from
`shared.db.session_scope`) and the clock (`now`).
"""

from __future__ import annotations

import base64
import binascii
import random
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from psycopg import AsyncConnection
from sqlalchemy import insert
from sqlmodel import Session

from services.actions import webhook_repository as repo
from services.actions.errors import Conflict, NotFound
from services.actions.tables import (
    ActionsDelivery,
    ActionsDeliveryAttempt,
    ActionsWebhookSecret,
    ActionsWebhookSubscription,
)
from services.actions.url_guard import UrlPolicy
from shared.events import new_id

OFFER_CREATED_EVENT = "offer.created"
WEBHOOK_EVENT_TYPES = (OFFER_CREATED_EVENT,)

SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES, SECRET_MAX_BYTES = 24, 64  # Standard Webhooks: 24..64 bytes of key
GENERATED_SECRET_BYTES = 32
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
MAX_ERROR_CHARS = 1000
MAX_REPLAY_RANGE = 1_000

GONE_REASON = "subscription disabled: the receiver answered 410 Gone"
DELETED_REASON = "subscription deleted"

# --- secrets ----------------------------------------------------------------------------


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(GENERATED_SECRET_BYTES)).decode()


def check_secret(secret: str) -> str:
    """Accept `whsec_` + standard base64 of 24..64 bytes; raise ValueError saying what is wrong."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"must start with '{SECRET_PREFIX}'")
    encoded = secret[len(SECRET_PREFIX) :]
    if not _BASE64.match(encoded) or len(encoded) % 4:
        raise ValueError(f"must be '{SECRET_PREFIX}' followed by standard base64")
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"must be '{SECRET_PREFIX}' followed by standard base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(
            f"key must be {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes, got {len(key)}"
        )
    return secret


# --- subscriptions ----------------------------------------------------------------------


def create_subscription(
    session: Session,
    tenant_id: str,
    url: str,
    now: datetime,
    url_policy: UrlPolicy,
    secret: str | None = None,
    event_types: Sequence[str] = (OFFER_CREATED_EVENT,),
) -> ActionsWebhookSubscription:
    """Raises url_guard.UnsafeUrl (SSRF guard) or ValueError (secret, event types)."""
    unknown = sorted(set(event_types) - set(WEBHOOK_EVENT_TYPES))
    if unknown:
        raise ValueError(f"unknown event types {unknown}; known: {list(WEBHOOK_EVENT_TYPES)}")
    url_policy.check(url)
    subscription = ActionsWebhookSubscription(
        id=new_id(),
        tenant_id=tenant_id,
        url=url,
        secret=check_secret(secret) if secret is not None else generate_secret(),
        event_types=list(dict.fromkeys(event_types)),
        active=True,
        created_at=now,
    )
    session.add(subscription)
    session.flush()
    return subscription


def list_subscriptions(session: Session, tenant_id: str) -> Sequence[ActionsWebhookSubscription]:
    return repo.active_subscriptions(session, tenant_id)


def get_subscription(
    session: Session, tenant_id: str, subscription_id: str
) -> ActionsWebhookSubscription:
    """Active or disabled (a 410 leaves the row visible with its reason); NotFound otherwise."""
    subscription = repo.get_subscription(session, tenant_id, subscription_id)
    if subscription is None or subscription.disabled_reason == DELETED_REASON:
        raise NotFound(f"webhook subscription {subscription_id} not found")
    return subscription


def delete_subscription(
    session: Session, tenant_id: str, subscription_id: str, now: datetime
) -> int:
    """Deactivate a subscription (the row stays for the delivery history) and park its pending
    deliveries: nobody is listening any more. Returns how many deliveries were parked."""
    subscription = repo.get_subscription(session, tenant_id, subscription_id)
    if subscription is None or subscription.disabled_reason == DELETED_REASON:
        raise NotFound(f"webhook subscription {subscription_id} not found")
    return _disable(session, subscription, DELETED_REASON, now)


def _disable(
    session: Session, subscription: ActionsWebhookSubscription, reason: str, now: datetime
) -> int:
    subscription.active = False
    subscription.disabled_reason = reason
    subscription.disabled_at = now
    session.add(subscription)
    pending = repo.pending_deliveries_of_subscription(session, subscription.id)
    for delivery in pending:
        _park(delivery, reason)
        session.add(delivery)
    return len(pending)


@dataclass(frozen=True)
class Rotation:
    subscription: ActionsWebhookSubscription
    secret: str
    previous_secret_expires_at: datetime


def rotate_secret(
    session: Session,
    tenant_id: str,
    subscription_id: str,
    now: datetime,
    overlap: timedelta,
    secret: str | None = None,
) -> Rotation:
    """Make a new signing secret current. Until `now + overlap` every request carries the
    signature with the previous secret too, so receivers can switch without a gap."""
    subscription = repo.get_subscription(session, tenant_id, subscription_id)
    if subscription is None or subscription.disabled_reason == DELETED_REASON:
        raise NotFound(f"webhook subscription {subscription_id} not found")
    if not subscription.active:
        raise Conflict(f"webhook subscription {subscription_id} is disabled")
    new_secret = check_secret(secret) if secret is not None else generate_secret()
    if new_secret == subscription.secret:
        raise ValueError("the new secret must differ from the current one")
    expires_at = now + overlap
    if overlap > timedelta(0):
        session.add(
            ActionsWebhookSecret(
                id=new_id(),
                tenant_id=tenant_id,
                subscription_id=subscription.id,
                secret=subscription.secret,
                created_at=now,
                expires_at=expires_at,
            )
        )
    subscription.secret = new_secret
    session.add(subscription)
    session.flush()
    return Rotation(subscription, new_secret, expires_at)


# --- the outbox: enqueue ----------------------------------------------------------------


def enqueue(
    session: Session,
    *,
    tenant_id: str,
    offer_id: str,
    payload: str,
    now: datetime,
    event_type: str = OFFER_CREATED_EVENT,
) -> int:
    """One outbox row per active subscription of the tenant that wants `event_type`, in the
    caller's transaction. `payload` is the exact JSON text that is signed and sent on every
    attempt. Returns how many rows were written."""
    rows = outbox_rows(
        subscribers(session, tenant_id, event_type),
        tenant_id=tenant_id, offer_id=offer_id, payload=payload, now=now, event_type=event_type,
    )
    session.add_all(rows)
    return len(rows)


def subscribers(session: Session, tenant_id: str, event_type: str) -> list[str]:
    """Ids of the tenant's active subscriptions that want `event_type`, oldest first."""
    return [
        subscription_id
        for subscription_id, event_types in repo.active_subscription_events(session, tenant_id)
        if event_type in event_types
    ]


def outbox_rows(
    subscription_ids: Sequence[str],
    *,
    tenant_id: str,
    offer_id: str,
    payload: str,
    now: datetime,
    event_type: str = OFFER_CREATED_EVENT,
) -> list[ActionsDelivery]:
    """The outbox rows of one event, one per subscription (not added to a session yet)."""
    return [
        ActionsDelivery(**outbox_row(
            subscription_id, tenant_id=tenant_id, offer_id=offer_id, payload=payload, now=now,
            event_type=event_type,
        ))
        for subscription_id in subscription_ids
    ]


def outbox_row(
    subscription_id: str,
    *,
    tenant_id: str,
    offer_id: str,
    payload: str,
    now: datetime,
    event_type: str = OFFER_CREATED_EVENT,
) -> dict[str, Any]:
    """One outbox row as column values (a new delivery: due now, no attempts yet)."""
    return {
        "delivery_id": f"msg_{new_id()}",
        "tenant_id": tenant_id,
        "subscription_id": subscription_id,
        "offer_id": offer_id,
        "event_type": event_type,
        "payload": payload,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "last_error": None,
        "last_status_code": None,
        "delivered_at": None,
        "created_at": now,
    }


# --- the deliveries API -----------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryWithAttempts:
    delivery: ActionsDelivery
    attempts: list[ActionsDeliveryAttempt]


def list_deliveries(
    session: Session,
    tenant_id: str,
    status: str | None = None,
    limit: int = 100,
    *,
    subscription_id: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
) -> list[DeliveryWithAttempts]:
    repo.read_one_snapshot(session)
    rows = repo.list_deliveries(
        session,
        tenant_id,
        status=status,
        subscription_id=subscription_id,
        created_from=created_from,
        created_to=created_to,
        limit=limit,
    )
    attempts = repo.attempts_of(session, tenant_id, [r.delivery_id for r in rows])
    return [DeliveryWithAttempts(r, attempts.get(r.delivery_id, [])) for r in rows]


def get_delivery(session: Session, tenant_id: str, delivery_id: str) -> DeliveryWithAttempts:
    repo.read_one_snapshot(session)
    row = repo.get_delivery(session, tenant_id, delivery_id)
    if row is None:
        raise NotFound(f"delivery {delivery_id} not found")
    attempts = repo.attempts_of(session, tenant_id, [delivery_id]).get(delivery_id, [])
    return DeliveryWithAttempts(row, attempts)


def replay_delivery(
    session: Session, tenant_id: str, delivery_id: str, now: datetime
) -> ActionsDelivery:
    """Send a parked (or failing) delivery again now, with a fresh retry schedule and the same
    webhook-id. Its earlier attempts stay in the attempt log."""
    delivery = repo.get_delivery(session, tenant_id, delivery_id)
    if delivery is None:
        raise NotFound(f"delivery {delivery_id} not found")
    if delivery.status == "delivered":
        raise Conflict(f"delivery {delivery_id} was already delivered")
    subscription = repo.get_subscription(session, tenant_id, delivery.subscription_id)
    if subscription is None or not subscription.active:
        reason = (subscription.disabled_reason if subscription else None) or "deleted"
        raise Conflict(
            f"the webhook subscription of delivery {delivery_id} is inactive ({reason})"
        )
    _reset(delivery, now)
    session.add(delivery)
    session.flush()
    return delivery


@dataclass(frozen=True)
class RangeReplay:
    replayed: list[str]
    skipped_inactive_subscription: list[str]


def replay_range(
    session: Session,
    tenant_id: str,
    created_from: datetime,
    created_to: datetime,
    now: datetime,
    subscription_id: str | None = None,
) -> RangeReplay:
    """Replay every parked delivery created in [created_from, created_to) (at most
    MAX_REPLAY_RANGE per call). Deliveries of inactive subscriptions are listed as skipped."""
    if created_to <= created_from:
        raise ValueError("created_to must be after created_from")
    rows = repo.list_deliveries(
        session,
        tenant_id,
        status="parked",
        subscription_id=subscription_id,
        created_from=created_from,
        created_to=created_to,
        limit=MAX_REPLAY_RANGE,
        lock=True,
    )
    subscriptions = repo.subscriptions_by_id(session, sorted({r.subscription_id for r in rows}))
    replayed, skipped = [], []
    for row in sorted(rows, key=lambda r: (r.created_at, r.delivery_id)):
        subscription = subscriptions.get(row.subscription_id)
        if subscription is None or not subscription.active:
            skipped.append(row.delivery_id)
            continue
        _reset(row, now)
        session.add(row)
        replayed.append(row.delivery_id)
    session.flush()
    return RangeReplay(replayed, skipped)


def _reset(delivery: ActionsDelivery, now: datetime) -> None:
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.leased_until = None


# --- retry timing -----------------------------------------------------------------------


def retry_delay(
    attempts: int,
    schedule: Sequence[float],
    jitter: float = 0.0,
    rng: Callable[[], float] = random.random,
) -> timedelta | None:
    """How long to wait after the `attempts`-th failed attempt; None once the schedule is spent.

    The first attempt is immediate; `schedule[i]` is the wait before attempt i + 2, stretched by
    a random factor in [1, 1 + jitter) so that deliveries failing together (an endpoint's
    outage) do not all come back at the same instant. Upward only: the schedule keeps its
    nominal total length as a minimum.
    """
    if attempts < 1:
        raise ValueError("attempts counts failed attempts and starts at 1")
    if attempts > len(schedule):
        return None
    return timedelta(seconds=schedule[attempts - 1] * (1.0 + jitter * rng()))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), None when
    absent or unreadable. A date in the past means 0."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, (when - now).total_seconds())


# --- the outbox: the worker's side ------------------------------------------------------


@dataclass(frozen=True)
class ClaimedDelivery:
    delivery_id: str
    url: str
    secret: str
    payload: str
    attempts: int  # attempts made before this one
    subscription_id: str = ""
    tenant_id: str = ""
    previous_secrets: tuple[str, ...] = ()  # inside a rotation overlap: also signed with these
    created_at: datetime | None = None

    @property
    def signing_secrets(self) -> tuple[str, ...]:
        return (self.secret, *self.previous_secrets)


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None = None
    error: str | None = None  # a network error, timeout or refusal; None when it answered
    retry_after: str | None = None  # the Retry-After header of a 429/503, as sent
    latency_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300


AttemptOutcome = Literal[
    "delivered", "failed", "error", "rate_limited", "gone", "parked", "stale"
]


def claim_due_deliveries(
    session: Session,
    now: datetime,
    limit: int,
    lease: timedelta,
    exclude_subscriptions: Sequence[str] = (),
    capacity: Callable[[str], int] | None = None,
    defer: dict[str, datetime] | None = None,
) -> tuple[list[ClaimedDelivery], int]:
    """Claim due deliveries for one attempt (system-wide, the worker's job).

    A claim sets the row's `leased_until` to `now + lease`: if this process dies mid-attempt,
    the delivery becomes due again after the lease and is retried with the same webhook-id.
    `capacity(subscription_id)` caps how many of one endpoint's rows are claimed (its free
    concurrency slots); rows beyond it stay due and untouched. Deliveries of inactive
    subscriptions are parked instead. `defer` {subscription_id: until} first moves the due
    deliveries of endpoints whose circuit is open to when it lets a probe through. Returns
    (claimed, parked).
    """
    defer_open_endpoints(session, defer or {}, now)
    rows = repo.lock_due_delivery_rows(session, now, limit, exclude_subscriptions)
    subscription_ids = sorted({r.subscription_id for r in rows})
    subscriptions = repo.claim_subscriptions(session, subscription_ids)
    previous = repo.live_previous_secrets(session, subscription_ids, now)
    free: dict[str, int] = {}
    claimed: list[ClaimedDelivery] = []
    to_park: dict[str, list[str]] = {}
    for row in rows:
        subscription = subscriptions.get(row.subscription_id)
        if subscription is None or not subscription.active:
            reason = (subscription.disabled_reason if subscription else None) or DELETED_REASON
            to_park.setdefault(reason, []).append(row.delivery_id)
            continue
        if capacity is not None:
            free.setdefault(row.subscription_id, capacity(row.subscription_id))
            if free[row.subscription_id] <= 0:
                continue
            free[row.subscription_id] -= 1
        claimed.append(
            ClaimedDelivery(
                row.delivery_id,
                subscription.url,
                subscription.secret,
                row.payload,
                row.attempts,
                subscription_id=subscription.id,
                tenant_id=row.tenant_id,
                previous_secrets=tuple(previous.get(subscription.id, ())),
                created_at=row.created_at,
            )
        )
    repo.lease_deliveries(session, [c.delivery_id for c in claimed], now + lease)
    for reason, ids in to_park.items():
        repo.set_deliveries(session, ids, status="parked", last_error=reason[:MAX_ERROR_CHARS])
    return claimed, sum(len(ids) for ids in to_park.values())


def defer_open_endpoints(session: Session, defer: dict[str, datetime], now: datetime) -> None:
    """Move the due deliveries of endpoints whose circuit is open to when it lets a probe
    through ({subscription_id: until}), so claims do not wade through them."""
    for subscription_id, until in sorted(defer.items()):
        repo.defer_due_deliveries(session, subscription_id, until, now)


async def defer_open_endpoints_pg(
    connection: AsyncConnection[Any], defer: dict[str, datetime], now: datetime
) -> None:
    """`defer_open_endpoints` in one statement (PostgreSQL, on a psycopg connection outside a
    transaction)."""
    await repo.defer_due_deliveries_pg(connection, defer, now)


async def claim_due_deliveries_pg(
    connection: AsyncConnection[Any],
    now: datetime,
    limit: int,
    lease: timedelta,
    *,
    blocked: Sequence[str],
    rooms: dict[str, int],
    default_room: int,
) -> tuple[list[ClaimedDelivery], int]:
    """`claim_due_deliveries` in one statement (PostgreSQL, on a psycopg connection outside a
    transaction): `rooms` {subscription_id: free room} replaces `capacity`, with `default_room`
    for endpoints not in it; `blocked` endpoints are not looked at. Returns (claimed, parked)."""
    rows, parked = await repo.claim_due_rows_pg(
        connection, now, limit, now + lease, blocked=blocked, rooms=rooms,
        default_room=default_room, deleted_reason=DELETED_REASON, max_error=MAX_ERROR_CHARS,
    )
    return [
        ClaimedDelivery(
            row.delivery_id, row.url, row.secret, row.payload, row.attempts,
            subscription_id=row.subscription_id, tenant_id=row.tenant_id,
            previous_secrets=row.previous_secrets, created_at=row.created_at,
        )
        for row in rows
    ], parked


async def record_successes_pg(
    connection: AsyncConnection[Any],
    attempts: Sequence[tuple[ClaimedDelivery, AttemptResult]],
    now: datetime,
) -> list[AttemptOutcome]:
    """Book successful (2xx) attempts in one statement (PostgreSQL, on a psycopg connection
    outside a transaction): "delivered", or "stale" for a delivery replayed, parked or booked elsewhere
    meanwhile. Failed attempts go through `record_attempts`."""
    booked = await repo.book_delivered_pg(connection, [
        (claimed.delivery_id, claimed.attempts, result.status_code or 0,
         round(result.latency_ms, 3))
        for claimed, result in attempts
    ], now)
    return ["delivered" if claimed.delivery_id in booked else "stale" for claimed, _ in attempts]


@dataclass(frozen=True)
class RetryPolicy:
    schedule: Sequence[float]
    jitter: float = 0.0
    retry_after_cap_s: float = 3_600.0
    rng: Callable[[], float] = random.random


@dataclass(frozen=True)
class FailedAttempt:
    """What a failed attempt (not 2xx, not 410) does to its delivery: retried at
    `next_attempt_at`, or parked once the schedule is spent. `error` goes to the attempt log,
    `last_error` on the delivery."""

    outcome: AttemptOutcome
    error: str
    last_error: str
    next_attempt_at: datetime | None  # None: parked


def decide_failure(
    attempts: int, result: AttemptResult, now: datetime, policy: RetryPolicy
) -> FailedAttempt:
    """`attempts`: the delivery's attempts including this one."""
    error = result.error or f"receiver answered HTTP {result.status_code}"
    delay = retry_delay(attempts, policy.schedule, policy.jitter, policy.rng)
    if delay is None:
        reason = f"retry schedule exhausted after {attempts} attempts; last error: {error}"
        return FailedAttempt("parked", error, reason[:MAX_ERROR_CHARS], None)
    outcome: AttemptOutcome = "error" if result.error else "failed"
    if result.status_code in (429, 503):
        outcome = "rate_limited"
        wait = parse_retry_after(result.retry_after, now)
        if wait is not None:
            delay = max(delay, timedelta(seconds=min(wait, policy.retry_after_cap_s)))
            error = f"{error}; Retry-After {result.retry_after}"
    return FailedAttempt(outcome, error, error[:MAX_ERROR_CHARS], now + delay)


async def record_failures_pg(
    connection: AsyncConnection[Any],
    attempts: Sequence[tuple[ClaimedDelivery, AttemptResult]],
    now: datetime,
    policy: RetryPolicy,
) -> list[AttemptOutcome]:
    """Book failed attempts that only reschedule or park their delivery (not 410, which disables
    the subscription: `record_attempts`) in one statement (PostgreSQL, on a psycopg connection
    outside a transaction), with their attempt-log rows; "stale" for a delivery replayed, parked
    or booked elsewhere meanwhile."""
    decided = [decide_failure(claimed.attempts + 1, result, now, policy)
               for claimed, result in attempts]
    booked = await repo.book_failed_pg(connection, [
        (claimed.delivery_id, claimed.attempts, result.status_code, round(result.latency_ms, 3),
         failed.outcome, failed.error[:MAX_ERROR_CHARS], failed.last_error, failed.next_attempt_at)
        for (claimed, result), failed in zip(attempts, decided, strict=True)
    ], now)
    return [failed.outcome if claimed.delivery_id in booked else "stale"
            for (claimed, _), failed in zip(attempts, decided, strict=True)]


def record_attempt(
    session: Session,
    claimed: ClaimedDelivery,
    result: AttemptResult,
    now: datetime,
    policy: RetryPolicy | Sequence[float],
) -> AttemptOutcome:
    """Book one attempt (see `record_attempts`)."""
    return record_attempts(session, [(claimed, result)], now, policy)[0]


def record_attempts(
    session: Session,
    attempts: Sequence[tuple[ClaimedDelivery, AttemptResult]],
    now: datetime,
    policy: RetryPolicy | Sequence[float],
) -> list[AttemptOutcome]:
    """Book attempts in the attempt log and on their deliveries: delivered on 2xx; 410 disables
    the subscription and parks its pending deliveries; otherwise schedule the next retry (not
    before a 429/503's Retry-After), or park the delivery (replayable) once the schedule is
    spent. A delivery replayed, parked or booked elsewhere meanwhile is left alone ("stale")."""
    if not isinstance(policy, RetryPolicy):
        policy = RetryPolicy(schedule=policy)
    outcomes: dict[int, AttemptOutcome] = {}
    successes = [
        i for i, (_, result) in enumerate(attempts) if result.ok and result.status_code is not None
    ]
    booked_pg = repo.book_delivered(session, [
        (attempts[i][0].delivery_id, attempts[i][0].attempts, attempts[i][1].status_code or 0,
         round(attempts[i][1].latency_ms, 3))
        for i in successes
    ], now)
    if booked_pg is not None:  # PostgreSQL: one statement for all successes
        for i in successes:
            outcomes[i] = "delivered" if attempts[i][0].delivery_id in booked_pg else "stale"
    else:
        _book_successes(session, attempts, successes, now, outcomes)
    # Failures row by row: each may schedule, park, or disable its subscription.
    rest = [i for i in range(len(attempts)) if i not in outcomes]
    rows = repo.lock_deliveries(session, [attempts[i][0].delivery_id for i in rest])
    for i in rest:
        claimed, result = attempts[i]
        outcomes[i] = _book(session, rows.get(claimed.delivery_id), claimed, result, now, policy)
    return [outcomes[i] for i in range(len(attempts))]


def _book_successes(
    session: Session,
    attempts: Sequence[tuple[ClaimedDelivery, AttemptResult]],
    successes: Sequence[int],
    now: datetime,
    outcomes: dict[int, AttemptOutcome],
) -> None:
    """Successes in one UPDATE per (attempt count, status) and one INSERT (SQLite)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index in successes:
        claimed, result = attempts[index]
        assert result.status_code is not None
        groups.setdefault((claimed.attempts, result.status_code), []).append(index)
    log_rows = []
    for (attempts_before, status_code), indexes in groups.items():
        booked = dict(
            repo.mark_delivered(
                session,
                [attempts[i][0].delivery_id for i in indexes],
                attempts_before,
                status_code,
                now,
            )
        )
        for i in indexes:
            claimed, result = attempts[i]
            if claimed.delivery_id not in booked:
                outcomes[i] = "stale"
                continue
            outcomes[i] = "delivered"
            log_rows.append(
                {
                    "delivery_id": claimed.delivery_id,
                    "tenant_id": booked[claimed.delivery_id],
                    "outcome": "delivered",
                    "status_code": status_code,
                    "error": None,
                    "latency_ms": round(result.latency_ms, 3),
                    "attempted_at": now,
                }
            )
    if log_rows:
        session.execute(insert(ActionsDeliveryAttempt), log_rows)


def _book(
    session: Session,
    row: ActionsDelivery | None,
    claimed: ClaimedDelivery,
    result: AttemptResult,
    now: datetime,
    policy: RetryPolicy,
) -> AttemptOutcome:
    if row is None or row.status != "pending" or row.attempts != claimed.attempts:
        return "stale"  # replayed, parked or handled elsewhere meanwhile
    row.attempts += 1
    row.last_status_code = result.status_code
    row.leased_until = None  # booked: no longer held (due again at next_attempt_at, if retried)
    error = result.error or (None if result.ok else f"receiver answered HTTP {result.status_code}")
    outcome: AttemptOutcome
    if result.ok:
        row.status = "delivered"
        row.delivered_at = now
        row.last_error = None
        outcome = "delivered"
    elif result.status_code == 410:
        row.last_error = GONE_REASON
        subscription = repo.lock_subscription(session, claimed.subscription_id)
        if subscription is not None and subscription.active:
            _disable(session, subscription, GONE_REASON, now)
        _park(row, GONE_REASON)
        outcome = "gone"
    else:
        decided = decide_failure(row.attempts, result, now, policy)
        outcome, error = decided.outcome, decided.error
        row.last_error = decided.last_error
        if decided.next_attempt_at is None:
            row.status = "parked"
        else:
            row.next_attempt_at = decided.next_attempt_at
    session.add(row)
    session.add(
        ActionsDeliveryAttempt(
            delivery_id=row.delivery_id,
            tenant_id=row.tenant_id,
            outcome=outcome,
            status_code=result.status_code,
            error=error[:MAX_ERROR_CHARS] if error else None,
            latency_ms=round(result.latency_ms, 3),
            attempted_at=now,
        )
    )
    return outcome


async def release_claims_pg(
    connection: AsyncConnection[Any], claimed: Sequence[ClaimedDelivery], now: datetime
) -> int:
    """`release_claims` in one statement (PostgreSQL, on a psycopg connection outside a
    transaction)."""
    return await repo.release_pg(connection, [(c.delivery_id, c.attempts) for c in claimed], now)


def release_claims(session: Session, claimed: Sequence[ClaimedDelivery], now: datetime) -> int:
    """Hand back claimed deliveries that were not attempted: due again at `now` (the worker
    stops; or the endpoint's circuit opened, then `now` is when it lets a probe through)
    instead of after their lease. Returns how many."""
    rows = repo.lock_deliveries(session, [c.delivery_id for c in claimed])
    released = 0
    for item in claimed:
        row = rows.get(item.delivery_id)
        if row is not None and row.status == "pending" and row.attempts == item.attempts:
            row.next_attempt_at = now
            row.leased_until = None
            session.add(row)
            released += 1
    return released


def _park(delivery: ActionsDelivery, reason: str) -> None:
    delivery.status = "parked"
    delivery.last_error = reason[:MAX_ERROR_CHARS]


def outbox_counts(session: Session) -> dict[str, int]:
    return repo.count_open_deliveries(session)
