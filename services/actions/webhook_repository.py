"""All SQL of the webhook part of the actions service (subscriptions, secrets, the outbox and
its attempt log).

Tenant-facing queries always filter by tenant_id. The delivery worker's queries (claiming due
deliveries, counting the outbox) are system-wide by nature and say so in their docstrings.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from sqlalchemy import ColumnElement, bindparam, func, or_, text, update
from sqlmodel import Session, col, select

from services.actions.tables import (
    ActionsDelivery,
    ActionsDeliveryAttempt,
    ActionsWebhookSecret,
    ActionsWebhookSubscription,
)
from shared.secret_box import box

# --- subscriptions and secrets -------------------------------------------------------


def get_subscription(
    session: Session, tenant_id: str, subscription_id: str
) -> ActionsWebhookSubscription | None:
    return session.exec(
        select(ActionsWebhookSubscription).where(
            ActionsWebhookSubscription.tenant_id == tenant_id,
            ActionsWebhookSubscription.id == subscription_id,
        )
    ).first()


def active_subscriptions(session: Session, tenant_id: str) -> Sequence[ActionsWebhookSubscription]:
    return session.exec(
        select(ActionsWebhookSubscription)
        .where(
            ActionsWebhookSubscription.tenant_id == tenant_id,
            col(ActionsWebhookSubscription.active).is_(True),
        )
        .order_by(col(ActionsWebhookSubscription.created_at), col(ActionsWebhookSubscription.id))
    ).all()


def active_subscription_events(session: Session, tenant_id: str) -> list[tuple[str, list[str]]]:
    """(id, event types) of the tenant's active subscriptions, oldest first (no secrets read)."""
    rows = session.execute(_ACTIVE_SUBSCRIPTIONS, {"tenant_id": tenant_id}).all()
    return [(row[0], list(row[1] or [])) for row in rows]


# Built once: building it cost more CPU than running it (read once per decision batch).
_ACTIVE_SUBSCRIPTIONS = (
    select(ActionsWebhookSubscription.id, ActionsWebhookSubscription.event_types)
    .where(ActionsWebhookSubscription.tenant_id == bindparam("tenant_id"),
           col(ActionsWebhookSubscription.active).is_(True))
    .order_by(col(ActionsWebhookSubscription.created_at), col(ActionsWebhookSubscription.id))
)


def subscriptions_by_id(
    session: Session, ids: Sequence[str]
) -> dict[str, ActionsWebhookSubscription]:
    """System-wide (the worker)."""
    if not ids:
        return {}
    rows = session.exec(
        select(ActionsWebhookSubscription).where(col(ActionsWebhookSubscription.id).in_(list(ids)))
    ).all()
    return {row.id: row for row in rows}


def live_previous_secrets(
    session: Session, subscription_ids: Sequence[str], now: datetime
) -> dict[str, list[str]]:
    """Previous secrets still inside their rotation overlap, newest first, per subscription."""
    if not subscription_ids:
        return {}
    if _postgres(session):
        found: dict[str, list[str]] = {}
        for subscription_id, secret in _driver(
            session, _PG_PREVIOUS_SECRETS, {"ids": list(subscription_ids), "now": now}
        ):
            found.setdefault(subscription_id, []).append(_decrypt(secret))
        return found
    rows = session.exec(
        select(ActionsWebhookSecret)
        .where(
            col(ActionsWebhookSecret.subscription_id).in_(list(subscription_ids)),
            col(ActionsWebhookSecret.expires_at) > now,
        )
        .order_by(col(ActionsWebhookSecret.created_at).desc())
    ).all()
    result: dict[str, list[str]] = {}
    for row in rows:
        result.setdefault(row.subscription_id, []).append(row.secret)
    return result


# --- deliveries (tenant-facing) --------------------------------------------------------


