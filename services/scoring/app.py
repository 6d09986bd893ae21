"""The scoring service: consumes customer-events, keeps features and scores, publishes churn-scores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.scoring.config import ScoringSettings
from services.scoring.consumer import ScoringConsumer
from services.scoring.retention import HistoryPurger
from services.scoring.routes import internal_router, router
from services.scoring.sweeps import Sweeper
from services.scoring.tables import TABLES
from shared.app import create_service_app, settled_heap
from shared.clock import Clock, SystemClock
from shared.db import create_tables, make_engine, ping
from shared.kafka import Publisher


def create_app(settings: ScoringSettings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or ScoringSettings()
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        engine = make_engine(settings.database_url, echo=settings.database.database_echo)
        # The consumer's own, no pre-ping: two connections, one computing a batch while the
        # other writes the one before (services.scoring.consumer).
        consumer_engine = make_engine(settings.database_url, echo=settings.database.database_echo,
                                      pre_ping=False, pool_size=2)
        publisher = Publisher(settings.kafka, settings.client_id)
        scoring = ScoringConsumer(settings, consumer_engine, publisher, clock)
        sweeper = Sweeper(settings, engine, publisher, clock, lambda: scoring.predictor)
        purger = HistoryPurger(settings, engine, clock)
        try:
            await asyncio.to_thread(create_tables, engine, TABLES)
            await scoring.start()
            if settings.sweep_enabled:
                sweeper.start()
            if settings.retention_enabled:
                purger.start()

            async def database() -> bool:
                return await asyncio.to_thread(ping, engine)

            async def model() -> bool:
                return scoring.model_loaded

            async def consumer() -> bool:
                return scoring.consuming

            app.state.readiness.update(
                {"database": database, "broker": publisher.ping, "model": model, "consumer": consumer}
            )
            # Frozen at each model load (consumer.refresh_model); unfrozen when the app stops.
            with settled_heap():
                yield {"engine": engine, "scoring": scoring, "sweeper": sweeper, "purger": purger}
        finally:
            app.state.readiness.clear()
            await purger.stop()
            await sweeper.stop()
            await scoring.stop()
            await publisher.close()
            consumer_engine.dispose()
            engine.dispose()

    app = create_service_app(
        "scoring",
        title="churnguard scoring",
        description="Live churn probabilities from customer events; the model registry.",
        lifespan=lifespan,
        internal_token=settings.internal.internal_token.get_secret_value(),
    )
    app.include_router(router)
    app.include_router(internal_router)
    return app
