"""The delivery worker's one-statement claim, bookings and release on PostgreSQL
(`claim_due_deliveries_pg`, `record_successes_pg`, `record_failures_pg`, `release_claims_pg`), on
a real database: what the portable session path does (rooms per endpoint, parking rows of
inactive subscriptions, the lease, previous secrets inside a rotation, retries and parking) in
one statement each; and many outcomes booked in one statement. SQLite keeps the portable path
(its own tests are the worker tests in the other files), so these are skipped there."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlmodel import select

from services.actions import webhook_repository, webhooks
from services.actions.delivery import DeliveryWorker, PooledSender, WorkerConnection
from services.actions.tables import ActionsDelivery, ActionsDeliveryAttempt, ActionsOffer
from services.actions.url_guard import UrlPolicy
from services.actions.webhooks import AttemptResult
from shared.clock import ManualClock
from shared.db import session_scope
from tests.actions.actions_support import START, TENANT
from tests.actions.test_actions_guardrails import engine  # noqa: F401

LEASE = timedelta(minutes=2)


@pytest.fixture
async def pg(engine: Engine) -> AsyncIterator[tuple[Engine, WorkerConnection]]:  # noqa: F811
    if engine.dialect.name != "postgresql":
        pytest.skip("the one-statement claim and booking are PostgreSQL's")
    connection = WorkerConnection(engine)
    try:
        yield engine, connection
    finally:
        await connection.close()


class Counting:
    """The real psycopg connection, counting the statements sent through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.statements = 0

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        return await self.inner.execute(*args, **kwargs)


def _subscribe(engine: Engine, url: str = "http://127.0.0.1:9/hook") -> str:
    with session_scope(engine) as session:
        return webhooks.create_subscription(
            session, TENANT, url, START, UrlPolicy(allow_local=True)
        ).id


def _outbox(engine: Engine, subscription_id: str, count: int, *, seconds: int = 0) -> list[str]:
    """`count` due rows, created `seconds` apart (oldest first)."""
    rows = [
        webhooks.outbox_row(
            subscription_id, tenant_id=TENANT, offer_id=f"o-{uuid.uuid4().hex}",
            payload=f'{{"n": {i}}}', now=START + timedelta(seconds=i * seconds),
        )
        for i in range(count)
    ]
    with session_scope(engine) as session:
        session.add_all([
            ActionsOffer(
                offer_id=row["offer_id"], tenant_id=TENANT, customer_id=f"c-{i}",
                policy="p", kind="discount", discount_percent=10,
                valid_until=START + timedelta(days=14), churn_probability=0.9, band="high",
                model_version="m-1", score_id=f"s-{row['offer_id']}", created_at=START,
            )
            for i, row in enumerate(rows)
        ])
        session.flush()
        session.add_all([ActionsDelivery(**row) for row in rows])
    return [row["delivery_id"] for row in rows]


def _rows(engine: Engine) -> dict[str, ActionsDelivery]:
    with session_scope(engine) as session:
        return {d.delivery_id: d for d in session.exec(select(ActionsDelivery)).all()}


