"""Ingest logic: validate against the shared contract, stamp tenant and arrival, publish."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.ingest import metrics, repository
from shared.clock import Clock
from shared.db import session_scope
from shared.events import EVENT_TYPES, EventRecord, parse_event
from shared.kafka import Publisher
from shared.tasks import stop_gracefully
from shared.topics import CUSTOMER_EVENTS

log = logging.getLogger(__name__)
MAX_NESTING = 16


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class MalformedJson(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise MalformedJson(f"{name} is not valid JSON; numbers must be finite")


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no NUL characters, nesting at most MAX_NESTING."""
    if not body.strip():
        raise MalformedJson("request body is empty; expected a JSON object")
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise MalformedJson(f"JSON nested too deeply (at most {MAX_NESTING} levels)") from exc
    _check_structure(value, 1)
    return value


def _check_structure(value: Any, depth: int) -> None:
    if depth > MAX_NESTING:
        raise MalformedJson(f"JSON nested too deeply (at most {MAX_NESTING} levels)")
    if isinstance(value, str):
        if "\x00" in value:
            raise MalformedJson("strings must not contain NUL (\\u0000) characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_structure(key, depth)
            _check_structure(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_structure(item, depth + 1)


def describe(error: ValidationError, raw: Any, index: int | None = None) -> list[FieldError]:
    """Turn pydantic's errors into `field: message` pairs a sender can act on."""
    event_type = raw.get("type") if isinstance(raw, dict) else None
    found: list[FieldError] = []
    for item in error.errors(include_url=False):
        loc = list(item["loc"])
        if loc and loc[0] == event_type:  # the discriminator's branch name, not a field
            loc = loc[1:]
        kind = item["type"]
        if kind == "union_tag_invalid":
            found.append(FieldError("type", f"unknown event type {event_type!r}; expected one of: {', '.join(EVENT_TYPES)}", index))
        elif kind == "union_tag_not_found":
            found.append(FieldError("type", "missing; every event needs a 'type'", index))
        elif kind == "model_attributes_type" or (kind == "model_type" and not loc):
            found.append(FieldError("(event)", "must be a JSON object", index))
        else:
            field = ".".join(str(part) for part in loc) or "(event)"
            message = "required field is missing" if kind == "missing" else item["msg"]
            found.append(FieldError(field, message, index))
    return found


def validate(raw: Any, index: int | None = None, now: datetime | None = None) -> BaseModel | list[FieldError]:
    if not isinstance(raw, dict):
        return [FieldError("(event)", "must be a JSON object", index)]
    try:
        return parse_event(raw, now=now)
    except ValidationError as exc:
        return describe(exc, raw, index)


@dataclass
class PublishResult:
    accepted: list[Any] = field(default_factory=list)
    duplicates: list[Any] = field(default_factory=list)


class IdRecorder:
    """Writes acknowledged event ids to the id table behind the requests, many per transaction
    (one SQLite/PostgreSQL round trip per request was ingest's largest cost). Ids waiting to be
    written still count as known. If the process dies before a flush, a resend of those few ids
    is published again and scoring's unique key stores it once."""

    def __init__(self, engine: Engine, flush_interval_s: float = 0.02) -> None:
        self._engine = engine
        self._flush_interval_s = flush_interval_s
        self._pending: dict[tuple[str, str], tuple[str, datetime]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        self._task = asyncio.create_task(self._run(), name="ingest:id-recorder")

    async def stop(self) -> None:
        self._running = False
        self._wakeup.set()
        if self._task is not None:
            await stop_gracefully(self._task, timeout_s=10)
        await self._flush()  # whatever arrived after the last round

    def add(self, tenant_id: str, events: Sequence[Any], received_at: datetime) -> None:
        for event in events:
            self._pending[(tenant_id, event.id)] = (event.type, received_at)
        self._wakeup.set()

    def pending(self, tenant_id: str, event_ids: Sequence[str]) -> set[str]:
        return {event_id for event_id in event_ids if (tenant_id, event_id) in self._pending}

    async def _run(self) -> None:
        while self._running:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(self._flush_interval_s)  # let a round fill up
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        by_tenant: dict[str, list[tuple[str, str, datetime]]] = {}
        for (tenant_id, event_id), (type_, received_at) in batch.items():
            by_tenant.setdefault(tenant_id, []).append((event_id, type_, received_at))

        def write() -> None:
            with session_scope(self._engine) as session:
                for tenant_id, rows in by_tenant.items():
                    repository.record_ids(session, tenant_id, rows)

        try:
            await asyncio.to_thread(write)
        except SQLAlchemyError as exc:  # the broker has them: they were rightly accepted
            metrics.DEDUP_UNAVAILABLE.inc()
            log.warning("could not record %d event ids (%s)", len(batch), type(exc).__name__)


class IngestService:
    def __init__(self, publisher: Publisher, clock: Clock, engine: Engine, recorder: IdRecorder) -> None:
        self._publisher = publisher
        self._clock = clock
        self._engine = engine
        self._recorder = recorder

    @property
    def clock(self) -> Clock:
        return self._clock

    async def publish(self, tenant_id: str, events: Sequence[Any]) -> PublishResult:
        """Publish the events this tenant has not sent before; returns only once the broker
        acknowledged every one of them (raises BrokerUnavailable otherwise).

        Ids are recorded only after the broker has the events, so a failed send is never
        mistaken for a duplicate on retry. If the id table is unreachable, everything is
        published: scoring's unique key still stores each event once."""
        result = PublishResult()
        first_seen: dict[str, Any] = {}
        for event in events:
            if event.id in first_seen:
                result.duplicates.append(event)
            else:
                first_seen[event.id] = event
        ids = list(first_seen)
        known = self._recorder.pending(tenant_id, ids) | await self._known(tenant_id, ids)
        for event_id, event in first_seen.items():
            (result.duplicates if event_id in known else result.accepted).append(event)

        received_at = self._clock.now()
        if result.accepted:
            # The events are validated already: build the records without validating them again.
            records = [EventRecord.model_construct(tenant_id=tenant_id, received_at=received_at, event=e)
                       for e in result.accepted]
            started = time.perf_counter()
            await self._publisher.publish_many(
                CUSTOMER_EVENTS, [(r.key, r.model_dump_json().encode()) for r in records]
            )
            metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
            self._recorder.add(tenant_id, result.accepted, received_at)
        for event in result.accepted:
            metrics.EVENTS_ACCEPTED.labels(event.type).inc()
        if result.duplicates:
            metrics.EVENTS_DUPLICATE.inc(len(result.duplicates))
        return result

    async def _known(self, tenant_id: str, event_ids: list[str]) -> set[str]:
        def lookup() -> set[str]:
            with session_scope(self._engine) as session:
                return repository.known_ids(session, tenant_id, event_ids)

        try:
            return await asyncio.to_thread(lookup)
        except SQLAlchemyError as exc:
            metrics.DEDUP_UNAVAILABLE.inc()
            log.warning("event id table unavailable (%s); publishing without the duplicate check", type(exc).__name__)
            return set()
