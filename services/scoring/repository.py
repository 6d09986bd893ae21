"""All of scoring's SQL. Every query on tenant data filters by tenant_id.

Idempotent writes use INSERT ... ON CONFLICT, which SQLite and PostgreSQL both speak.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlmodel import Session

from services.scoring.features import HistoryEvent, as_utc
from services.scoring.tables import (
    ScoringCustomerFeatures,
    ScoringErasure,
    ScoringEvent,
    ScoringEventFlag,
    ScoringHistoryMark,
    ScoringModel,
    ScoringScore,
    ScoringSweepLease,
)
from shared import leases
from shared.db import JSON_CODEC, dialect_insert

_CHUNK = 1000


def _chunks(rows: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _postgresql(session: Session) -> Any | None:
    """The session's psycopg connection (same transaction) on PostgreSQL, else None.

    The consumer's bulk writes go through it as ONE statement per table and batch whose one
    parameter is the rows as a JSON array (INSERT ... SELECT FROM json_to_recordset(...)),
    encoded by orjson: the statement text is the same for every batch, where a multi-row VALUES
    list is a new, long text per batch that the driver splits and the server parses, and
    array parameters cost more to encode in the driver than the rest of the write (measured,
    2,000 rows). The reads every batch makes (history marks, tombstones, histories) go through
    it too, with one array parameter of ids: through SQLAlchemy's ORM (statement building, cache
    key, result processing) they cost ~0.6 ms of CPU each, 1.8 of the 4 ms a one-event batch
    took (measured)."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        return None
    return connection.connection.driver_connection


_to_json = JSON_CODEC["json_serializer"]


def _rows_json(rows: Sequence[Mapping[str, Any]]) -> str:
    return _to_json(list(rows))  # orjson: datetimes as RFC 3339, what timestamptz reads


# --- event history --------------------------------------------------------------------


def _event_values(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**row, "occurred_at": as_utc(row["occurred_at"]), "received_at": as_utc(row["received_at"])}
        for row in rows
    ]


def _insert_events_statement(session: Session) -> Any:
    return dialect_insert(session, ScoringEvent.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
        index_elements=["tenant_id", "event_id"]
    )


_PG_INSERT_EVENTS = """
INSERT INTO scoring_events (tenant_id, event_id, customer_id, type, occurred_at, received_at, payload)
SELECT tenant_id, event_id, customer_id, type, occurred_at, received_at, payload FROM json_to_recordset(%s::json)
    AS r(tenant_id text, event_id text, customer_id text, type text, occurred_at timestamptz,
         received_at timestamptz, payload json)
ON CONFLICT (tenant_id, event_id) DO NOTHING
RETURNING tenant_id, event_id
"""


