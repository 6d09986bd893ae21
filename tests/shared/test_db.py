"""Schema creation when several processes (workers, replicas) start at once, and additive schema
evolution when a newer version starts on an existing database."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
from sqlalchemy import Engine, inspect
from sqlmodel import select

from services.ingest.tables import TABLES as INGEST_TABLES
from services.scoring.tables import TABLES as SCORING_TABLES
from services.scoring.tables import ScoringModel
from shared.db import SchemaMismatch, add_missing_columns, create_tables, make_engine, session_scope


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
