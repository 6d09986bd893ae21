"""The actions service: churn scores -> retention decisions, offers and signed webhooks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine

from services.actions.config import ActionsSettings
from services.actions.consumer import EventConsumer, ScoreConsumer
from services.actions.delivery import DeliveryWorker, PooledSender, WebhookSender
from services.actions.policies import load_policy_file
from services.actions.routes import internal_router, router
from services.actions.service import PolicyCache, Rules
from services.actions.sweeps import ContractSweeper
from services.actions.tables import TABLES
from services.actions.webhook_routes import router as webhook_router
from shared.app import create_service_app, settled_heap
from shared.clock import Clock, SystemClock
from shared.db import create_tables, make_engine, ping
from shared.kafka import Publisher

DESCRIPTION = """Turns churn scores, contract ends and customer events into retention measures:
declarative policies (first match wins) with guardrails (consent, cooldowns, budgets, value
gate, holdout control group), every decision recorded with its reason, an uplift report
against the control group, and signed webhooks (Standard Webhooks) to marketing tools,
retried with backoff for more than a day, then parked for replay."""


def rules_from(settings: ActionsSettings) -> Rules:
    """Reads and validates the policy file: a bad file raises PolicyFileError naming the file,
    the path inside it and the reason, so the service does not start."""
    return Rules(
        default_document=load_policy_file(settings.policies_file),
        consent_required=settings.consent_required,
        holdout_percent=settings.holdout_percent,
        holdout_salt=settings.holdout_salt,
        cache=PolicyCache(settings.policy_cache_s),
    )


def delivery_worker_from(
    settings: ActionsSettings, engine: Engine, clock: Clock, sender: WebhookSender | None = None
) -> DeliveryWorker:
    return DeliveryWorker(
        engine,
        sender
        or PooledSender(
            allow_local=settings.webhook_allow_local_urls,
            max_connections=settings.delivery_max_in_flight,
            connect_timeout_s=settings.webhook_timeout_s,
        ),
        clock,
        retry_schedule_s=settings.retry_schedule_s,
        poll_s=settings.delivery_poll_s,
        batch_size=settings.delivery_batch_size,
        max_in_flight=settings.delivery_max_in_flight,
        attempt_timeout_s=settings.webhook_timeout_s,
        jitter=settings.retry_jitter,
        retry_after_cap_s=settings.retry_after_cap_s,
        endpoint_concurrency=settings.endpoint_concurrency,
        breaker_failure_threshold=settings.breaker_failure_threshold,
        breaker_cooldown_s=settings.breaker_cooldown_s,
    )


def create_app(
    settings: ActionsSettings | None = None,
    clock: Clock | None = None,
    webhook_sender: WebhookSender | None = None,
) -> FastAPI:
    """`webhook_sender` replaces the pooled HTTP sender (tests wrap a real one to crash on cue)."""
    settings = settings or ActionsSettings()
    clock = clock or SystemClock()
    rules = rules_from(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        engine = make_engine(
            settings.database.url_for("actions"), echo=settings.database.database_echo
        )
        publisher = Publisher(settings.kafka, settings.client_id)
        worker: DeliveryWorker | None = None
        consumer: ScoreConsumer | None = None
        events: EventConsumer | None = None
        sweeper: ContractSweeper | None = None
        try:
            await asyncio.to_thread(create_tables, engine, TABLES)
            worker = delivery_worker_from(settings, engine, clock, webhook_sender)
            consumer = ScoreConsumer(
                settings=settings.kafka,
                group_id=settings.group_id,
                client_id=settings.client_id,
                engine=engine,
                publisher=publisher,
                rules=rules,
                clock=clock,
                on_deliveries=worker.wake,
            )
            events = EventConsumer(
                settings=settings.kafka,
                group_id=f"{settings.group_id}-events",
                client_id=settings.client_id,
                engine=engine,
                publisher=publisher,
                rules=rules,
                clock=clock,
                trigger_max_age=timedelta(hours=settings.event_trigger_max_age_hours),
                on_deliveries=worker.wake,
            )
            sweeper = ContractSweeper(
                engine=engine,
                publisher=publisher,
                rules=rules,
                clock=clock,
                interval_s=settings.contract_sweep_interval_s,
                batch=settings.contract_sweep_batch,
                on_deliveries=worker.wake,
                uplift_horizon=timedelta(days=settings.uplift_horizon_days),
            )
            worker.start()
            consumer.loop.start()
            events.loop.start()
            if settings.contract_sweep_enabled:
                sweeper.start()
            running_worker, loop, events_loop = worker, consumer.loop, events.loop

            async def database() -> bool:
                return await asyncio.to_thread(ping, engine)

            async def consumer_alive() -> bool:
                return loop.alive

            async def events_consumer_alive() -> bool:
                return events_loop.alive

            async def delivery_worker_alive() -> bool:
                return running_worker.alive

            app.state.readiness = {
                "database": database,
                "broker": publisher.ping,
                "consumer": consumer_alive,
                "events_consumer": events_consumer_alive,
                "delivery_worker": delivery_worker_alive,
            }
            if settings.contract_sweep_enabled:
                running_sweeper = sweeper

                async def contract_sweep_alive() -> bool:
                    return running_sweeper.alive

                app.state.readiness["contract_sweep"] = contract_sweep_alive
            with settled_heap():
                yield {
                    "engine": engine,
                    "clock": clock,
                    "delivery_worker": worker,
                    "settings": settings,
                    "rules": rules,
                    "contract_sweeper": sweeper,
                }
        finally:
            app.state.readiness = {}
            if sweeper is not None:
                await sweeper.stop()
            if events is not None:
                await events.loop.stop()
            if consumer is not None:
                await consumer.loop.stop()
            if worker is not None:
                await worker.stop()
            await publisher.close()
            engine.dispose()

    app = create_service_app(
        service="actions",
        title="churnguard actions",
        description=DESCRIPTION,
        lifespan=lifespan,
        internal_token=settings.internal.internal_token.get_secret_value(),
    )
    app.include_router(router)
    app.include_router(webhook_router)
    app.include_router(internal_router)
    return app
