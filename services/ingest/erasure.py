"""Erasure requests (GDPR Art. 17) at the front door, their status, and suppression.

`DELETE /v1/customers/{id}` records an erasure (one per tenant and customer: a repeat returns
the same one), deletes what ingest itself holds about the customer (order -> customer links of
upstream sources), and publishes an ErasureRecord on customer-events with the customer's
partition key. scoring and actions erase in their consumers and report on `erasure-status`;
`StatusConsumer` records each report, and the erasure is complete once both have reported.

The erasure record is also ingest's tombstone: `ErasedCustomers` keeps the erased (tenant,
customer) pairs in memory (refreshed from the table every `erasure_refresh_s`; the instance
that takes the DELETE knows at once), and IngestService answers a later event of an erased
customer 202 with `suppressed` instead of publishing it. Suppression is permanent: a person who
returns gets a new customer id from the tenant. scoring and actions suppress on their own
tombstones too, so an event another ingest instance lets through before its refresh changes
nothing.

`ingest_event_ids` is kept: it holds (tenant, event id, type, received_at) and no customer id,
and keeping it makes a resend of an erased customer's old event a "duplicate", not a new event.
Senders should not put personal data into event ids.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.ingest import metrics, repository
from services.ingest.tables import IngestErasure
from shared.clock import Clock
from shared.db import session_scope
from shared.events import ErasureRecord, ErasureStatusRecord, new_id
from shared.kafka import Publisher, consumer_options
from shared.settings import KafkaSettings
from shared.tasks import stop_gracefully
from shared.topics import CUSTOMER_EVENTS, ERASURE_STATUS

log = logging.getLogger(__name__)

SERVICES = ("ingest", *repository.ERASING_SERVICES)


class ErasedCustomers:
    """The erased (tenant, customer) pairs, in memory, for the per-event suppression check."""

    def __init__(self, engine: Engine, refresh_s: float) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._pairs: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair in self._pairs

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def add(self, tenant_id: str, customer_id: str) -> None:
        self._pairs.add((tenant_id, customer_id))

    async def refresh(self) -> None:
        def load() -> set[tuple[str, str]]:
            with self._engine.connect() as connection:
                return repository.all_erased(connection)

        try:
            self._pairs = self._pairs | await asyncio.to_thread(load)
        except SQLAlchemyError as exc:
            log.warning("cannot refresh erased customers (%s); keeping the %d known", type(exc).__name__,
                        len(self._pairs))

    def start(self) -> None:
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="ingest:erased-customers")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await stop_gracefully(self._task, timeout_s=5)
            self._task = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.refresh()
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._refresh_s)
            except TimeoutError:
                pass


@dataclass(frozen=True)
class ServiceStatus:
    status: str  # pending, done
    done_at: datetime | None


@dataclass(frozen=True)
class ErasureView:
    erasure_id: str
    customer_id: str
    requested_at: datetime
    requested_by: str
    status: str  # pending, done
    services: dict[str, ServiceStatus]
    completed_at: datetime | None

    @classmethod
    def of(cls, row: IngestErasure) -> ErasureView:
        services = {
            name: ServiceStatus("done" if done is not None else "pending", done)
            for name in SERVICES
            for done in [getattr(row, f"{name}_done_at")]
        }
        return cls(row.erasure_id, row.customer_id, row.requested_at, row.requested_by,
                   "done" if row.completed_at is not None else "pending", services, row.completed_at)


class ErasureNotFound(LookupError):
    pass


class ErasureService:
    def __init__(self, engine: Engine, publisher: Publisher, clock: Clock, erased: ErasedCustomers) -> None:
        self._engine = engine
        self._publisher = publisher
        self._clock = clock
        self._erased = erased

    async def request(self, tenant_id: str, customer_id: str, requested_by: str) -> tuple[ErasureView, bool]:
        """Record (or find) the customer's erasure and (re-)publish its control record while it
        is pending. Returns (erasure, created). Raises BrokerUnavailable when the broker does not
        take the control record: the erasure stays recorded and a retry sends it again."""
        now = self._clock.now()

        def record() -> tuple[IngestErasure, bool]:
            erasure_id = "er_" + new_id()
            with session_scope(self._engine) as session:
                row = repository.add_erasure(session, {
                    "erasure_id": erasure_id, "tenant_id": tenant_id, "customer_id": customer_id,
                    "requested_at": now, "requested_by": requested_by, "ingest_done_at": now,
                })
                repository.erase_source_orders(session, tenant_id, customer_id)
                return row, row.erasure_id == erasure_id

        row, created = await asyncio.to_thread(record)
        self._erased.add(tenant_id, customer_id)
        if row.completed_at is None:
            control = ErasureRecord(erasure_id=row.erasure_id, tenant_id=tenant_id, customer_id=customer_id,
                                    requested_at=row.requested_at)
            try:
                await self._publisher.publish(CUSTOMER_EVENTS, control.key, control.to_json())
            except Exception:
                metrics.ERASURES_REQUESTED.labels("broker_unavailable").inc()
                raise
        metrics.ERASURES_REQUESTED.labels("created" if created else "repeated").inc()
        return ErasureView.of(row), created

    async def by_id(self, tenant_id: str, erasure_id: str) -> ErasureView:
        def read() -> IngestErasure | None:
            with session_scope(self._engine) as session:
                return repository.get_erasure(session, tenant_id, erasure_id)

        row = await asyncio.to_thread(read)
        if row is None:
            raise ErasureNotFound(f"no erasure {erasure_id!r}")
        return ErasureView.of(row)

    async def of_customer(self, tenant_id: str, customer_id: str) -> ErasureView:
        def read() -> IngestErasure | None:
            with session_scope(self._engine) as session:
                return repository.customer_erasure(session, tenant_id, customer_id)

        row = await asyncio.to_thread(read)
        if row is None:
            raise ErasureNotFound(f"no erasure of customer {customer_id!r}")
        return ErasureView.of(row)

    async def export(self, tenant_id: str, customer_id: str) -> dict[str, Any]:
        """What ingest holds about the customer: the erasure record, and the upstream sources'
        orders linked to them. (Event ids are not kept per customer.)"""
        def read() -> tuple[IngestErasure | None, list[Any]]:
            with session_scope(self._engine) as session:
                return (repository.customer_erasure(session, tenant_id, customer_id),
                        repository.source_orders_of(session, tenant_id, customer_id))

        row, orders = await asyncio.to_thread(read)
        section = {
            "erasure": None if row is None else _view_json(ErasureView.of(row)),
            "source_orders": [{"source": o.source, "order_id": o.order_id, "seen_at": o.seen_at.isoformat()}
                              for o in orders],
        }
        return {**section, "held": bool(row is not None or orders)}


def _view_json(view: ErasureView) -> dict[str, Any]:
    return {
        "erasure_id": view.erasure_id, "customer_id": view.customer_id,
        "requested_at": view.requested_at.isoformat(), "requested_by": view.requested_by,
        "status": view.status, "completed_at": view.completed_at.isoformat() if view.completed_at else None,
        "services": {name: {"status": s.status, "done_at": s.done_at.isoformat() if s.done_at else None}
                     for name, s in view.services.items()},
    }


STATUS_FETCH_WAIT_MS = 500


class StatusConsumer:
    """erasure-status -> the erasure record (idempotent: the first report per service wins).

    Reads every partition from the beginning without a consumer group: the topic is small (one
    record per service and erasure, kept 7 days), applying a report again changes nothing, and
    without a group there is no join or rebalance to wait for when ingest starts or stops. Every
    ingest instance applies every report. A report older than the topic's retention is gone; a
    repeated DELETE of a still pending erasure re-sends the control record and so the reports."""

    def __init__(self, settings: KafkaSettings, client_id: str, engine: Engine, retry_s: float = 1.0) -> None:
        self._settings = settings
        self._client_id = client_id
        self._engine = engine
        self._retry_s = retry_s
        self._task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest:erasure-status")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        topic = self._settings.topic(ERASURE_STATUS)
        while True:
            consumer = AIOKafkaConsumer(**{
                **consumer_options(self._settings, "", self._client_id), "group_id": None,
                # Reports may wait half a second; a fetch every 10 ms (the services' setting,
                # see DESIGN.md on the embedded broker) cost each idle ingest process and the
                # broker about 5% of a core each.
                "fetch_max_wait_ms": max(self._settings.fetch_max_wait_ms, STATUS_FETCH_WAIT_MS),
            })
            try:
                await consumer.start()
                partitions = sorted(consumer.partitions_for_topic(topic) or ())
                if not partitions:
                    await consumer.stop()
                    await asyncio.sleep(self._retry_s)  # the topic is not there yet
                    continue
                assigned = [TopicPartition(topic, p) for p in partitions]
                consumer.assign(assigned)
                await consumer.seek_to_beginning(*assigned)
                while True:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        reports = []
                        for record in records:
                            try:
                                reports.append(ErasureStatusRecord.model_validate_json(record.value or b""))
                            except ValueError as exc:
                                log.warning("erasure-status record at offset %d ignored: %s", record.offset, exc)
                        if reports:
                            await self.apply(reports)
            except asyncio.CancelledError:
                raise
            except Exception:  # broker or database trouble: start over (applying again is harmless)
                log.exception("erasure-status: reading failed; retrying")
                await asyncio.sleep(self._retry_s)
            finally:
                await consumer.stop()

    async def apply(self, reports: list[ErasureStatusRecord]) -> None:
        completed = await asyncio.to_thread(self._record, reports)
        metrics.ERASURES_COMPLETED.inc(completed)

    def _record(self, reports: list[ErasureStatusRecord]) -> int:
        completed = 0
        with session_scope(self._engine) as session:
            for report in reports:
                before = repository.get_erasure(session, report.tenant_id, report.erasure_id)
                if before is None:
                    log.warning("erasure-status names an unknown erasure %s; ignored", report.erasure_id)
                    continue
                was_complete = before.completed_at is not None
                repository.mark_service_done(session, report.tenant_id, report.erasure_id, report.service,
                                             report.done_at)
                session.flush()
                after = repository.get_erasure(session, report.tenant_id, report.erasure_id)
                if not was_complete and after is not None and after.completed_at is not None:
                    completed += 1
        return completed
