"""The decision path's set-based writes (`repository.insert_rows`, `repository.update_rows`), on
a real database: what they store is what the ORM reads back, value for value (strings with
quotes and non-ASCII, None, booleans, floats, integers, nested JSON, aware datetimes in any
zone), for one row and many (PostgreSQL: one JSON document unpacked by the server; SQLite:
executemany); and what JSON would silently change is refused by name."""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from services.actions import repository, webhooks
from services.actions.tables import ActionsCustomer, ActionsDelivery, ActionsOffer
from services.actions.url_guard import UrlPolicy
from shared.db import session_scope
from tests.actions.actions_support import START
from tests.actions.test_actions_guardrails import engine  # noqa: F401

SIZES = [1, 2, 5, 40]


def _customer(tenant: str, n: int) -> dict[str, Any]:
    return {
        "tenant_id": tenant, "customer_id": f"c-{n:03d}", "marketing_consent": [True, False, None][n % 3],
        "consent_at": START + timedelta(minutes=n) if n % 2 else None, "segment": f"seg'{n}\"",
        "attributes": {"plan": "gold", "n": n, "nested": {"ü": [1, 2.5, None]}} if n % 4 else {},
        "profile_at": None, "loyalty_tier": None, "tier_at": None, "last_activity_at": START,
        "last_complaint_at": None, "last_nps": n % 11, "nps_at": None, "last_csat": None, "csat_at": None,
        "last_score_id": None, "last_probability": None, "last_band": None, "last_model_version": None,
        "spend_365d": n * 10.25 if n % 5 else None, "last_scored_at": None, "erased_at": None,
    }


def _stored(engine: Engine, tenant: str) -> list[dict[str, Any]]:  # noqa: F811
    with session_scope(engine) as session:
        rows = session.exec(
            select(ActionsCustomer).where(ActionsCustomer.tenant_id == tenant).order_by(ActionsCustomer.customer_id)
        ).all()
        return [row.model_dump() for row in rows]


@pytest.mark.parametrize("size", SIZES)
def test_inserted_rows_read_back_as_written(engine: Engine, size: int) -> None:  # noqa: F811
    tenant = f"ins-{size}"
    rows = [_customer(tenant, n) for n in range(size)]
    with session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, rows)
    assert _stored(engine, tenant) == rows
    # ignore_existing: the rows already there stay as they are, the new ones are added
    changed = [{**row, "segment": "changed"} for row in rows]
    extra = [_customer(tenant, n) for n in range(size, size + 2)]
    with session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, changed + extra, ignore_existing=True)
    assert _stored(engine, tenant) == rows + extra


@pytest.mark.parametrize("size", SIZES)
def test_updated_rows_change_only_the_named_columns_of_the_named_rows(engine: Engine, size: int) -> None:  # noqa: F811
    tenant = f"upd-{size}"
    rows = [_customer(tenant, n) for n in range(size + 1)]  # the last one is not updated
    with session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, rows)
    later = START.astimezone(timezone(timedelta(hours=2))) + timedelta(days=3)  # stored in UTC
    updates = [
        {"tenant_id": tenant, "customer_id": row["customer_id"], "last_score_id": f"s-{n}",
         "last_probability": n / 100, "last_band": None if n % 2 else "high", "last_scored_at": later,
         "attributes": {"updated": n}}
        for n, row in enumerate(rows[:size])
    ]
    with session_scope(engine) as session:
        repository.update_rows(session, ActionsCustomer, updates)
    expected = [{**row, **update, "last_scored_at": later.astimezone(timezone.utc)}
                for row, update in zip(rows, updates)] + [rows[-1]]
    assert _stored(engine, tenant) == expected


def test_naive_datetimes_are_refused(engine: Engine) -> None:  # noqa: F811
    """Refused with the column's name, nothing stored."""
    row = {**_customer("naive", 1), "consent_at": START.replace(tzinfo=None)}
    with pytest.raises(ValueError, match=r"naive datetime in actions_customers\.consent_at"), \
            session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, [row])
    assert _stored(engine, "naive") == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_numbers_that_are_not_finite_are_refused_by_name(engine: Engine, value: float) -> None:  # noqa: F811
    """JSON has no NaN or infinity (orjson would write null): refused, nothing stored, on both
    databases alike (SQLite would have turned NaN into NULL itself)."""
    good = _customer("nonfinite", 1)
    with pytest.raises(ValueError, match=r"actions_customers\.spend_365d is .*only finite numbers"), \
            session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, [good, {**_customer("nonfinite", 2), "spend_365d": value}])
    assert _stored(engine, "nonfinite") == []
    with session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, [good])
    with pytest.raises(ValueError, match="only finite numbers"), session_scope(engine) as session:
        repository.update_rows(session, ActionsCustomer, [
            {"tenant_id": "nonfinite", "customer_id": good["customer_id"], "last_probability": value}])
    assert _stored(engine, "nonfinite") == [good]


