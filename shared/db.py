"""Database engine and sessions: SQLModel over SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import logging
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sqlalchemy import Connection, DateTime, Engine, event, inspect, text
from sqlalchemy.engine import Dialect
from sqlalchemy.engine import make_url
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, SQLModel, create_engine

log = logging.getLogger(__name__)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend: PostgreSQL keeps timestamptz, SQLite (which has no
    time zones) stores naive UTC, and both read back as aware UTC, so comparisons with the
    injected clock's `now()` are consistent."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: domain times must be timezone-aware")
        value = value.astimezone(timezone.utc)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the driver we ship)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# JSON columns (features, payloads, reasons) are encoded and decoded with orjson: several times
# faster than the standard library on the scoring path, same JSON.
JSON_CODEC: dict[str, Any] = {
    "json_serializer": lambda value: orjson.dumps(value, default=_json_default).decode(),
    "json_deserializer": orjson.loads,
}


SQLITE_CACHED_STATEMENTS = 8
"""Prepared statements each SQLite connection keeps (Python's default: 128). SQLite sees an
`IN (...)` list or a multi-row insert of n rows as a statement of its own for every n, and a
batch's statements (1,000 ids; 1,000 rows of 7 columns) compile to large programs, kept in
SQLite's C heap. With 128 kept, scoring's resident memory grew ~11 MB with every 20,000-event
backlog of new customers and did not level off (236 -> 308 MB over seven); with 8, 231 -> 248
MB over six, and `bench.scoring`'s SQLite peak 264-269 -> 249-250 MB, events/s within the
runs' noise (interleaved pairs). Re-preparing a small statement costs microseconds."""


def make_engine(url: str, echo: bool = False, *, pre_ping: bool = True, pool_size: int = 5) -> Engine:
    """`pre_ping=False` is for a caller that retries a failed unit of work anyway (a consumer
    retries its batch): a connection lost since its last use then fails one try, and SQLAlchemy
    replaces the pool's connections, instead of every checkout paying a ping (on PostgreSQL
    three round trips, a third of those of a one-event scoring batch). SQLite ignores both."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={
                "check_same_thread": False, "timeout": 30, "cached_statements": SQLITE_CACHED_STATEMENTS,
            }, **JSON_CODEC,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_engine(
        url, echo=echo, pool_pre_ping=pre_ping, pool_size=pool_size, max_overflow=10,
        # No server-side prepared statements: after five runs PostgreSQL switches to a generic
        # plan, and for our `id IN (...500 ids...)` lookups that plan stops using the index
        # (measured: 7 ms growing to 170 ms per lookup over a 20k-event backfill; 5 ms flat without).
        connect_args={"connect_timeout": 5, "prepare_threshold": None}, **JSON_CODEC,
    )

    @event.listens_for(engine, "connect")
    def _utc_session(dbapi_connection, _record):  # noqa: ANN001
        # Timestamps then come back in UTC itself (datetime.timezone.utc), which domain code
        # uses as is; in the server's zone (e.g. Etc/UTC) every value read was converted again
        # (scoring reads its histories row by row: 5% of its CPU at 1,000 events/s).
        dbapi_connection.execute("SET TIME ZONE 'UTC'")
        dbapi_connection.commit()

    return engine


def dialect_insert(session: Session, table: Any) -> Any:
    """An INSERT that supports ON CONFLICT on both backends we run on."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"churnguard supports SQLite and PostgreSQL, not {dialect}")


SCHEMA_LOCK_ID = 0x63675F73636865  # any constant: one advisory lock for all schema creation


class SchemaMismatch(RuntimeError):
    """An existing table lacks a column this version needs and cannot add by itself."""


def create_tables(engine: Engine, tables: Sequence[type[SQLModel]]) -> None:
    """Each service creates only the tables it owns, and adds to its existing tables the columns a
    newer version added (schema changes are additive within a major version, like the event
    contract). Processes starting together (workers, replicas) take turns: concurrent
    CREATE TABLE IF NOT EXISTS can collide on both backends."""
    table_names = {t.__tablename__ for t in tables}  # type: ignore[attr-defined]
    if engine.dialect.name == "sqlite":
        # No advisory locks in SQLite: an explicit exclusive transaction makes the others wait
        # (busy_timeout) until this process's tables exist (the driver's own transaction handling
        # would run each CREATE on its own, so two processes could both try one).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("BEGIN EXCLUSIVE")
            try:
                _create(connection, tables, table_names)
                connection.exec_driver_sql("COMMIT")
            except BaseException:
                connection.exec_driver_sql("ROLLBACK")
                raise
        return
    with engine.begin() as connection:
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_ID})")
        _create(connection, tables, table_names)


def _create(connection: Connection, tables: Sequence[type[SQLModel]], table_names: set[str]) -> None:
    SQLModel.metadata.create_all(connection, tables=[t.__table__ for t in tables])  # type: ignore[attr-defined]
    add_missing_columns(connection, table_names)


def add_missing_columns(connection: Connection, table_names: set[str]) -> list[str]:
    """Alembic compares the tables with the models; each column a model has and its table lacks
    is added when it can be (nullable, or with a server default for the existing rows). Other
    differences are left alone. Returns "table.column" of what was added.

    Alembic is imported only when a column is missing: a service's resident memory does not
    carry it (~12 MB with Mako) for the usual start, on tables that already match."""
    present = inspect(connection)
    if all({column.name for column in SQLModel.metadata.tables[name].columns}
           <= {column["name"] for column in present.get_columns(name)} for name in table_names):
        return []
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    context = MigrationContext.configure(connection, opts={
        "include_name": lambda name, type_, _parent: type_ != "table" or name in table_names,
    })
    operations = Operations(context)
    added: list[str] = []
    for diff in compare_metadata(context, SQLModel.metadata):
        if not (isinstance(diff, tuple) and diff[0] == "add_column" and diff[2] in table_names):
            continue
        _, _schema, table, column = diff
        if not column.nullable and column.server_default is None:
            raise SchemaMismatch(
                f"table {table} lacks column {column.name}, which this version needs and cannot add to "
                "existing rows (NOT NULL without a default): migrate the database or start on a new one"
            )
        operations.add_column(table, column._copy())
        added.append(f"{table}.{column.name}")
        log.warning("schema: added column %s.%s", table, column.name)
    return added


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error (the edge owns the boundary)."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def ping(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