def insert_events(session: Session, rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """Insert-if-absent; returns the (tenant_id, event_id) pairs that were new.

    rows: tenant_id, event_id, customer_id, type, occurred_at, received_at, payload.
    """
    if not rows:
        return set()
    raw = _postgresql(session)
    if raw is not None:
        with raw.cursor() as cursor:
            cursor.execute(_PG_INSERT_EVENTS, (_rows_json(_event_values(rows)),))
            return {(tenant, event) for tenant, event in cursor.fetchall()}
    inserted: set[tuple[str, str]] = set()
    table = ScoringEvent.__table__  # type: ignore[attr-defined]
    statement = _insert_events_statement(session).returning(table.c.tenant_id, table.c.event_id)
    for chunk in _chunks(list(rows)):
        # executemany with RETURNING: compiled once, sent as multi-row INSERTs
        inserted.update((tenant, event) for tenant, event in session.execute(statement, _event_values(chunk)))
    return inserted


def import_events(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bulk insert-if-absent without reporting which rows were new (backfills, simulation):
    a plain executemany, which the PostgreSQL driver pipelines. Bumps the history mark of the
    tenants concerned (consumers drop their cached histories of them)."""
    if rows:
        session.execute(_insert_events_statement(session), _event_values(rows))
        for tenant_id in sorted({row["tenant_id"] for row in rows}):
            bump_history_mark(session, tenant_id)


def bump_history_mark(session: Session, tenant_id: str) -> None:
    """Say that a tenant's stored history changed outside the event consumer (import, purge),
    in the caller's transaction."""
    table = ScoringHistoryMark.__table__  # type: ignore[attr-defined]
    statement = dialect_insert(session, table).values(tenant_id=tenant_id, generation=1)
    session.execute(statement.on_conflict_do_update(
        index_elements=["tenant_id"], set_={"generation": table.c.generation + 1},
    ))


_PG_HISTORY_MARKS = "SELECT tenant_id, generation FROM scoring_history_marks WHERE tenant_id = ANY(%s)"


def history_marks(session: Session, tenant_ids: Iterable[str]) -> dict[str, int | None]:
    """tenant -> its history mark (None: never changed outside the consumer)."""
    wanted = sorted(set(tenant_ids))
    marks: dict[str, int | None] = dict.fromkeys(wanted)
    raw = _postgresql(session)
    if raw is not None:  # read by every consumer batch: the driver directly (see _postgresql)
        with raw.cursor() as cursor:
            cursor.execute(_PG_HISTORY_MARKS, (wanted,))
            marks.update({tenant: int(generation) for tenant, generation in cursor.fetchall()})
        return marks
    for chunk in _chunks(wanted, 500):
        statement = select(ScoringHistoryMark.tenant_id, ScoringHistoryMark.generation).where(
            ScoringHistoryMark.tenant_id.in_(chunk)  # type: ignore[attr-defined]
        )
        marks.update({tenant: int(generation) for tenant, generation in session.execute(statement)})
    return marks


def _history_rows(rows: Iterable[Any]) -> dict[str, list[HistoryEvent]]:
    histories: dict[str, list[HistoryEvent]] = defaultdict(list)
    for event_id, customer_id, kind, occurred_at, payload in rows:
        histories[customer_id].append(
            HistoryEvent(type=kind, occurred_at=as_utc(occurred_at), data=payload or {}, id=event_id)
        )
    return dict(histories)


def _history_columns() -> Any:
    return select(
        ScoringEvent.event_id, ScoringEvent.customer_id, ScoringEvent.type,
        ScoringEvent.occurred_at, ScoringEvent.payload,
    )


# One index lookup per customer, whatever the planner believes about the table: with
# `customer_id = ANY(...)` a freshly filled table (not analyzed yet) was read through the
# tenant alone, every row of the tenant filtered (5-7 ms for 12 customers of 24,000 rows, 0.9
# this way). OFFSET 0 keeps the subquery from being flattened into a hash join.
_PG_LOAD_HISTORIES = """
SELECT e.event_id, e.customer_id, e.type, e.occurred_at, e.payload
FROM unnest(%s::text[]) AS wanted(customer_id)
CROSS JOIN LATERAL (
    SELECT event_id, customer_id, type, occurred_at, payload FROM scoring_events
    WHERE tenant_id = %s AND customer_id = wanted.customer_id OFFSET 0
) AS e
"""


def load_histories(session: Session, tenant_id: str, customer_ids: Iterable[str]) -> dict[str, list[HistoryEvent]]:
    """The stored history of some customers of one tenant, customer id -> events."""
    wanted = sorted(set(customer_ids))
    histories: dict[str, list[HistoryEvent]] = {}
    raw = _postgresql(session)
    for chunk in _chunks(wanted, 500):
        if raw is not None:
            # the consumer's read of every batch with customers not in its cache: the driver
            # directly (see _postgresql), one array parameter so the statement text never changes
            with raw.cursor() as cursor:
                cursor.execute(_PG_LOAD_HISTORIES, (list(chunk), tenant_id))
                histories.update(_history_rows(cursor.fetchall()))
            continue
        statement = _history_columns().where(
            ScoringEvent.tenant_id == tenant_id, ScoringEvent.customer_id.in_(chunk)  # type: ignore[attr-defined]
        )
        histories.update(_history_rows(session.execute(statement)))
    return histories


def load_tenant_history(session: Session, tenant_id: str) -> dict[str, list[HistoryEvent]]:
    """Every stored event of one tenant (training)."""
    statement = _history_columns().where(ScoringEvent.tenant_id == tenant_id)
    return _history_rows(session.execute(statement.execution_options(yield_per=5000)))


def count_events(session: Session, tenant_id: str, customer_id: str | None = None) -> int:
    statement = select(func.count()).select_from(ScoringEvent).where(ScoringEvent.tenant_id == tenant_id)
    if customer_id is not None:
        statement = statement.where(ScoringEvent.customer_id == customer_id)
    return int(session.execute(statement).scalar_one())


# --- features and scores ------------------------------------------------------------


_PG_UPSERT_FEATURES = """
INSERT INTO scoring_customer_features AS f (tenant_id, customer_id, features, updated_at)
SELECT %s, customer_id, features, %s FROM json_to_recordset(%s::json) AS r(customer_id text, features json)
ON CONFLICT (tenant_id, customer_id) DO UPDATE SET features = excluded.features, updated_at = excluded.updated_at
WHERE f.updated_at <= excluded.updated_at
"""


def upsert_features(
    session: Session, tenant_id: str, features: Mapping[str, Mapping[str, float]], updated_at: datetime
) -> None:
    if not features:
        return
    raw = _postgresql(session)
    if raw is not None:
        ordered = sorted(features.items())
        with raw.cursor() as cursor:
            cursor.execute(_PG_UPSERT_FEATURES, (tenant_id, as_utc(updated_at), _rows_json(
                [{"customer_id": customer, "features": vector} for customer, vector in ordered])))
        return
    table = ScoringCustomerFeatures.__table__  # type: ignore[attr-defined]
    values = [
        {"tenant_id": tenant_id, "customer_id": customer, "features": dict(vector), "updated_at": as_utc(updated_at)}
        for customer, vector in sorted(features.items())
    ]
    statement = dialect_insert(session, table)
    statement = statement.on_conflict_do_update(
        index_elements=["tenant_id", "customer_id"],
        set_={"features": statement.excluded.features, "updated_at": statement.excluded.updated_at},
        # an older computation (a sweep page that started before an event batch) never
        # overwrites a newer one
        where=table.c.updated_at <= statement.excluded.updated_at,
    ).returning(table.c.customer_id)
    # executemany with RETURNING is sent as one multi-row INSERT ... ON CONFLICT per 1000 rows
    # ("insertmanyvalues", compiled once and cached): one round trip and one statement per batch,
    # where a plain executemany would run one statement per customer.
    session.execute(statement, values).all()


_PG_UPSERT_SCORES = """
INSERT INTO scoring_scores (score_id, tenant_id, customer_id, probability, band, model_version, scored_at, event_id,
                            reasons)
SELECT score_id, tenant_id, customer_id, probability, band, model_version, scored_at, event_id, reasons
FROM json_to_recordset(%s::json) AS r(score_id text, tenant_id text, customer_id text, probability float8,
    band text, model_version text, scored_at timestamptz, event_id text, reasons json)
ON CONFLICT (score_id) DO UPDATE SET probability = excluded.probability, band = excluded.band,
    model_version = excluded.model_version, scored_at = excluded.scored_at, reasons = excluded.reasons
"""


def upsert_scores(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """rows: score_id (unique), tenant_id, customer_id, probability, band, model_version,
    scored_at, event_id, reasons (optional, default none). A re-scored event (redelivery)
    keeps its score_id; the row takes the newest computation."""
    if not rows:
        return
    raw = _postgresql(session)
    if raw is not None:
        with raw.cursor() as cursor:
            cursor.execute(_PG_UPSERT_SCORES, (_rows_json(
                [{"reasons": [], **row, "scored_at": as_utc(row["scored_at"])} for row in rows]),))
        return
    table = ScoringScore.__table__  # type: ignore[attr-defined]
    for chunk in _chunks(list(rows)):
        values = [{"reasons": [], **row, "scored_at": as_utc(row["scored_at"])} for row in chunk]
        statement = dialect_insert(session, table)
        statement = statement.on_conflict_do_update(
            index_elements=["score_id"],
            set_={
                name: statement.excluded[name]
                for name in ("probability", "band", "model_version", "scored_at", "reasons")
            },
        )
        session.execute(statement, values)


def latest_score(session: Session, tenant_id: str, customer_id: str) -> ScoringScore | None:
    statement = (
        select(ScoringScore)
        .where(ScoringScore.tenant_id == tenant_id, ScoringScore.customer_id == customer_id)
        .order_by(ScoringScore.scored_at.desc(), ScoringScore.id.desc())  # type: ignore[union-attr]
        .limit(1)
    )
    return session.execute(statement).scalars().first()


def customer_features(session: Session, tenant_id: str, customer_id: str) -> ScoringCustomerFeatures | None:
    return session.get(ScoringCustomerFeatures, (tenant_id, customer_id))


# --- model registry (global, not per tenant, in this version) -------------------------

_MODEL_INFO_COLUMNS = (
    ScoringModel.id, ScoringModel.version, ScoringModel.algorithm, ScoringModel.candidate, ScoringModel.roc_auc,
    ScoringModel.baseline_auc, ScoringModel.runner_up_auc, ScoringModel.pr_auc, ScoringModel.brier,
    ScoringModel.lift_top_decile, ScoringModel.feature_names, ScoringModel.n_train, ScoringModel.n_holdout,
    ScoringModel.horizon_days, ScoringModel.first_cutoff, ScoringModel.last_cutoff, ScoringModel.validation_cutoff,
    ScoringModel.trained_on_tenant, ScoringModel.trained_at, ScoringModel.active, ScoringModel.activated_at,
    ScoringModel.previous_version, ScoringModel.report_path,
    ScoringModel.serving.is_not(None).label("has_serving_arrays"),  # type: ignore[union-attr]
)
_MODEL_DETAIL_COLUMNS = (
    *_MODEL_INFO_COLUMNS, ScoringModel.calibration, ScoringModel.candidates, ScoringModel.importance,
    ScoringModel.reasons_reference,
)


def list_models(session: Session) -> list[dict[str, Any]]:
    """The registry without artifacts and chart data, newest first."""
    statement = select(*_MODEL_INFO_COLUMNS).order_by(ScoringModel.trained_at.desc(), ScoringModel.id.desc())  # type: ignore[union-attr]
    return [dict(row._mapping) for row in session.execute(statement)]


def model_info(session: Session, version: str, with_validation: bool = False) -> dict[str, Any] | None:
    """One model with its metrics (and, if asked, the validation data the report draws), no artifact."""
    columns = (*_MODEL_DETAIL_COLUMNS, ScoringModel.validation) if with_validation else _MODEL_DETAIL_COLUMNS
    row = session.execute(select(*columns).where(ScoringModel.version == version)).first()
    return dict(row._mapping) if row is not None else None


def get_model(session: Session, version: str) -> ScoringModel | None:
    """The whole row, artifact included."""
    return session.execute(select(ScoringModel).where(ScoringModel.version == version)).scalars().first()


def active_model_version(session: Session) -> str | None:
    statement = select(ScoringModel.version).where(ScoringModel.active == True)  # noqa: E712
    return session.execute(statement).scalars().first()


def active_model(session: Session) -> ScoringModel | None:
    statement = select(ScoringModel).where(ScoringModel.active == True)  # noqa: E712
    return session.execute(statement).scalars().first()


def newest_model_version(session: Session) -> str | None:
    statement = select(ScoringModel.version).order_by(ScoringModel.trained_at.desc(), ScoringModel.id.desc())  # type: ignore[union-attr]
    return session.execute(statement.limit(1)).scalars().first()


def lock_registry(session: Session) -> None:
    """Serialise registry changes (promote, rollback, activate) until the transaction ends:
    they read the active model, then change it. Row locks on PostgreSQL; SQLite serialises
    writers anyway (FOR UPDATE is not emitted there)."""
    session.execute(select(ScoringModel.id).with_for_update())


def add_model(session: Session, row: ScoringModel) -> ScoringModel:
    """Insert a model; if it is to be active, the previously active one is deactivated first
    and remembered as the new one's previous_version (what a rollback returns to)."""
    if row.active:
        lock_registry(session)
        row.previous_version = active_model_version(session)
        row.activated_at = row.activated_at or row.trained_at
        deactivate_all(session)
    session.add(row)
    session.flush()
    return row


def deactivate_all(session: Session) -> None:
    session.execute(update(ScoringModel).where(ScoringModel.active == True).values(active=False))  # noqa: E712
    session.flush()


def set_active(session: Session, version: str, activated_at: datetime, previous_version: str | None) -> bool:
    """Make `version` the only active model, recording when and what a rollback from it
    returns to. False if there is no such version."""
    exists = session.execute(select(ScoringModel.id).where(ScoringModel.version == version)).first()
    if exists is None:
        return False
    deactivate_all(session)
    session.execute(
        update(ScoringModel).where(ScoringModel.version == version)
        .values(active=True, activated_at=as_utc(activated_at), previous_version=previous_version)
    )
    session.flush()
    return True


def set_report_path(session: Session, version: str, path: str) -> None:
    session.execute(update(ScoringModel).where(ScoringModel.version == version).values(report_path=path))


# --- flagged events (data features cannot use) ------------------------------------------


def insert_event_flags(session: Session, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """rows: tenant_id, event_id, reason, customer_id, flagged_at. Insert-if-absent; returns
    the reasons of the rows that were new (a redelivered event is not flagged twice)."""
    if not rows:
        return []
    table = ScoringEventFlag.__table__  # type: ignore[attr-defined]
    statement = dialect_insert(session, table).on_conflict_do_nothing(
        index_elements=["tenant_id", "event_id", "reason"]
    ).returning(table.c.reason)
    values = [{**row, "flagged_at": as_utc(row["flagged_at"])} for row in rows]
    reasons: list[str] = []
    for chunk in _chunks(values):
        reasons.extend(reason for (reason,) in session.execute(statement, list(chunk)))
    return reasons


def event_flags(session: Session, tenant_id: str, customer_id: str | None = None) -> dict[str, list[str]]:
    """event id -> its flags (sorted), for one tenant (optionally one customer)."""
    statement = select(ScoringEventFlag.event_id, ScoringEventFlag.reason).where(
        ScoringEventFlag.tenant_id == tenant_id
    )
    if customer_id is not None:
        statement = statement.where(ScoringEventFlag.customer_id == customer_id)
    flags: dict[str, list[str]] = defaultdict(list)
    for event_id, reason in session.execute(statement.order_by(ScoringEventFlag.event_id, ScoringEventFlag.reason)):
        flags[event_id].append(reason)
    return dict(flags)


# --- the periodic sweep ---------------------------------------------------------------------


def feature_tenants(session: Session) -> list[str]:
    """Tenants with at least one scored customer (the sweep walks them one by one)."""
    statement = select(ScoringCustomerFeatures.tenant_id).distinct().order_by(ScoringCustomerFeatures.tenant_id)
    return list(session.execute(statement).scalars())


def sweep_candidates(
    session: Session, tenant_id: str, after: str | None, limit: int, updated_before: datetime | None = None
) -> list[str]:
    """Customer ids of one tenant that have features (optionally: last computed before
    `updated_before`), in id order after `after` (keyset paging)."""
    statement = select(ScoringCustomerFeatures.customer_id).where(ScoringCustomerFeatures.tenant_id == tenant_id)
    if updated_before is not None:
        statement = statement.where(ScoringCustomerFeatures.updated_at < as_utc(updated_before))
    if after is not None:
        statement = statement.where(ScoringCustomerFeatures.customer_id > after)
    statement = statement.order_by(ScoringCustomerFeatures.customer_id).limit(limit)
    return list(session.execute(statement).scalars())


def recent_scores(
    session: Session, tenant_id: str, customer_ids: Iterable[str], per_customer: int = 2
) -> dict[str, list[tuple[str, float, str]]]:
    """customer id -> its latest `per_customer` scores as (score_id, probability, band), newest first."""
    wanted = sorted(set(customer_ids))
    result: dict[str, list[tuple[str, float, str]]] = defaultdict(list)
    for chunk in _chunks(wanted, 500):
        rank = func.row_number().over(
            partition_by=ScoringScore.customer_id,
            order_by=(ScoringScore.scored_at.desc(), ScoringScore.id.desc()),  # type: ignore[union-attr]
        ).label("rank")
        ranked = select(
            ScoringScore.customer_id, ScoringScore.score_id, ScoringScore.probability, ScoringScore.band, rank,
        ).where(
            ScoringScore.tenant_id == tenant_id, ScoringScore.customer_id.in_(chunk)  # type: ignore[attr-defined]
        ).subquery()
        statement = select(ranked.c.customer_id, ranked.c.score_id, ranked.c.probability, ranked.c.band).where(
            ranked.c.rank <= per_customer
        ).order_by(ranked.c.customer_id, ranked.c.rank)
        for customer, score_id, probability, band in session.execute(statement):
            result[customer].append((score_id, float(probability), band))
    return dict(result)


def acquire_lease(session: Session, name: str, holder: str, now: datetime, expires_at: datetime) -> bool:
    """Take (or renew) the sweep lease `name` for `holder` (shared.leases does the work)."""
    return leases.acquire_lease(session, ScoringSweepLease, name, holder, now, expires_at)


def release_lease(session: Session, name: str, holder: str, now: datetime) -> None:
    leases.release_lease(session, ScoringSweepLease, name, holder, now)


# --- erasure (GDPR Art. 17), export (Art. 15/20), retention ----------------------------------


_PG_ERASED_CUSTOMERS = "SELECT customer_id FROM scoring_erasures WHERE tenant_id = %s AND customer_id = ANY(%s)"


def erased_customers(session: Session, tenant_id: str, customer_ids: Iterable[str]) -> set[str]:
    """The customers among `customer_ids` of one tenant that have a tombstone."""
    wanted = sorted(set(customer_ids))
    raw = _postgresql(session)
    if raw is not None:  # read by every consumer batch: the driver directly (see _postgresql)
        with raw.cursor() as cursor:
            cursor.execute(_PG_ERASED_CUSTOMERS, (tenant_id, wanted))
            return {customer for (customer,) in cursor.fetchall()}
    found: set[str] = set()
    for chunk in _chunks(wanted, 500):
        statement = select(ScoringErasure.customer_id).where(
            ScoringErasure.tenant_id == tenant_id, ScoringErasure.customer_id.in_(chunk)  # type: ignore[attr-defined]
        )
        found.update(session.execute(statement).scalars())
    return found


def erase_customer(session: Session, tenant_id: str, customer_id: str) -> dict[str, int]:
    """Delete everything scoring holds about one customer; returns rows deleted per table.

    The features row goes first: it is what a concurrent sweep page locks (lock_features), so on
    PostgreSQL the later statements see whatever that page committed and delete it too."""
    deleted: dict[str, int] = {}
    for table in (ScoringCustomerFeatures, ScoringScore, ScoringEventFlag, ScoringEvent):
        result = session.execute(delete(table).where(
            table.tenant_id == tenant_id, table.customer_id == customer_id,  # type: ignore[attr-defined]
        ))
        deleted[table.__tablename__] = int(result.rowcount or 0)  # type: ignore[attr-defined]
    return deleted


def add_tombstone(session: Session, tenant_id: str, customer_id: str, erasure_id: str, erased_at: datetime) -> None:
    """Insert-if-absent: the first erasure's id and time stay."""
    session.execute(
        dialect_insert(session, ScoringErasure.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["tenant_id", "customer_id"]
        ),
        [{"tenant_id": tenant_id, "customer_id": customer_id, "erasure_id": erasure_id, "erased_at": as_utc(erased_at)}],
    )


def tombstone(session: Session, tenant_id: str, customer_id: str) -> ScoringErasure | None:
    return session.get(ScoringErasure, (tenant_id, customer_id))


def lock_features(session: Session, tenant_id: str, customer_ids: Iterable[str]) -> set[str]:
    """Lock the features rows of these customers for this transaction; returns the customers
    that still have one (an erased customer's row is gone, so a sweep page skips them)."""
    wanted = sorted(set(customer_ids))
    found: set[str] = set()
    for chunk in _chunks(wanted, 500):
        statement = select(ScoringCustomerFeatures.customer_id).where(
            ScoringCustomerFeatures.tenant_id == tenant_id,
            ScoringCustomerFeatures.customer_id.in_(chunk),  # type: ignore[attr-defined]
        ).with_for_update()
        found.update(session.execute(statement).scalars())
    return found


def customer_events(session: Session, tenant_id: str, customer_id: str) -> list[ScoringEvent]:
    statement = select(ScoringEvent).where(
        ScoringEvent.tenant_id == tenant_id, ScoringEvent.customer_id == customer_id
    ).order_by(ScoringEvent.occurred_at, ScoringEvent.id)  # type: ignore[arg-type]
    return list(session.execute(statement).scalars())


def customer_scores(session: Session, tenant_id: str, customer_id: str) -> list[ScoringScore]:
    statement = select(ScoringScore).where(
        ScoringScore.tenant_id == tenant_id, ScoringScore.customer_id == customer_id
    ).order_by(ScoringScore.scored_at, ScoringScore.id)  # type: ignore[arg-type]
    return list(session.execute(statement).scalars())


def history_tenants(session: Session) -> list[str]:
    statement = select(ScoringEvent.tenant_id).distinct().order_by(ScoringEvent.tenant_id)
    return list(session.execute(statement).scalars())


def purge_history(session: Session, tenant_id: str, occurred_before: datetime) -> int:
    """Delete one tenant's raw events that occurred before `occurred_before` (and their flags);
    returns the number of events deleted. Features and scores computed from them stay."""
    cutoff = as_utc(occurred_before)
    old = select(ScoringEvent.event_id).where(
        ScoringEvent.tenant_id == tenant_id, ScoringEvent.occurred_at < cutoff
    )
    session.execute(delete(ScoringEventFlag).where(
        ScoringEventFlag.tenant_id == tenant_id,
        ScoringEventFlag.event_id.in_(old),  # type: ignore[attr-defined]
    ))
    result = session.execute(delete(ScoringEvent).where(
        ScoringEvent.tenant_id == tenant_id, ScoringEvent.occurred_at < cutoff
    ))
    deleted = int(result.rowcount or 0)
    if deleted:
        bump_history_mark(session, tenant_id)
    return deleted
