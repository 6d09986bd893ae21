"""All of scoring's SQL. Every query on tenant data filters by tenant_id.

Idempotent writes use INSERT ... ON CONFLICT, which SQLite and PostgreSQL both speak.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import Session

from services.scoring.features import HistoryEvent, as_utc
from services.scoring.tables import ScoringCustomerFeatures, ScoringEvent, ScoringModel, ScoringScore
from shared.db import dialect_insert

_CHUNK = 1000


def _chunks(rows: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


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


def insert_events(session: Session, rows: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """Insert-if-absent; returns the (tenant_id, event_id) pairs that were new.

    rows: tenant_id, event_id, customer_id, type, occurred_at, received_at, payload.
    """
    inserted: set[tuple[str, str]] = set()
    table = ScoringEvent.__table__  # type: ignore[attr-defined]
    statement = _insert_events_statement(session).returning(table.c.tenant_id, table.c.event_id)
    for chunk in _chunks(list(rows)):
        # executemany with RETURNING: compiled once, sent as multi-row INSERTs
        inserted.update((tenant, event) for tenant, event in session.execute(statement, _event_values(chunk)))
    return inserted


def import_events(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Bulk insert-if-absent without reporting which rows were new (backfills, simulation):
    a plain executemany, which the PostgreSQL driver pipelines."""
    if rows:
        session.execute(_insert_events_statement(session), _event_values(rows))


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


def load_histories(session: Session, tenant_id: str, customer_ids: Iterable[str]) -> dict[str, list[HistoryEvent]]:
    """The stored history of some customers of one tenant, customer id -> events."""
    wanted = sorted(set(customer_ids))
    histories: dict[str, list[HistoryEvent]] = {}
    for chunk in _chunks(wanted, 500):
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


def upsert_features(
    session: Session, tenant_id: str, features: Mapping[str, Mapping[str, float]], updated_at: datetime
) -> None:
    if not features:
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
    )
    session.execute(statement, values)


def upsert_scores(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """rows: score_id (unique), tenant_id, customer_id, probability, band, model_version,
    scored_at, event_id. A re-scored event (redelivery) keeps its score_id; the row takes
    the newest computation."""
    if not rows:
        return
    table = ScoringScore.__table__  # type: ignore[attr-defined]
    for chunk in _chunks(list(rows)):
        values = [{**row, "scored_at": as_utc(row["scored_at"])} for row in chunk]
        statement = dialect_insert(session, table)
        statement = statement.on_conflict_do_update(
            index_elements=["score_id"],
            set_={name: statement.excluded[name] for name in ("probability", "band", "model_version", "scored_at")},
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
    ScoringModel.id, ScoringModel.version, ScoringModel.algorithm, ScoringModel.roc_auc,
    ScoringModel.baseline_auc, ScoringModel.feature_names, ScoringModel.n_train, ScoringModel.n_holdout,
    ScoringModel.horizon_days, ScoringModel.trained_on_tenant, ScoringModel.trained_at, ScoringModel.active,
)


def list_models(session: Session) -> list[dict[str, Any]]:
    """The registry without artifacts, newest first."""
    statement = select(*_MODEL_INFO_COLUMNS).order_by(ScoringModel.trained_at.desc(), ScoringModel.id.desc())  # type: ignore[union-attr]
    return [dict(row._mapping) for row in session.execute(statement)]


def active_model_version(session: Session) -> str | None:
    statement = select(ScoringModel.version).where(ScoringModel.active == True)  # noqa: E712
    return session.execute(statement).scalars().first()


def active_model(session: Session) -> ScoringModel | None:
    statement = select(ScoringModel).where(ScoringModel.active == True)  # noqa: E712
    return session.execute(statement).scalars().first()


def add_model(session: Session, row: ScoringModel) -> ScoringModel:
    """Insert a model; if it is to be active, the previously active one is deactivated first."""
    if row.active:
        deactivate_all(session)
    session.add(row)
    session.flush()
    return row


def deactivate_all(session: Session) -> None:
    session.execute(update(ScoringModel).where(ScoringModel.active == True).values(active=False))  # noqa: E712
    session.flush()


def activate_model(session: Session, version: str) -> bool:
    exists = session.execute(select(ScoringModel.id).where(ScoringModel.version == version)).first()
    if exists is None:
        return False
    deactivate_all(session)
    session.execute(update(ScoringModel).where(ScoringModel.version == version).values(active=True))
    return True