def read_one_snapshot(session: Session) -> None:
    """Make the rest of this (read) transaction see one snapshot, so a delivery and its attempt
    log read by two queries agree. PostgreSQL reads each statement's own snapshot by default;
    SQLite already reads one snapshot per transaction. Must come first in the transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))


def get_delivery(session: Session, tenant_id: str, delivery_id: str) -> ActionsDelivery | None:
    return session.exec(
        select(ActionsDelivery).where(
            ActionsDelivery.tenant_id == tenant_id, ActionsDelivery.delivery_id == delivery_id
        )
    ).first()


def list_deliveries(
    session: Session,
    tenant_id: str,
    *,
    status: str | None = None,
    subscription_id: str | None = None,
    created_from: datetime | None = None,
    created_to: datetime | None = None,
    limit: int = 100,
    lock: bool = False,
) -> Sequence[ActionsDelivery]:
    """Newest first. `created_from` is inclusive, `created_to` exclusive."""
    query = select(ActionsDelivery).where(ActionsDelivery.tenant_id == tenant_id)
    if status is not None:
        query = query.where(ActionsDelivery.status == status)
    if subscription_id is not None:
        query = query.where(ActionsDelivery.subscription_id == subscription_id)
    if created_from is not None:
        query = query.where(col(ActionsDelivery.created_at) >= created_from)
    if created_to is not None:
        query = query.where(col(ActionsDelivery.created_at) < created_to)
    query = query.order_by(
        col(ActionsDelivery.created_at).desc(), col(ActionsDelivery.delivery_id)
    ).limit(limit)
    if lock:
        query = query.with_for_update()
    return session.exec(query).all()


def attempts_of(
    session: Session, tenant_id: str, delivery_ids: Sequence[str]
) -> dict[str, list[ActionsDeliveryAttempt]]:
    if not delivery_ids:
        return {}
    rows = session.exec(
        select(ActionsDeliveryAttempt)
        .where(
            ActionsDeliveryAttempt.tenant_id == tenant_id,
            col(ActionsDeliveryAttempt.delivery_id).in_(list(delivery_ids)),
        )
        .order_by(col(ActionsDeliveryAttempt.attempted_at), col(ActionsDeliveryAttempt.id))
    ).all()
    result: dict[str, list[ActionsDeliveryAttempt]] = {}
    for row in rows:
        result.setdefault(row.delivery_id, []).append(row)
    return result


def pending_deliveries_of_subscription(
    session: Session, subscription_id: str
) -> Sequence[ActionsDelivery]:
    return session.exec(
        select(ActionsDelivery).where(
            ActionsDelivery.subscription_id == subscription_id,
            ActionsDelivery.status == "pending",
        )
    ).all()


# --- deliveries (the worker: system-wide) ---------------------------------------------


def not_leased(d: type[ActionsDelivery], now: datetime) -> ColumnElement[bool]:
    """No worker holds the row (never claimed, booked or released since, or its lease ran out)."""
    return or_(col(d.leased_until).is_(None), col(d.leased_until) <= now)


def lock_due_deliveries(
    session: Session, now: datetime, limit: int, exclude_subscriptions: Sequence[str] = ()
) -> Sequence[ActionsDelivery]:
    """Due pending deliveries, oldest first, row-locked, skipping subscriptions the worker
    cannot send to right now (open circuit, no free slot). On PostgreSQL `FOR UPDATE SKIP
    LOCKED` lets several workers claim disjoint rows; SQLite ignores it (one writer anyway)."""
    query = select(ActionsDelivery).where(
        ActionsDelivery.status == "pending", col(ActionsDelivery.next_attempt_at) <= now,
        not_leased(ActionsDelivery, now),
    )
    if exclude_subscriptions:
        query = query.where(col(ActionsDelivery.subscription_id).not_in(list(exclude_subscriptions)))
    return session.exec(
        query.order_by(col(ActionsDelivery.next_attempt_at), col(ActionsDelivery.delivery_id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


# The worker's hot path on PostgreSQL is plain SQL through the driver: building, caching and
# compiling SQLAlchemy statements and ORM objects cost more CPU per delivery than sending it.

_PG_DUE = """
SELECT delivery_id, subscription_id, tenant_id, payload, attempts, created_at
FROM actions_deliveries
WHERE status = 'pending' AND next_attempt_at <= %(now)s
  AND (leased_until IS NULL OR leased_until <= %(now)s)
  AND NOT (subscription_id = ANY(%(blocked)s::varchar[]))
