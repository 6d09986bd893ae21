"""Ingest HTTP API: one event or a batch, validated, acknowledged only after the broker has it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.ingest import metrics
from services.ingest.config import IngestSettings
from services.ingest.service import (
    FieldError,
    IngestService,
    MalformedJson,
    decode_json,
    parse_all_or_nothing,
    parse_one_or_nothing,
    validate,
)
from shared.app import BodyTooLarge, TenantId, hot_route, is_json_media_type, read_body_limited, trusted_tenant
from shared.joined import (
    ANSWERS_HEADER,
    JOINED_CONTENT_TYPE,
    JOINED_PATH,
    LENGTHS_HEADER,
    MAX_ITEM_BYTES,
    MAX_ITEMS,
    MalformedJoin,
    join_answers,
    split_bodies,
)
from shared.events import event_json_schema
from shared.kafka import BrokerUnavailable

router = APIRouter(prefix="/v1", tags=["events"])

EVENT_REF = {"$ref": "#/components/schemas/CustomerEvent"}
SUPPRESSED_DESCRIPTION = ("Valid events of erased customers: taken, never published (present only when "
                          "non-zero; DELETE /v1/customers/{customer_id}).")
ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer", "description": "Position in the batch."},
                    "field": {"type": "string", "examples": ["data.amount"]},
                    "message": {"type": "string"},
                },
            },
        },
    },
}
BATCH_RESULT_SCHEMA = {
    "type": "object",
    "properties": {
        "accepted": {"type": "integer", "description": "New events, now with the broker."},
        "duplicates": {"type": "integer", "description": "Ids this tenant had sent before; not published again."},
        "suppressed": {"type": "integer", "description": SUPPRESSED_DESCRIPTION},
        "rejected": {"type": "integer", "description": "Invalid events; see errors."},
        "errors": ERROR_SCHEMA["properties"]["errors"],
    },
}


def _problem(status: int, detail: str, errors: list[FieldError] = (), headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if errors:
        body["errors"] = [e.as_dict() for e in errors]
    return JSONResponse(body, status_code=status, headers=headers)


def _broker_down(retry_after_s: int) -> JSONResponse:
    metrics.BROKER_UNAVAILABLE.inc()
    return _problem(503, "the event broker did not acknowledge in time; nothing was accepted, retry later",
                    headers={"Retry-After": str(retry_after_s)})


async def _read_body(request: Request, limit: int) -> bytes:
    if not is_json_media_type(request.headers.get("content-type", "")):
        metrics.EVENTS_REJECTED.labels("content_type").inc()
        given = request.headers.get("content-type") or "none"
        raise _Reject(_problem(415, f"Content-Type must be application/json (got {given})"))
    try:
        return await read_body_limited(request, limit)
    except BodyTooLarge as exc:
        metrics.EVENTS_REJECTED.labels("too_large").inc()
        raise _Reject(_problem(413, str(exc))) from exc


def _decode(body: bytes) -> Any:
    try:
        return decode_json(body)
    except MalformedJson as exc:
        metrics.EVENTS_REJECTED.labels("malformed_json").inc()
        raise _Reject(_problem(400, str(exc))) from exc


def _hot_route_context(request: Request) -> tuple[str, IngestService, IngestSettings]:
    """What the dependencies TenantId, IngestServiceDep and SettingsDep give, without FastAPI's
    per-request dependency resolution (on these two routes it cost more than the checks)."""
    tenant_id = trusted_tenant(request)
    state = request.app.state
    return tenant_id, state.service, state.settings


class _Reject(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


@router.post(
    "/events",
    status_code=202,
    summary="Send one customer event",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": EVENT_REF}}}},
    responses={
        202: {"description": "The broker has the event.",
              "content": {"application/json": {"schema": {"type": "object", "properties": {
                  "accepted": {"type": "integer"}, "duplicates": {"type": "integer"},
                  "suppressed": {"type": "integer", "description": SUPPRESSED_DESCRIPTION}, "id": {"type": "string"}}}}}},
        400: {"description": "Malformed JSON.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        413: {"description": "Body over the per-event limit.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        415: {"description": "Not application/json.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        422: {"description": "Invalid event; each error names its field.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        503: {"description": "Broker unavailable; retry after the Retry-After header.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
    },
)
@hot_route
async def post_event(request: Request) -> JSONResponse:
    tenant_id, service, settings = _hot_route_context(request)
    now = service.clock.now()
    try:
        judged = _judge_event(await _read_body(request, settings.max_event_bytes), now)
    except _Reject as rejected:
        return rejected.response
    if isinstance(judged, JSONResponse):
        return judged
    try:
        published = await service.publish(tenant_id, [judged])
    except BrokerUnavailable:
        return _broker_down(settings.retry_after_s)
    return _accepted(published.counts(), judged)


def _judge_event(body: bytes, now: datetime) -> Any:
    """The event in a JSON body of at most the size limit, or the answer refusing it."""
    try:
        result = parse_one_or_nothing(body, now) or validate(_decode(body), now=now)
    except _Reject as rejected:
        return rejected.response
    if isinstance(result, list):
        metrics.EVENTS_REJECTED.labels("invalid").inc()
        return _problem(422, "event rejected: " + "; ".join(f"{e.field}: {e.message}" for e in result), result)
    return result


def _accepted(counts: dict[str, int], event: Any) -> JSONResponse:
    return JSONResponse({**counts, "id": event.id}, status_code=202)


@router.post(JOINED_PATH.removeprefix("/v1"), include_in_schema=False)
@hot_route
async def post_joined_events(request: Request) -> Response:
    """Single events of several of the gateway's callers in one request (shared/joined.py): each
    is judged and answered as POST /v1/events would, and the valid ones are published together."""
    tenant_id, service, settings = _hot_route_context(request)
    now = service.clock.now()
    if request.headers.get("content-type") != JOINED_CONTENT_TYPE:
        return _problem(415, f"Content-Type must be {JOINED_CONTENT_TYPE}")
    try:
        body = await read_body_limited(request, MAX_ITEMS * MAX_ITEM_BYTES)
        bodies = split_bodies(body, request.headers.get(LENGTHS_HEADER))
    except (BodyTooLarge, MalformedJoin) as exc:
        return _problem(400, f"joined events: {exc}")
    judged = [_judge_joined(item, now, settings.max_event_bytes) for item in bodies]
    events = [item for item in judged if not isinstance(item, JSONResponse)]
    headers: dict[str, str] = {}
    answers: dict[int, JSONResponse] = {}
    if events:
        try:
            counts = (await service.publish(tenant_id, events)).counts_each()
            answers = {id(event): _accepted(counts[id(event)], event) for event in events}
        except BrokerUnavailable:
            answers = {id(event): _broker_down(settings.retry_after_s) for event in events}
            headers["Retry-After"] = str(settings.retry_after_s)
    joined, answers_header = join_answers([
        (answer.status_code, bytes(answer.body)) for answer in
        (item if isinstance(item, JSONResponse) else answers[id(item)] for item in judged)
    ])
    headers[ANSWERS_HEADER] = answers_header
    return Response(joined, media_type=JOINED_CONTENT_TYPE, headers=headers)


def _judge_joined(body: bytes, now: datetime, limit: int) -> Any:
    if len(body) > limit:  # as _read_body would have refused it
        metrics.EVENTS_REJECTED.labels("too_large").inc()
        return _problem(413, str(BodyTooLarge(limit)))
    return _judge_event(body, now)


@router.post(
    "/events/batch",
    status_code=202,
    summary="Send up to 500 customer events",
    description="Good events are accepted even when others are rejected; each rejected one is "
    "reported by its index with the field and reason. Ids sent before are counted as duplicates and not published again. 422 when none was valid.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["events"],
        "properties": {"events": {"type": "array", "maxItems": 500, "items": EVENT_REF}}}}}}},
    responses={
        202: {"description": "Accepted events are with the broker.", "content": {"application/json": {"schema": BATCH_RESULT_SCHEMA}}},
        400: {"description": "Malformed JSON or no `events` array.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        413: {"description": "Over 500 events or over the batch byte limit.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        415: {"description": "Not application/json.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
        422: {"description": "No event in the batch was valid.", "content": {"application/json": {"schema": BATCH_RESULT_SCHEMA}}},
        503: {"description": "Broker unavailable; nothing was accepted.", "content": {"application/json": {"schema": ERROR_SCHEMA}}},
    },
)
@hot_route
async def post_batch(request: Request) -> JSONResponse:
    tenant_id, service, settings = _hot_route_context(request)
    now = service.clock.now()
    try:
        body = await _read_body(request, settings.max_batch_bytes)
        events = parse_all_or_nothing(body, now)
        if events is not None:
            _check_count(len(events), settings.max_batch_events)
            sent, good, errors = len(events), events, []
        else:
            items = _batch_items(_decode(body), settings.max_batch_events)
            sent, (good, errors) = len(items), _validate_each(items, now)
    except _Reject as rejected:
        return rejected.response
    accepted = duplicates = suppressed = 0
    if good:
        try:
            published = await service.publish(tenant_id, good)
        except BrokerUnavailable:
            return _broker_down(settings.retry_after_s)
        accepted, duplicates = len(published.accepted), len(published.duplicates)
        suppressed = len(published.suppressed)
    rejected = len({e.index for e in errors})
    response: dict[str, Any] = {"accepted": accepted, "duplicates": duplicates, "rejected": rejected,
                                "errors": [e.as_dict() for e in errors]}
    if suppressed:
        response["suppressed"] = suppressed
    return JSONResponse(response, status_code=202 if good or not sent else 422)


def _batch_items(raw: Any, limit: int) -> list[Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        metrics.EVENTS_REJECTED.labels("malformed_batch").inc()
        raise _Reject(_problem(400, "expected a JSON object with an 'events' array",
                               [FieldError("events", "must be an array of events")]))
    _check_count(len(raw["events"]), limit)
    return raw["events"]


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        metrics.EVENTS_REJECTED.labels("too_large").inc()
        raise _Reject(_problem(413, f"batch holds {count} events; the limit is {limit} per batch"))


def _validate_each(items: list[Any], now: datetime) -> tuple[list[Any], list[FieldError]]:
    good: list[Any] = []
    errors: list[FieldError] = []
    for index, item in enumerate(items):
        result = validate(item, index, now)
        if isinstance(result, list):
            errors.extend(result)
            metrics.EVENTS_REJECTED.labels("invalid").inc()
        else:
            good.append(result)
    return good, errors


@router.get("/schema", summary="The event contract as JSON Schema")
def get_schema(_tenant: TenantId) -> dict[str, Any]:
    # Not secret, but like every route here only the gateway may call it (issue #6, point 3).
    return event_json_schema()
