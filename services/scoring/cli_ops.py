"""Plain functions the `churnguard` CLI calls (simulate history, train, evaluate, registry).

Each opens its own engine on `database_url`, creates scoring's tables if missing, and
owns its transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from services.scoring import evaluate as evaluation
from services.scoring import service
from services.scoring.model import MIN_PER_CLASS, InsufficientData, TrainReport
from services.scoring.simulate import simulate_history
from services.scoring.tables import TABLES
from shared.clock import SystemClock
from shared.db import create_tables, make_engine, session_scope

__all__ = [
    "InsufficientData", "TrainReport", "activate", "evaluate", "has_active_model", "list_models", "simulate", "train",
]


@contextmanager
def _engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        yield engine
    finally:
        engine.dispose()


def simulate(
    database_url: str | None, tenant_id: str, customers: int, seed: int,
    end: datetime | None = None, out: Path | None = None,
) -> int:
    """Simulate `customers` histories ending at `end` (default: now). Stores them in the
    scoring event history of `tenant_id` when `database_url` is given, and/or writes them as
    NDJSON event envelopes (what ingest accepts) to `out`. Returns the number of events."""
    if database_url is None and out is None:
        raise ValueError("give a database_url, an output file, or both")
    end = end or SystemClock().now()
    events = simulate_history(customers, seed, end)
    handle = open(out, "w", encoding="utf-8") if out is not None else None  # noqa: SIM115

    def tee() -> Iterator[dict[str, Any]]:
        for event in events:
            if handle is not None:
                handle.write(json.dumps(event, separators=(",", ":")) + "\n")
            yield event

    try:
        if database_url is None:
            return sum(1 for _ in tee())
        with _engine(database_url) as engine, session_scope(engine) as session:
            return service.store_history(session, tenant_id, tee())
    finally:
        if handle is not None:
            handle.close()


def train(
    database_url: str, tenant_id: str, horizon_days: int = 90, activate: bool = True, *,
    reports_dir: Path | None = evaluation.DEFAULT_REPORTS_DIR, min_per_class: int = MIN_PER_CLASS,
    **options: Any,
) -> TrainReport:
    """Train on the tenant's stored history, register the model (active if `activate`) and
    write its evaluation report under `reports_dir/<version>/` (none if `reports_dir` is None).
    Raises InsufficientData (a ValueError with a clear message) when there is too little."""
    with _engine(database_url) as engine:
        with session_scope(engine) as session:
            trained = service.train_for_tenant(session, tenant_id, horizon_days, min_per_class=min_per_class, **options)
        with session_scope(engine) as session:
            report = service.register_model(session, trained, tenant_id, activate)
        if reports_dir is not None:
            report = replace(report, report_path=str(_write_report(engine, report.version, reports_dir)))
        return report


def _write_report(engine: Engine, version: str, reports_dir: Path) -> Path:
    with session_scope(engine) as session:
        model = service.model_detail(session, version, with_validation=True)
    path = evaluation.write_report(model, reports_dir)
    with session_scope(engine) as session:
        service.set_report_path(session, version, str(path))
    return path


def evaluate(database_url: str, version: str | None = None, reports_dir: Path = evaluation.DEFAULT_REPORTS_DIR) -> Path:
    """(Re)draw the evaluation report of `version` (default: the active model, else the newest)
    and return its index.html. Raises service.ModelNotFound or evaluate.ReportUnavailable."""
    with _engine(database_url) as engine:
        with session_scope(engine) as session:
            chosen = service.resolve_version(session, version)
        return _write_report(engine, chosen, reports_dir)


def has_active_model(database_url: str) -> bool:
    with _engine(database_url) as engine, session_scope(engine) as session:
        return service.active_version(session) is not None


def list_models(database_url: str) -> list[dict[str, Any]]:
    with _engine(database_url) as engine, session_scope(engine) as session:
        return service.list_models(session)


def activate(database_url: str, version: str) -> bool:
    """Make `version` the active model (e.g. roll back); False if there is no such version."""
    with _engine(database_url) as engine, session_scope(engine) as session:
        return service.activate_model(session, version, SystemClock().now())