ORDER BY next_attempt_at, delivery_id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
_PG_SUBSCRIPTIONS = """
SELECT id, url, secret, active, disabled_reason FROM actions_webhook_subscriptions
WHERE id = ANY(%(ids)s::varchar[])
"""
_PG_PREVIOUS_SECRETS = """
SELECT subscription_id, secret FROM actions_webhook_secrets
WHERE subscription_id = ANY(%(ids)s::varchar[]) AND expires_at > %(now)s
ORDER BY created_at DESC
"""
_PG_LEASE = """
UPDATE actions_deliveries SET leased_until = %(until)s WHERE delivery_id = ANY(%(ids)s::varchar[])
"""
# The statements that book or release claimed rows find them by primary key. Their status check
# is written `(d.status = 'pending') IS TRUE`, which no index matches: with plain `status =
# 'pending'`, statistics taken while pending rows were rare (most are delivered) made the planner
# read every pending row through the due index instead, so a hanging endpoint's backlog (3,000
# rows: 13 ms for a booking of 5, against 0.8) slowed every other endpoint's bookings.
_PG_DELIVERED = """
WITH booked AS (
  UPDATE actions_deliveries AS d
  SET status = 'delivered', attempts = d.attempts + 1, delivered_at = %(now)s,
      last_status_code = r.status_code, last_error = NULL, leased_until = NULL
  FROM unnest(%(ids)s::varchar[], %(attempts)s::int[], %(codes)s::int[], %(latency)s::float8[])
       AS r(delivery_id, attempts, status_code, latency_ms)
  WHERE d.delivery_id = r.delivery_id AND (d.status = 'pending') IS TRUE AND d.attempts = r.attempts
  RETURNING d.delivery_id, d.tenant_id, r.status_code, r.latency_ms
)
INSERT INTO actions_delivery_attempts
  (delivery_id, tenant_id, outcome, status_code, error, latency_ms, attempted_at)
SELECT delivery_id, tenant_id, 'delivered', status_code, NULL, latency_ms, %(now)s FROM booked
RETURNING delivery_id
"""


