"""Ingest logic: validate against the shared contract, stamp tenant and arrival, publish."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from services.ingest import metrics
from services.ingest.ledger import EventIdLedger, LedgerUnavailable
from shared.clock import Clock
from shared.events import EVENT_TYPES, CustomerEvent, event_records_json, parse_event
from shared.kafka import Publisher
from shared.topics import CUSTOMER_EVENTS

log = logging.getLogger(__name__)
MAX_NESTING = 16
# Requests with at most this many new events publish together with concurrent ones
# (Publisher.publish_joined); larger batches are sent on their own.
JOIN_AT_MOST = 16


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
    """Strict JSON: UTF-8, no NaN/Infinity, no NUL characters, nesting at most MAX_NESTING.

    orjson parses (several times faster than the standard library); what it refuses is parsed
    again by the standard library, which explains where and why, or accepts the valid JSON
    orjson does not take (integers beyond 64 bits)."""
    if not body.strip():
        raise MalformedJson("request body is empty; expected a JSON object")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = _decode_standard(body)
    _check_structure(value, 1)
    return value


def _decode_standard(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:
        raise MalformedJson(f"JSON nested too deeply (at most {MAX_NESTING} levels)") from exc


def _check_structure(value: Any, depth: int) -> None:
    if depth > MAX_NESTING:
        raise MalformedJson(f"JSON nested too deeply (at most {MAX_NESTING} levels)")
    if isinstance(value, str):
        if "\x00" in value:
            raise MalformedJson("strings must not contain NUL (\\u0000) characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate escape such as \ud800
                raise MalformedJson("strings must be valid Unicode (unpaired surrogate escape)") from exc
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


class _Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[CustomerEvent]


_batch_adapter = TypeAdapter(_Batch)
# Bodies the fast parser would read more leniently than the strict slow path: NUL escapes
# (refused by the slow path) and NaN/Infinity tokens (pydantic's parser takes them, then a
# duplicate key can hide them). Their mere bytes send a body down the slow path.
_SLOW_PATH_MARKERS = (b"\\u0000", b"NaN", b"Infinity")


def _needs_slow_path(body: bytes) -> bool:
    return any(marker in body for marker in _SLOW_PATH_MARKERS)


def parse_all_or_nothing(body: bytes, now: datetime) -> list[Any] | None:
    """The fast path: a batch body (`{"events": [...]}`) in which every event is valid, parsed and
    validated by pydantic straight from the bytes -- about a quarter of the cost of decoding to
    Python objects first and validating each event. None when anything is off (bad JSON, an
    invalid event, extra keys, see _SLOW_PATH_MARKERS): the caller then takes the slow path, which decodes,
    checks and validates event by event, and alone decides what is rejected and why."""
    if _needs_slow_path(body):
        return None
    try:
        return _batch_adapter.validate_json(body, context={"now": now}).events
    except ValidationError:
        return None


def parse_one_or_nothing(body: bytes, now: datetime) -> BaseModel | None:
    """The same fast path for a single event."""
    if _needs_slow_path(body):
        return None
    try:
        return parse_event(body, now=now)
    except ValidationError:
        return None


@dataclass
class PublishResult:
    accepted: list[Any] = field(default_factory=list)
    duplicates: list[Any] = field(default_factory=list)
    suppressed: list[Any] = field(default_factory=list)  # events of erased customers, not published

    def counts(self) -> dict[str, int]:
        """The answer's counts; `suppressed` only when there were any (an additive field)."""
        body = {"accepted": len(self.accepted), "duplicates": len(self.duplicates)}
        if self.suppressed:
            body["suppressed"] = len(self.suppressed)
        return body

    def counts_each(self) -> dict[int, dict[str, int]]:
        """`counts()` of each event on its own, by the event object's identity (two events of
        one call may share an id, the second then being the duplicate)."""
        each: dict[int, dict[str, int]] = {}
        for event in self.accepted:
            each[id(event)] = {"accepted": 1, "duplicates": 0}
        for event in self.duplicates:
            each[id(event)] = {"accepted": 0, "duplicates": 1}
        for event in self.suppressed:
            each[id(event)] = {"accepted": 0, "duplicates": 0, "suppressed": 1}
        return each


class IngestService:
    def __init__(
        self, publisher: Publisher, clock: Clock, ledger: EventIdLedger, erased: Container[tuple[str, str]] = (),
    ) -> None:
        self._publisher = publisher
        self._clock = clock
        self._ledger = ledger
        self._erased = erased

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
        if self._erased:  # suppression: erased customers' events are answered, not published
            kept = [event for event in events if (tenant_id, event.customer_id) not in self._erased]
            if len(kept) < len(events):
                result.suppressed = [event for event in events if (tenant_id, event.customer_id) in self._erased]
                metrics.EVENTS_SUPPRESSED.inc(len(result.suppressed))
                events = kept
        first_seen: dict[str, Any] = {}
        for event in events:
            if event.id in first_seen:
                result.duplicates.append(event)
            else:
                first_seen[event.id] = event
        ids = list(first_seen)
        known = await self._known(tenant_id, ids)
        for event_id, event in first_seen.items():
            (result.duplicates if event_id in known else result.accepted).append(event)

        received_at = self._clock.now()
        if result.accepted:
            # The events are validated already: build the records without validating them again.
            records = event_records_json(tenant_id, received_at, result.accepted)
            started = time.perf_counter()
            if len(records) <= JOIN_AT_MOST:  # single events: concurrent requests share a send
                await self._publisher.publish_joined(CUSTOMER_EVENTS, records)
            else:
                await self._publisher.publish_many(CUSTOMER_EVENTS, records)
            metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
            self._ledger.add(tenant_id, result.accepted, received_at)
        for event_type, count in Counter(event.type for event in result.accepted).items():
            metrics.EVENTS_ACCEPTED.labels(event_type).inc(count)
        if result.duplicates:
            metrics.EVENTS_DUPLICATE.inc(len(result.duplicates))
        return result

    async def _known(self, tenant_id: str, event_ids: list[str]) -> set[str]:
        try:
            return await self._ledger.known(tenant_id, event_ids)
        except LedgerUnavailable as exc:
            metrics.DEDUP_UNAVAILABLE.inc()
            log.warning("event id table unavailable (%s); publishing without the duplicate check", exc)
            return set()
