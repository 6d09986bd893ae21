"""Schema creation when several processes (workers, replicas) start at once, additive schema
evolution when a newer version starts on an existing database, and what every connection
guarantees: UTC times, and a lost connection replaced without a pre-ping."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from sqlalchemy import Engine, column, inspect, text
from sqlalchemy import select as sql_select
from sqlalchemy.exc import OperationalError
from sqlmodel import select

from services.ingest.tables import TABLES as INGEST_TABLES
from services.scoring.tables import TABLES as SCORING_TABLES
from services.scoring.tables import ScoringModel
from shared.db import (
    SchemaMismatch,
    UtcDateTime,
    add_missing_columns,
    create_tables,
    make_engine,
    session_scope,
)


def test_many_processes_creating_their_tables_at_once_do_not_collide(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(6)]
    try:
        with ThreadPoolExecutor(max_workers=len(engines)) as pool:
            results = list(pool.map(lambda engine: create_tables(engine, [*INGEST_TABLES, *SCORING_TABLES]), engines))
        assert results == [None] * len(engines)
        create_tables(engines[0], INGEST_TABLES)  # and again later: nothing to do, no error
    finally:
        for engine in engines:
            engine.dispose()


def _old_registry(engine: Engine, dropped: str) -> None:
    """scoring_models as an earlier version left it: one model stored, without column `dropped`."""
    create_tables(engine, [ScoringModel])
    with session_scope(engine) as session:
        session.add(ScoringModel(
            version="m-old", algorithm="logistic_regression", roc_auc=0.8, baseline_auc=0.6,
            feature_names=["tenure_days"], n_train=10, n_holdout=5, horizon_days=90, trained_on_tenant="t",
            trained_at=datetime(2026, 1, 1, tzinfo=timezone.utc), artifact=b"x",
        ))
    with engine.begin() as connection:
        connection.exec_driver_sql(f"ALTER TABLE scoring_models DROP COLUMN {dropped}")


def test_a_column_added_by_a_newer_version_is_added_to_an_existing_table(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        _old_registry(engine, "reasons_reference")
        create_tables(engine, [ScoringModel])  # the newer version starts
        assert "reasons_reference" in {c["name"] for c in inspect(engine).get_columns("scoring_models")}
        with session_scope(engine) as session:
            row = session.exec(select(ScoringModel).where(ScoringModel.version == "m-old")).one()
            assert row.reasons_reference == {}  # the existing row got the server default
        with engine.begin() as connection:
            assert add_missing_columns(connection, {"scoring_models"}) == []  # nothing left to add
    finally:
        engine.dispose()


def test_a_required_column_that_cannot_be_added_is_refused_by_name(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        _old_registry(engine, "horizon_days")
        with pytest.raises(SchemaMismatch, match="table scoring_models lacks column horizon_days"):
            create_tables(engine, [ScoringModel])
    finally:
        engine.dispose()


def test_times_read_back_are_aware_utc_whatever_the_server_zone(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                # The server's own zone is not UTC for this session's default: our connections say UTC.
                assert connection.execute(text("SHOW TIME ZONE")).scalar() == "UTC"
            connection.execute(text("CREATE TABLE stamps (at TIMESTAMP WITH TIME ZONE)"))
            connection.execute(text("INSERT INTO stamps VALUES (:at)"),
                               {"at": datetime(2026, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))})
            (at,) = connection.execute(sql_select(column("at", UtcDateTime())).select_from(text("stamps"))).one()
        assert at == datetime(2026, 5, 1, 12, 30, tzinfo=timezone.utc)
        assert at.tzinfo is timezone.utc
    finally:
        engine.dispose()


def test_a_connection_lost_without_pre_ping_fails_once_and_the_next_unit_of_work_reconnects(
    database_url: str,
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no server connection to lose")
    engine = make_engine(database_url, pre_ping=False, pool_size=1)
    try:
        with session_scope(engine) as session:
            first_pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
        with psycopg.connect(database_url) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
        with pytest.raises(OperationalError), session_scope(engine) as session:
            session.execute(text("SELECT 1"))
        with session_scope(engine) as session:
            assert session.execute(text("SELECT pg_backend_pid()")).scalar() != first_pid
    finally:
        engine.dispose()