# The worker's claim on PostgreSQL in one statement (run outside a transaction: the statement is
# atomic by itself): find the oldest due rows (narrow: ids, endpoint, due time), rank them per
# endpoint against its room, lock only those to lease or park (SKIP LOCKED, re-checking that each
# is still pending and due, so a row leased or booked by another worker meanwhile is left alone),
# lease the rows of active subscriptions, park those of inactive or missing ones, and return the
# leased rows with their payload, URL, secret and the previous secrets still inside a rotation
# overlap (newest first).
# Only the rows taken are locked and read whole: locking all `limit` candidates (FOR UPDATE writes
# each row) and sorting them with their payloads cost ~2x the server CPU of a claim whose
# endpoint had room for a quarter of them (the usual refill of a busy endpoint's queue).
# Rows under a lease keep their place in the due index and are passed over (at most a worker's
# queues and attempts in flight, ~1,000 rows with the defaults): the price of a lease outside
# every index, which makes leasing a HOT update (ActionsDelivery).
# Ordered by next_attempt_at alone, so the (status, next_attempt_at) index hands the rows over in
# order and the LIMIT stops the scan: a tie-break on delivery_id sorted every due row first
# (3,000 due rows written at one instant: 4 ms per claim instead of well under 1 ms).
_PG_CLAIM = """
WITH due AS (
  SELECT delivery_id, subscription_id, next_attempt_at
  FROM actions_deliveries
  WHERE status = 'pending' AND next_attempt_at <= %(now)s
    AND NOT (subscription_id = ANY(%(blocked)s::varchar[]))
    AND (leased_until IS NULL OR leased_until <= %(now)s)
  ORDER BY next_attempt_at
  LIMIT %(limit)s
), ranked AS (
  SELECT due.delivery_id, due.subscription_id, coalesce(s.active, false) AS active,
         row_number() OVER (
           PARTITION BY due.subscription_id ORDER BY due.next_attempt_at, due.delivery_id
         ) AS nth
  FROM due LEFT JOIN actions_webhook_subscriptions AS s ON s.id = due.subscription_id
), room AS (
  SELECT * FROM unnest(%(room_ids)s::varchar[], %(rooms)s::int[]) AS r(subscription_id, room)
), picked AS (
  SELECT ranked.delivery_id, ranked.active FROM ranked
  LEFT JOIN room ON room.subscription_id = ranked.subscription_id
  WHERE NOT ranked.active OR ranked.nth <= coalesce(room.room, %(default_room)s)
), locked AS (
  -- Through the primary key only. A row changed by another worker since this statement's
  -- snapshot comes back as its latest version (or is skipped while locked): `taken` re-checks it.
  SELECT d.delivery_id, d.subscription_id, d.tenant_id, d.payload, d.attempts, d.created_at,
         d.next_attempt_at, d.leased_until, d.status, picked.active
  FROM picked JOIN actions_deliveries AS d ON d.delivery_id = picked.delivery_id
  FOR UPDATE OF d SKIP LOCKED
), taken AS (
  SELECT * FROM locked WHERE status = 'pending' AND next_attempt_at <= %(now)s
    AND (leased_until IS NULL OR leased_until <= %(now)s)
), leased AS (
  UPDATE actions_deliveries AS d SET leased_until = %(until)s
  FROM taken WHERE d.delivery_id = taken.delivery_id AND taken.active
  RETURNING d.delivery_id, d.subscription_id, d.tenant_id, d.payload, d.attempts, d.created_at,
            taken.next_attempt_at AS due_at
), parked AS (
  UPDATE actions_deliveries AS d
  SET status = 'parked',
      last_error = left(coalesce(s.disabled_reason, %(deleted)s), %(max_error)s)
  FROM taken LEFT JOIN actions_webhook_subscriptions AS s ON s.id = taken.subscription_id
  WHERE d.delivery_id = taken.delivery_id AND NOT taken.active
  RETURNING d.delivery_id
)
SELECT r.delivery_id, r.subscription_id, r.tenant_id, r.payload, r.attempts, r.created_at,
       s.url, s.secret,
       (SELECT array_agg(w.secret ORDER BY w.created_at DESC) FROM actions_webhook_secrets AS w
        WHERE w.subscription_id = r.subscription_id AND w.expires_at > %(now)s) AS previous,
       r.due_at
FROM leased AS r JOIN actions_webhook_subscriptions AS s ON s.id = r.subscription_id
UNION ALL
SELECT delivery_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM parked
ORDER BY 10, 1
"""


@dataclass(frozen=True)
class _DueRow:
    delivery_id: str
    subscription_id: str
    tenant_id: str
    payload: str
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class ClaimedRow(_DueRow):
    """A leased outbox row with what sending it needs (secrets decrypted)."""

    url: str
    secret: str
    previous_secrets: tuple[str, ...]


async def claim_due_rows_pg(
    connection: AsyncConnection[Any],
    now: datetime,
    limit: int,
    until: datetime,
    *,
    blocked: Sequence[str],
    rooms: dict[str, int],
    default_room: int,
    deleted_reason: str,
    max_error: int,
) -> tuple[list[ClaimedRow], int]:
    """System-wide (the worker), PostgreSQL only, one statement on a psycopg connection outside
    a transaction (see _PG_CLAIM). Returns (leased rows, oldest due first; how many parked)."""
    cursor = await connection.execute(_PG_CLAIM, {
        "now": now, "limit": limit, "until": until, "blocked": list(blocked),
        "room_ids": list(rooms), "rooms": list(rooms.values()), "default_room": default_room,
        "deleted": deleted_reason, "max_error": max_error,
    })
    rows = await cursor.fetchall()
    claimed: list[ClaimedRow] = []
    parked = 0
    for row in rows:
        if row[1] is None:
            parked += 1
            continue
        claimed.append(ClaimedRow(
            row[0], row[1], row[2], row[3], row[4], row[5], row[6], _decrypt(row[7]),
            tuple(_decrypt(secret) for secret in row[8] or ()),
        ))
    return claimed, parked


