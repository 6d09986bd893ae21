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
from services.actions.consumer import ScoreConsumer
from services.actions.delivery import AiohttpSender, DeliveryWorker, WebhookSender
from services.actions.policies import HighRiskDiscountPolicy
from services.actions.routes import router
from services.actions.tables import TABLES
from services.actions.webhook_routes import router as webhook_router
from shared.app import create_service_app
from shared.clock import Clock, SystemClock
from shared.db import create_tables, make_engine, ping
from shared.kafka import Publisher

DESCRIPTION = """Decides on each churn score whether to act (threshold policy with a cooldown),
creates retention offers, and delivers them to subscribed marketing tools as signed
webhooks (Standard Webhooks), retried with backoff for more than a day, then parked for replay."""


def policy_from(settings: ActionsSettings) -> HighRiskDiscountPolicy:
    return HighRiskDiscountPolicy(
        threshold=settings.offer_threshold,
        cooldown=timedelta(days=settings.offer_cooldown_days),
        discount_percent=settings.discount_percent,
        validity=timedelta(days=settings.offer_validity_days),
    )


def delivery_worker_from(
    settings: ActionsSettings, engine: Engine, clock: Clock, sender: WebhookSender | None = None
) -> DeliveryWorker:
    return DeliveryWorker(
        engine,
        sender
        or AiohttpSender(
            allow_local=settings.webhook_allow_local_urls,
            max_connections=settings.delivery_max_in_flight,
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
    """`webhook_sender` replaces the aiohttp sender (tests wrap the real one to crash on cue)."""
    settings = settings or ActionsSettings()
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        engine = make_engine(
            settings.database.url_for("actions"), echo=settings.database.database_echo
        )
        publisher = Publisher(settings.kafka, settings.client_id)
        worker: DeliveryWorker | None = None
        consumer: ScoreConsumer | None = None
        try:
            await asyncio.to_thread(create_tables, engine, TABLES)
            worker = delivery_worker_from(settings, engine, clock, webhook_sender)
            consumer = ScoreConsumer(
                settings=settings.kafka,
                group_id=settings.group_id,
                client_id=settings.client_id,
                engine=engine,
                publisher=publisher,
                policy=policy_from(settings),
                clock=clock,
                on_deliveries=worker.wake,
            )
            worker.start()
            consumer.loop.start()
            running_worker, loop = worker, consumer.loop

            async def database() -> bool:
                return await asyncio.to_thread(ping, engine)

            async def consumer_alive() -> bool:
                return loop.alive

            async def delivery_worker_alive() -> bool:
                return running_worker.alive

            app.state.readiness = {
                "database": database,
                "broker": publisher.ping,
                "consumer": consumer_alive,
                "delivery_worker": delivery_worker_alive,
            }
            yield {
                "engine": engine,
                "clock": clock,
                "delivery_worker": worker,
                "settings": settings,
            }
        finally:
            app.state.readiness = {}
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
    return app
