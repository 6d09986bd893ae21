"""Schema creation when several processes (workers, replicas) start at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from services.ingest.tables import TABLES as INGEST_TABLES
from services.scoring.tables import TABLES as SCORING_TABLES
from shared.db import create_tables, make_engine


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