async def book_delivered_pg(
    connection: AsyncConnection[Any], booked: Sequence[tuple[str, int, int, float]], now: datetime
) -> set[str]:
    """`book_delivered` as one statement on a psycopg connection outside a transaction (atomic
    by itself: the deliveries and their attempt-log rows together)."""
    if not booked:
        return set()
    cursor = await connection.execute(_PG_DELIVERED, {
        "now": now, "ids": [b[0] for b in booked], "attempts": [b[1] for b in booked],
        "codes": [b[2] for b in booked], "latency": [b[3] for b in booked],
    })
    return {row[0] for row in await cursor.fetchall()}


# Failed attempts that reschedule (next_at) or park (next_at NULL) their delivery, with their
# attempt-log rows; only rows still pending at the attempt count the worker claimed them at.
_PG_FAILED = """
WITH booked AS (
  UPDATE actions_deliveries AS d
  SET attempts = d.attempts + 1, last_status_code = r.status_code, last_error = r.last_error,
      status = CASE WHEN r.next_at IS NULL THEN 'parked' ELSE 'pending' END,
      next_attempt_at = coalesce(r.next_at, d.next_attempt_at), leased_until = NULL
  FROM unnest(%(ids)s::varchar[], %(attempts)s::int[], %(codes)s::int[], %(latency)s::float8[],
              %(outcomes)s::varchar[], %(errors)s::varchar[], %(last_errors)s::varchar[],
              %(next_at)s::timestamptz[])
       AS r(delivery_id, attempts, status_code, latency_ms, outcome, error, last_error, next_at)
  WHERE d.delivery_id = r.delivery_id AND (d.status = 'pending') IS TRUE AND d.attempts = r.attempts
  RETURNING d.delivery_id, d.tenant_id, r.outcome, r.status_code, r.error, r.latency_ms
)
INSERT INTO actions_delivery_attempts
  (delivery_id, tenant_id, outcome, status_code, error, latency_ms, attempted_at)
SELECT delivery_id, tenant_id, outcome, status_code, error, latency_ms, %(now)s FROM booked
RETURNING delivery_id
"""


async def book_failed_pg(
    connection: AsyncConnection[Any],
    booked: Sequence[tuple[str, int, int | None, float, str, str, str, datetime | None]],
    now: datetime,
) -> set[str]:
    """Failed attempts (delivery id, attempts before, status code, latency ms, outcome, error
    for the log, last error for the delivery, next attempt or None to park) in one statement on
    a psycopg connection outside a transaction. Returns the ids of the booked ones."""
    if not booked:
        return set()
    columns = list(zip(*booked, strict=True))
    cursor = await connection.execute(_PG_FAILED, {
        "now": now, "ids": list(columns[0]), "attempts": list(columns[1]),
        "codes": list(columns[2]), "latency": list(columns[3]), "outcomes": list(columns[4]),
        "errors": list(columns[5]), "last_errors": list(columns[6]), "next_at": list(columns[7]),
    })
    return {row[0] for row in await cursor.fetchall()}


_PG_RELEASE = """
UPDATE actions_deliveries AS d SET next_attempt_at = %(at)s, leased_until = NULL
FROM unnest(%(ids)s::varchar[], %(attempts)s::int[]) AS r(delivery_id, attempts)
WHERE d.delivery_id = r.delivery_id AND (d.status = 'pending') IS TRUE AND d.attempts = r.attempts
"""