async def test_one_claim_statement_leases_within_each_room_parks_the_inactive_and_skips_the_blocked(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    engine, connection = pg
    roomy, tight, blocked, gone = (_subscribe(engine) for _ in range(4))
    a = _outbox(engine, roomy, 3, seconds=1)
    b = _outbox(engine, tight, 3, seconds=1)
    c = _outbox(engine, blocked, 2)
    d = _outbox(engine, gone, 2)
    with session_scope(engine) as session:
        webhooks.delete_subscription(session, TENANT, gone, START)  # parks its 2 pending rows
    e = _outbox(engine, gone, 1)  # enqueued after the delete (a race): parked by the claim
    now = START + timedelta(seconds=10)

    counting: list[Counting] = []

    def claim(conn: Any) -> Any:
        counting.append(Counting(conn))
        return webhooks.claim_due_deliveries_pg(
            counting[0], now, 100, LEASE, blocked=[blocked], rooms={tight: 2}, default_room=50
        )

    claimed, parked = await connection.run(claim)
    assert counting[0].statements == 1  # lock, join, lease and park: one round trip
    assert [c.delivery_id for c in claimed if c.subscription_id == roomy] == a  # oldest first
    assert [c.delivery_id for c in claimed if c.subscription_id == tight] == b[:2]  # its room
    assert parked == 1
    rows = _rows(engine)
    for delivery_id in a + b[:2]:
        assert rows[delivery_id].leased_until == now + LEASE  # leased
        assert rows[delivery_id].next_attempt_at <= now  # still when it was due
    for delivery_id in b[2:] + c:  # beyond the room, or blocked: untouched, still due
        assert rows[delivery_id].status == "pending" and rows[delivery_id].next_attempt_at <= now
        assert rows[delivery_id].leased_until is None
    assert rows[e[0]].status == "parked" and rows[e[0]].last_error == webhooks.DELETED_REASON
    assert all(rows[i].status == "parked" for i in d)
    claimed_again, _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, now, 100, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    assert sorted(c.delivery_id for c in claimed_again) == sorted(b[2:] + c)  # never twice


async def test_the_claim_brings_the_url_the_current_and_the_live_previous_secrets(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    engine, connection = pg
    subscription_id = _subscribe(engine, "http://127.0.0.1:9/rotated")
    with session_scope(engine) as session:
        first = webhooks.get_subscription(session, TENANT, subscription_id).secret
        rotation = webhooks.rotate_secret(
            session, TENANT, subscription_id, START, timedelta(hours=1)
        )
    [delivery_id] = _outbox(engine, subscription_id, 1)

    [claimed], _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, START, 10, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    assert claimed.delivery_id == delivery_id and claimed.url == "http://127.0.0.1:9/rotated"
    assert claimed.signing_secrets == (rotation.secret, first)  # decrypted, current first
    assert claimed.payload == '{"n": 0}' and claimed.attempts == 0 and claimed.tenant_id == TENANT

    with session_scope(engine) as session:  # after the overlap: the old secret is not sent
        session.execute(text("UPDATE actions_deliveries SET leased_until = NULL"))
    [later], _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, START + timedelta(hours=2), 10, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    assert later.signing_secrets == (rotation.secret,)


def _hot_updates(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'actions_deliveries'"
        )).scalar_one()


async def test_a_claims_lease_is_a_hot_update_on_the_rows_own_page(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    """The lease is outside every index and the table keeps room on its pages, so leasing adds
    no index entries (half the WAL per delivery): the claim's updates are all HOT."""
    engine, connection = pg
    with engine.connect() as conn:
        options = conn.execute(text(
            "SELECT reloptions FROM pg_class WHERE relname = 'actions_deliveries'")).scalar_one()
        indexes = conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'actions_deliveries'")).scalars().all()
    assert "fillfactor=50" in options
    assert len(indexes) == 4 and not any("leased_until" in index for index in indexes)

    subscription_id = _subscribe(engine)
    ids = _outbox(engine, subscription_id, 20)
    before = _hot_updates(engine)

    async def claim_and_flush_statistics(conn: Any) -> Any:
        claimed = await webhooks.claim_due_deliveries_pg(
            conn, START, 100, LEASE, blocked=[], rooms={}, default_room=50)
        await conn.execute("SELECT pg_stat_force_next_flush()")  # counted when this ends
        return claimed

    claimed, _ = await connection.run(claim_and_flush_statistics)
    assert sorted(c.delivery_id for c in claimed) == sorted(ids)
    await connection.run(lambda conn: conn.execute("SELECT 1"))  # idle once: flushed
    assert _hot_updates(engine) - before == len(ids)


async def test_many_successes_are_booked_in_one_statement_and_a_changed_delivery_is_left_alone(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    engine, connection = pg
    subscription_id = _subscribe(engine)
    _outbox(engine, subscription_id, 20)
    claimed, _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, START, 100, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    assert len(claimed) == 20
    replayed = claimed[0]  # booked elsewhere meanwhile (another attempt counted)
    with session_scope(engine) as session:
        session.execute(
            text("UPDATE actions_deliveries SET attempts = 1 WHERE delivery_id = :id"),
            {"id": replayed.delivery_id},
        )

    now = START + timedelta(seconds=1)
    counting: list[Counting] = []

    def book(conn: Any) -> Any:
        counting.append(Counting(conn))
        return webhooks.record_successes_pg(
            counting[0], [(c, AttemptResult(status_code=204, latency_ms=2.5)) for c in claimed], now
        )

    outcomes = await connection.run(book)
    assert counting[0].statements == 1
    assert outcomes == ["stale"] + ["delivered"] * 19
    rows = _rows(engine)
    assert rows[replayed.delivery_id].status == "pending"
    with session_scope(engine) as session:
        log = session.exec(select(ActionsDeliveryAttempt)).all()
    booked = {c.delivery_id for c in claimed[1:]}
    assert {a.delivery_id for a in log} == booked and len(log) == 19
    assert all(a.status_code == 204 and a.latency_ms == 2.5 and a.outcome == "delivered" for a in log)
    for delivery_id in booked:
        row = rows[delivery_id]
        assert (row.status, row.attempts, row.last_status_code) == ("delivered", 1, 204)
        assert row.delivered_at == now
    # A second booking of the same attempts (e.g. retried after a lost answer) books nothing.
    again = await connection.run(lambda conn: webhooks.record_successes_pg(
        conn, [(c, AttemptResult(status_code=204)) for c in claimed[1:]], now
    ))
    assert again == ["stale"] * 19


FAILURES = [  # (attempts already made before this claim, what the receiver did)
    (0, AttemptResult(status_code=500, latency_ms=3.25)),
    (0, AttemptResult(error="timeout after 15 s", latency_ms=15000.0)),
    (1, AttemptResult(status_code=503, retry_after="120", latency_ms=1.5)),  # Retry-After wins
    (1, AttemptResult(status_code=429, retry_after="soon", latency_ms=1.0)),  # unparseable: schedule
    (2, AttemptResult(status_code=302, latency_ms=0.5)),  # the schedule is spent: parked
    (0, AttemptResult(error="connection failed: refused", latency_ms=0.25)),  # stale, see below
]


async def _claim_failures(engine: Engine, connection: WorkerConnection) -> list[Any]:
    subscription_id = _subscribe(engine)
    ids = _outbox(engine, subscription_id, len(FAILURES), seconds=1)
    with session_scope(engine) as session:
        for delivery_id, (before, _) in zip(ids, FAILURES, strict=True):
            session.execute(text("UPDATE actions_deliveries SET attempts = :n WHERE delivery_id = :id"),
                            {"n": before, "id": delivery_id})
    claimed, _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, START + timedelta(seconds=10), 100, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    assert [c.delivery_id for c in claimed] == ids
    with session_scope(engine) as session:  # the last one replayed meanwhile
        session.execute(text("UPDATE actions_deliveries SET attempts = 5 WHERE delivery_id = :id"),
                        {"id": ids[-1]})
    return claimed


async def test_failures_booked_in_one_statement_match_the_portable_booking_row_for_row(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    """Retry, Retry-After, parking once the schedule is spent, and a delivery changed meanwhile:
    the one statement on the loop leaves the deliveries and the attempt log exactly as the
    portable booking (a thread and a session) does."""
    engine, connection = pg
    policy = webhooks.RetryPolicy(schedule=[5.0, 60.0])
    now = START + timedelta(seconds=11)
    one = await _claim_failures(engine, connection)
    portable = await _claim_failures(engine, connection)

    counting: list[Counting] = []

    def book(conn: Any) -> Any:
        counting.append(Counting(conn))
        return webhooks.record_failures_pg(
            counting[0], [(c, r) for c, (_, r) in zip(one, FAILURES, strict=True)], now, policy)

    outcomes = await connection.run(book)
    assert counting[0].statements == 1
    with session_scope(engine) as session:
        expected = webhooks.record_attempts(
            session, [(c, r) for c, (_, r) in zip(portable, FAILURES, strict=True)], now, policy)
    assert outcomes == expected == ["failed", "error", "rate_limited", "rate_limited", "parked", "stale"]

    rows = _rows(engine)
    with session_scope(engine) as session:
        log = {a.delivery_id: a for a in session.exec(select(ActionsDeliveryAttempt)).all()}
    fields = ("status", "attempts", "next_attempt_at", "last_error", "last_status_code")
    for a, b in zip(one, portable, strict=True):
        assert [getattr(rows[a.delivery_id], f) for f in fields] == \
            [getattr(rows[b.delivery_id], f) for f in fields]
        if a is one[-1]:
            assert a.delivery_id not in log and b.delivery_id not in log  # stale: not logged
            continue
        assert (log[a.delivery_id].outcome, log[a.delivery_id].status_code, log[a.delivery_id].error,
                log[a.delivery_id].latency_ms, log[a.delivery_id].attempted_at) == \
            (log[b.delivery_id].outcome, log[b.delivery_id].status_code, log[b.delivery_id].error,
             log[b.delivery_id].latency_ms, log[b.delivery_id].attempted_at)
    first, _, limited, _, parked, _ = (rows[c.delivery_id] for c in one)
    assert first.next_attempt_at == now + timedelta(seconds=5) and first.status == "pending"
    assert limited.next_attempt_at == now + timedelta(seconds=120)
    assert parked.status == "parked" and parked.last_error.startswith("retry schedule exhausted after 3")


async def test_unsent_claims_are_released_in_one_statement_unless_changed_meanwhile(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    engine, connection = pg
    subscription_id = _subscribe(engine)
    ids = _outbox(engine, subscription_id, 4)
    claimed, _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, START, 100, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    with session_scope(engine) as session:  # booked elsewhere meanwhile
        session.execute(text("UPDATE actions_deliveries SET attempts = 1 WHERE delivery_id = :id"),
                        {"id": ids[0]})
    probe_at = START + timedelta(seconds=60)
    released = await connection.run(
        lambda conn: webhooks.release_claims_pg(conn, claimed, probe_at))
    assert released == 3
    rows = _rows(engine)
    assert rows[ids[0]].leased_until == START + LEASE  # left with its lease
    assert all(rows[i].next_attempt_at == probe_at and rows[i].leased_until is None
               for i in ids[1:])


async def test_a_failed_statement_drops_the_connection_and_the_next_use_opens_a_new_one(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    _, connection = pg

    async def backend(conn: Any) -> int:
        return (await (await conn.execute("SELECT pg_backend_pid()")).fetchone())[0]

    first = await connection.run(backend)
    assert await connection.run(backend) == first  # kept
    with pytest.raises(Exception, match="division by zero"):
        await connection.run(lambda conn: conn.execute("SELECT 1 / 0"))
    assert await connection.run(backend) != first


async def test_a_row_locked_by_another_claim_is_skipped_not_waited_for_nor_claimed(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    """Another worker's claim holds the oldest row (its statement has not ended): this claim
    neither waits for it nor leases it, and leases the next rows within the endpoint's room."""
    engine, connection = pg
    endpoint = _subscribe(engine)
    ids = _outbox(engine, endpoint, 4, seconds=1)
    now = START + timedelta(seconds=10)
    other = WorkerConnection(engine)
    try:
        async def hold_oldest(conn: Any) -> None:
            await conn.execute("BEGIN")
            await conn.execute(
                "SELECT 1 FROM actions_deliveries WHERE delivery_id = %s FOR UPDATE", [ids[0]])

        await other.run(hold_oldest)
        claimed, _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
            conn, now, 100, LEASE, blocked=[], rooms={endpoint: 2}, default_room=50,
        ))
        taken = [c.delivery_id for c in claimed]
        assert ids[0] not in taken and ids[1] in taken and set(taken) <= set(ids[1:3])
        rows = _rows(engine)
        assert rows[ids[0]].leased_until is None  # untouched: still the other claim's
        assert all(rows[i].leased_until is None for i in ids[3:])  # beyond the room
    finally:
        await other.close()  # rolls the other transaction back
    again, _ = await connection.run(lambda conn: webhooks.claim_due_deliveries_pg(
        conn, now, 100, LEASE, blocked=[], rooms={}, default_room=50,
    ))
    assert ids[0] in [c.delivery_id for c in again]  # due again once its holder let go


async def test_the_claims_connection_does_not_wait_for_the_wal_flush(
    pg: tuple[Engine, WorkerConnection],
) -> None:
    """A lease lost in a database crash only makes rows due again (same webhook-id). The
    bookings' connection keeps the server's setting (durable unless configured otherwise)."""
    engine, _ = pg
    worker = DeliveryWorker(engine, PooledSender(allow_local=True), ManualClock(START),
                            retry_schedule_s=[60.0])
    try:
        async def setting(conn: Any) -> str:
            return (await (await conn.execute("SHOW synchronous_commit")).fetchone())[0]

        assert await worker.claims.run(setting) == "off"
        async with await psycopg.AsyncConnection.connect(
            engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        ) as plain:
            assert await worker.bookings.run(setting) == await setting(plain)
    finally:
        await worker.claims.close()
        await worker.bookings.close()


@pytest.mark.parametrize("statistics", ["taken_while_pending_rows_were_rare", "never_taken"])
@pytest.mark.parametrize("statement", ["_PG_DELIVERED", "_PG_FAILED", "_PG_RELEASE"])
async def test_booking_and_release_find_their_rows_by_primary_key_beside_a_backlog(
    pg: tuple[Engine, WorkerConnection], statement: str, statistics: str,
) -> None:
    """A hanging endpoint's backlog of pending rows beside rows being booked: on the worker's
    own bookings connection, the booking and release statements' generic plans (the worker's
    statements are prepared once) read the rows they book by primary key. Not every pending row
    through the due index, as statistics taken while pending rows were rare made them do (a
    booking of 5 beside 3,000 pending rows: 13 ms, 0.8 by primary key); nor the whole table,
    as a plan made while the outbox looked empty did."""
    engine, _ = pg
    delivered = _outbox(engine, _subscribe(engine), 600)
    with engine.begin() as connection:
        connection.execute(text("UPDATE actions_deliveries SET status = 'delivered'"))
        if statistics == "taken_while_pending_rows_were_rare":
            connection.execute(text("ANALYZE actions_deliveries"))
    _outbox(engine, _subscribe(engine, "http://127.0.0.1:9/hang"), 300)  # the backlog, not analysed
    parameters: dict[str, Any] = {
        "now": START, "at": START, "ids": delivered[:5], "attempts": [0] * 5, "codes": [204] * 5,
        "latency": [1.0] * 5, "outcomes": ["failed"] * 5, "errors": ["e"] * 5, "last_errors": ["e"] * 5,
        "next_at": [START] * 5,
    }
    worker = DeliveryWorker(engine, PooledSender(allow_local=True), ManualClock(START), retry_schedule_s=[60.0])

    async def generic_plan(connection: psycopg.AsyncConnection[Any]) -> str:
        await connection.execute("SET plan_cache_mode = force_generic_plan")
        cursor = await connection.execute(
            "EXPLAIN (FORMAT JSON) " + getattr(webhook_repository, statement), parameters, prepare=True)
        row = await cursor.fetchone()
        return str(row[0] if row else "")

    try:
        plan = await worker.bookings.run(generic_plan)
    finally:
        await worker.bookings.close()
    assert "actions_deliveries_pkey" in plan
    assert "ix_actions_deliveries_due" not in plan
    assert "Seq Scan" not in plan
