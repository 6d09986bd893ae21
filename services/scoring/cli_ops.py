"""Plain functions the `churnguard` CLI calls (simulate history, train, registry checks).

Each opens its own engine on `database_url`, creates scoring's tables if missing, and
owns its transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from services.scoring import service
from services.scoring.model import InsufficientData, TrainReport
from services.scoring.simulate import simulate_history
from services.scoring.tables import TABLES
from shared.clock import SystemClock
from shared.db import create_tables, make_engine, session_scope

__all__ = ["InsufficientData", "TrainReport", "has_active_model", "list_models", "simulate", "train"]


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


def train(database_url: str, tenant_id: str, horizon_days: int = 90, activate: bool = True) -> TrainReport:
    """Train on the tenant's stored history and register the model (active if `activate`).
    Raises InsufficientData (a ValueError with a clear message) when there is too little."""
    with _engine(database_url) as engine:
        with session_scope(engine) as session:
            trained = service.train_for_tenant(session, tenant_id, horizon_days)
        with session_scope(engine) as session:
            return service.register_model(session, trained, tenant_id, activate)


def has_active_model(database_url: str) -> bool:
    with _engine(database_url) as engine, session_scope(engine) as session:
        return service.active_version(session) is not None


def list_models(database_url: str) -> list[dict[str, Any]]:
    with _engine(database_url) as engine, session_scope(engine) as session:
        return service.list_models(session)


def activate(database_url: str, version: str) -> bool:
    """Make `version` the active model (e.g. roll back); False if there is no such version."""
    with _engine(database_url) as engine, session_scope(engine) as session:
        return service.activate_model(session, version)