async def release_pg(
    connection: AsyncConnection[Any], claimed: Sequence[tuple[str, int]], at: datetime
) -> int:
    """Claimed rows (delivery id, attempts at the claim) not attempted: due again at `at`, if
    still pending at that attempt count. One statement outside a transaction; returns how many."""
    if not claimed:
        return 0
    cursor = await connection.execute(_PG_RELEASE, {
        "at": at, "ids": [c[0] for c in claimed], "attempts": [c[1] for c in claimed]})
    return cursor.rowcount


# `defer_due_deliveries` for several subscriptions in one statement (each row through the
# (subscription_id, offer_id) index, as there).
_PG_DEFER = """
UPDATE actions_deliveries AS d SET next_attempt_at = r.until
FROM unnest(%(ids)s::varchar[], %(untils)s::timestamptz[]) AS r(subscription_id, until)
WHERE d.subscription_id = r.subscription_id AND d.status = 'pending'
  AND d.next_attempt_at <= %(now)s AND (d.leased_until IS NULL OR d.leased_until <= %(now)s)
"""


async def defer_due_deliveries_pg(
    connection: AsyncConnection[Any], defer: dict[str, datetime], now: datetime
) -> None:
    """`defer_due_deliveries` for each {subscription_id: until}, one statement on a psycopg
    connection outside a transaction."""
    if defer:
        ids = sorted(defer)
        await connection.execute(_PG_DEFER, {
            "ids": ids, "untils": [defer[i] for i in ids], "now": now})


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _driver(session: Session, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    result = session.connection().exec_driver_sql(sql, params)
    return [tuple(row) for row in result] if result.returns_rows else []


@functools.lru_cache(maxsize=1024)
def _decrypt(stored: str) -> str:
    return box().decrypt(stored)


@dataclass(frozen=True)
class ClaimSubscription:
    """What the worker needs of a subscription to send (or park) its deliveries."""

    id: str
    url: str
    secret: str
    active: bool
    disabled_reason: str | None


def claim_subscriptions(session: Session, ids: Sequence[str]) -> dict[str, ClaimSubscription]:
    """System-wide (the worker): the subscriptions of claimed rows, secrets decrypted."""
    if not ids:
        return {}
    if _postgres(session):
        rows = _driver(session, _PG_SUBSCRIPTIONS, {"ids": list(ids)})
        return {
            row[0]: ClaimSubscription(row[0], row[1], _decrypt(row[2]), bool(row[3]), row[4])
            for row in rows
        }
    return {
        sid: ClaimSubscription(s.id, s.url, s.secret, s.active, s.disabled_reason)
        for sid, s in subscriptions_by_id(session, ids).items()
    }


def book_delivered(
    session: Session, booked: Sequence[tuple[str, int, int, float]], now: datetime
) -> set[str] | None:
    """Book successful attempts (delivery id, attempts before, status code, latency ms) and
    their attempt-log rows in one statement; only rows still pending with the attempt count the
    worker claimed them at. Returns the ids of the booked ones; None when the database is not
    PostgreSQL (the caller books them the portable way)."""
    if not _postgres(session):
        return None
    if not booked:
        return set()
    rows = _driver(session, _PG_DELIVERED, {
        "now": now, "ids": [b[0] for b in booked], "attempts": [b[1] for b in booked],
        "codes": [b[2] for b in booked], "latency": [b[3] for b in booked],
    })
    return {row[0] for row in rows}


def lock_due_delivery_rows(
    session: Session, now: datetime, limit: int, exclude_subscriptions: Sequence[str] = ()
) -> Sequence[Any]:
    """`lock_due_deliveries` as plain rows (no ORM objects: the worker's hot path)."""
    if _postgres(session):
        return [
            _DueRow(*row)
            for row in _driver(session, _PG_DUE, {
                "now": now, "limit": limit, "blocked": list(exclude_subscriptions),
            })
        ]
    d = ActionsDelivery
    query = select(
        d.delivery_id, d.subscription_id, d.tenant_id, d.payload, d.attempts, d.created_at
    ).where(d.status == "pending", col(d.next_attempt_at) <= now, not_leased(d, now))
    if exclude_subscriptions:
        query = query.where(col(d.subscription_id).not_in(list(exclude_subscriptions)))
    return session.exec(
        query.order_by(col(d.next_attempt_at), col(d.delivery_id))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()


def lease_deliveries(session: Session, delivery_ids: Sequence[str], until: datetime) -> None:
    """Claimed rows are due again only at `until` (their lease)."""
    if not delivery_ids:
        return
    if _postgres(session):
        _driver(session, _PG_LEASE, {"until": until, "ids": list(delivery_ids)})
    else:
        set_deliveries(session, delivery_ids, leased_until=until)


def set_deliveries(session: Session, delivery_ids: Sequence[str], **values: Any) -> None:
    if delivery_ids:
        session.execute(
            update(ActionsDelivery)
            .where(col(ActionsDelivery.delivery_id).in_(list(delivery_ids)))
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def defer_due_deliveries(
    session: Session, subscription_id: str, until: datetime, now: datetime
) -> None:
    """Move a subscription's due pending deliveries to `until` (its circuit is open), so the
    claim query does not wade through them on every round. Uses the (subscription_id, offer_id)
    unique index."""
    session.execute(
        update(ActionsDelivery)
        .where(
            ActionsDelivery.subscription_id == subscription_id,
            ActionsDelivery.status == "pending",
            col(ActionsDelivery.next_attempt_at) <= now,
            not_leased(ActionsDelivery, now),
        )
        .values(next_attempt_at=until)
        .execution_options(synchronize_session=False)
    )


def mark_delivered(
    session: Session, delivery_ids: Sequence[str], attempts_before: int, status_code: int,
    now: datetime,
) -> list[tuple[str, str]]:
    """Book successful attempts in one statement; only rows still pending with the attempt
    count the worker claimed them at are changed. Returns (delivery_id, tenant_id) of those."""
    result = session.execute(
        update(ActionsDelivery)
        .where(
            col(ActionsDelivery.delivery_id).in_(list(delivery_ids)),
            ActionsDelivery.status == "pending",
            ActionsDelivery.attempts == attempts_before,
        )
        .values(
            status="delivered",
            attempts=attempts_before + 1,
            delivered_at=now,
            last_status_code=status_code,
            last_error=None,
            leased_until=None,
        )
        .returning(ActionsDelivery.delivery_id, ActionsDelivery.tenant_id)
        .execution_options(synchronize_session=False)
    )
    return [(row[0], row[1]) for row in result]


def lock_delivery(session: Session, delivery_id: str) -> ActionsDelivery | None:
    return session.exec(
        select(ActionsDelivery).where(ActionsDelivery.delivery_id == delivery_id).with_for_update()
    ).first()


def lock_deliveries(session: Session, delivery_ids: Sequence[str]) -> dict[str, ActionsDelivery]:
    """Row-lock several deliveries in one round trip (booking a batch of attempts)."""
    if not delivery_ids:
        return {}
    rows = session.exec(
        select(ActionsDelivery)
        .where(col(ActionsDelivery.delivery_id).in_(sorted(delivery_ids)))
        .order_by(col(ActionsDelivery.delivery_id))  # one lock order: no deadlocks between workers
        .with_for_update()
    ).all()
    return {row.delivery_id: row for row in rows}


def lock_subscription(session: Session, subscription_id: str) -> ActionsWebhookSubscription | None:
    return session.exec(
        select(ActionsWebhookSubscription)
        .where(ActionsWebhookSubscription.id == subscription_id)
        .with_for_update()
    ).first()


def count_open_deliveries(session: Session) -> dict[str, int]:
    """Pending and parked deliveries, by status (delivered rows are history and not counted)."""
    rows = session.exec(
        select(ActionsDelivery.status, func.count())
        .where(col(ActionsDelivery.status).in_(["pending", "parked"]))
        .group_by(ActionsDelivery.status)
    ).all()
    return {status: count for status, count in rows}
