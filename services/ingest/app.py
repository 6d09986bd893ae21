"""ingest: the front door for customer events. Owns the event contract; writes `customer-events`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from services.ingest.config import IngestSettings
from services.ingest.erasure import ErasedCustomers, ErasureService, StatusConsumer
from services.ingest.erasure_routes import internal_router as erasure_internal_router
from services.ingest.erasure_routes import router as erasure_router
from services.ingest.routes import router
from services.ingest.ledger import EventIdLedger
from services.ingest.service import IngestService
from services.ingest.sources.routes import router as sources_router
from services.ingest.sources.service import SourceService
from services.ingest.tables import TABLES
from shared.app import create_service_app, settled_heap
from shared.clock import Clock, SystemClock
from shared.db import create_tables, make_engine, ping
from shared.events import customer_event_adapter
from shared.kafka import Publisher


def create_app(settings: IngestSettings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        publisher = Publisher(settings.kafka, client_id="ingest", send_timeout_s=settings.publish_timeout_s)
        engine = make_engine(settings.database.url_for("ingest"), echo=settings.database.database_echo)
        # The ledger's own: no ping per checkout (services/ingest/ledger.py); one lookup and one
        # write round at a time need no more than two connections.
        ledger_engine = make_engine(settings.database.url_for("ingest"), echo=settings.database.database_echo,
                                    pre_ping=False, pool_size=2)
        ledger: EventIdLedger | None = None
        erased = ErasedCustomers(engine, settings.erasure_refresh_s)
        status = StatusConsumer(settings.kafka, "ingest-erasure-status", engine)
        try:
            await asyncio.to_thread(create_tables, engine, TABLES)
            app.state.settings = settings
            ledger = EventIdLedger(ledger_engine)
            ledger.start()
            await erased.refresh()
            erased.start()
            status.start()
            app.state.service = IngestService(publisher, clock, ledger, erased)
            app.state.erasures = ErasureService(engine, publisher, clock, erased)
            app.state.sources = SourceService(engine, clock)
            # Ready = the broker takes events. The id table only sharpens the "duplicate" answer
            # (events are still deduplicated where they are stored), so it is reported, not gating.
            app.state.readiness = {"broker": publisher.ping}
            app.state.diagnostics = {
                "database": lambda: asyncio.to_thread(ping, engine),
                "erasure_status_consumer": _alive(status),
            }
            with settled_heap():
                yield
        finally:
            await status.stop()
            await erased.stop()
            if ledger is not None:
                await ledger.stop()
            await publisher.close()
            engine.dispose()
            ledger_engine.dispose()

    app = create_service_app(
        "ingest",
        title="churnguard ingest",
        description="Customer events in: validated against the contract, acknowledged once the broker has them.",
        lifespan=lifespan,
        internal_token=settings.internal.internal_token.get_secret_value(),
    )
    app.include_router(router)
    app.include_router(sources_router)
    app.include_router(erasure_router)
    app.include_router(erasure_internal_router)
    app.openapi = lambda: _openapi_with_contract(app)  # type: ignore[method-assign]
    return app


def _alive(loop: Any) -> Any:
    async def alive() -> bool:
        return bool(loop.alive)

    return alive


def _openapi_with_contract(app: FastAPI) -> dict[str, Any]:
    """The routes read raw bodies (to stream with limits and report per-index errors), so the
    contract's schemas are added to the components by hand."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    contract = customer_event_adapter.json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(contract.pop("$defs", {}))
    components["CustomerEvent"] = contract
    app.openapi_schema = schema
    return schema