def test_a_few_updated_rows_are_found_through_the_primary_key(engine: Engine) -> None:  # noqa: F811
    """update_rows tells PostgreSQL how many rows it brings: for a batch of one, the plan looks
    the row up by primary key instead of scanning the whole table (what the planner chose for
    a function's assumed 100 rows on a table of thousands)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("the statement's plan is PostgreSQL's (SQLite updates row by row by key)")
    with session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, [_customer("plan", n) for n in range(5000)])
    table = ActionsCustomer.__table__  # type: ignore[attr-defined]
    sql = repository.update_rows_sql(table, (table.c.last_probability,))
    document = '[{"tenant_id": "plan", "customer_id": "c-007", "last_probability": 0.5}]'
    with engine.connect() as connection:
        plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + sql, (document, 1)))
    assert "Index Scan using actions_customers_pkey" in plan and "Seq Scan on actions_customers" not in plan, plan


def _offer_and_delivery(tenant: str, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    offer = {
        "offer_id": f"o-{tenant}-{n}", "tenant_id": tenant, "customer_id": f"c-{n:03d}", "policy": "p",
        "kind": "discount", "discount_percent": 10, "valid_until": START + timedelta(days=14),
        "churn_probability": 0.9, "band": "high", "model_version": "m-1", "score_id": f"s-{tenant}-{n}",
        "created_at": START, "trigger": "score", "offer_key": "d10", "service": False, "cost": 2.5, "details": {},
    }
    delivery = webhooks.outbox_row("", tenant_id=tenant, offer_id=offer["offer_id"],
                                   payload=f'{{"n": {n}}}', now=START)
    return offer, delivery


@pytest.mark.parametrize("size", [1, 5])
def test_several_tables_are_written_in_one_statement_on_postgresql(engine: Engine, size: int) -> None:  # noqa: F811
    """write_rows: offers, outbox rows referencing them (the foreign key is checked at the end of
    the statement) and customer updates; one statement on PostgreSQL, one per table on SQLite;
    what is stored is what insert_rows and update_rows store."""
    tenant = f"many-{size}"
    customers = [_customer(tenant, n) for n in range(size)]
    with session_scope(engine) as session:
        subscription = webhooks.create_subscription(session, tenant, "http://127.0.0.1:9/hook", START,
                                                    UrlPolicy(allow_local=True)).id
        repository.insert_rows(session, ActionsCustomer, customers)
    pairs = [_offer_and_delivery(tenant, n) for n in range(size)]
    offers = [offer for offer, _ in pairs]
    deliveries = [{**delivery, "subscription_id": subscription} for _, delivery in pairs]
    scored = [{"tenant_id": tenant, "customer_id": c["customer_id"], "last_probability": 0.9} for c in customers]
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with session_scope(engine) as session:
            repository.write_rows(session, [(ActionsOffer, offers), (ActionsDelivery, deliveries)],
                                  [(ActionsCustomer, scored)])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == (1 if engine.dialect.name == "postgresql" else 3)
    with session_scope(engine) as session:
        stored_offers = session.exec(select(ActionsOffer).where(ActionsOffer.tenant_id == tenant)).all()
        stored_deliveries = session.exec(select(ActionsDelivery).where(ActionsDelivery.tenant_id == tenant)).all()
    assert sorted(o.offer_id for o in stored_offers) == sorted(o["offer_id"] for o in offers)
    assert sorted((d.delivery_id, d.offer_id) for d in stored_deliveries) == sorted(
        (d["delivery_id"], d["offer_id"]) for d in deliveries)
    assert [row["last_probability"] for row in _stored(engine, tenant)] == [0.9] * size


def test_a_row_another_part_refuses_leaves_nothing_written(engine: Engine) -> None:  # noqa: F811
    """An outbox row naming an offer nobody inserts: the foreign key refuses it (PostgreSQL: at the
    end of the statement), and the offers and updates of the same call are not stored either."""
    tenant = "refused"
    with session_scope(engine) as session:
        repository.insert_rows(session, ActionsCustomer, [_customer(tenant, 0)])
        subscription = webhooks.create_subscription(session, tenant, "http://127.0.0.1:9/hook", START,
                                                    UrlPolicy(allow_local=True)).id
    offer, delivery = _offer_and_delivery(tenant, 0)
    orphan = {**delivery, "subscription_id": subscription, "offer_id": "o-nobody"}
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        repository.write_rows(session, [(ActionsOffer, [offer]), (ActionsDelivery, [orphan])],
                              [(ActionsCustomer, [{"tenant_id": tenant, "customer_id": "c-000", "last_probability": 0.5}])])
    with session_scope(engine) as session:
        assert session.exec(select(ActionsOffer).where(ActionsOffer.tenant_id == tenant)).all() == []
    assert _stored(engine, tenant)[0]["last_probability"] is None
