"""Ingest logic: validate against the shared contract, stamp tenant and arrival, publish."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from services.ingest import metrics
from shared.clock import Clock
from shared.events import EVENT_TYPES, EventRecord, parse_event
from shared.kafka import Publisher
from shared.topics import CUSTOMER_EVENTS


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    index: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class MalformedJson(ValueError):
    pass


def decode_json(body: bytes) -> Any:
    if not body.strip():
        raise MalformedJson("request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"request body is not UTF-8: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


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


def validate(raw: Any, index: int | None = None) -> BaseModel | list[FieldError]:
    if not isinstance(raw, dict):
        return [FieldError("(event)", "must be a JSON object", index)]
    try:
        return parse_event(raw)
    except ValidationError as exc:
        return describe(exc, raw, index)


class IngestService:
    def __init__(self, publisher: Publisher, clock: Clock) -> None:
        self._publisher = publisher
        self._clock = clock

    async def publish(self, tenant_id: str, events: Sequence[BaseModel]) -> None:
        """Returns only once the broker acknowledged every event (raises BrokerUnavailable)."""
        received_at = self._clock.now()
        records = [EventRecord(tenant_id=tenant_id, received_at=received_at, event=e) for e in events]
        started = time.perf_counter()
        await self._publisher.publish_many(
            CUSTOMER_EVENTS, [(r.key, r.model_dump_json().encode()) for r in records]
        )
        metrics.PUBLISH_DURATION.observe(time.perf_counter() - started)
        for event in events:
            metrics.EVENTS_ACCEPTED.labels(event.type).inc()  # type: ignore[attr-defined]
