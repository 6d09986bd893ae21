"""HTTP API of upstream sources: one webhook endpoint per source, and the tenant's secret."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response

from services.ingest import metrics
from services.ingest.deps import IngestServiceDep, SettingsDep
from services.ingest.routes import ERROR_SCHEMA, _broker_down, _problem
from services.ingest.service import FieldError, MalformedJson, decode_json
from services.ingest.sources import SOURCES, Source, get_source, known_sources
from services.ingest.sources.service import (
    BadSignature,
    InvalidSecret,
    NoSecret,
    SourceService,
    SourcesUnavailable,
    Unmappable,
    check_secret,
)
from shared.app import BodyTooLarge, TenantId, read_body_limited
from shared.kafka import BrokerUnavailable

router = APIRouter(prefix="/v1/sources", tags=["sources"])

MAX_SECRET_BODY_BYTES = 4 * 1024
SECRET_BODY_SCHEMA = {
    "type": "object", "required": ["secret"], "additionalProperties": False,
    "properties": {"secret": {"type": "string", "minLength": 16, "maxLength": 512,
                              "description": "The shared secret the source signs its webhooks with."}},
}
WEBHOOK_RESULT_SCHEMA = {
    "type": "object",
    "properties": {
        "accepted": {"type": "integer", "description": "New events, now with the broker."},
        "duplicates": {"type": "integer", "description": "Events sent before (e.g. orders/paid after orders/create)."},
        "note": {"type": "string", "description": "Why nothing was published, when that is the right answer."},
    },
}


def _sources(request: Request) -> SourceService:
    return request.app.state.sources


SourcesDep = Annotated[SourceService, Depends(_sources)]
SourceName = Annotated[str, Path(
    description="The upstream source; an unknown one is a 404 naming the known ones.",
    json_schema_extra={"enum": list(known_sources())},
)]
SECRET_METHODS = ("PUT", "DELETE")


def _json(description: str, schema: dict[str, Any] = ERROR_SCHEMA) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _unknown(name: str) -> JSONResponse:
    return _problem(404, f"unknown source {name!r}; known sources: {', '.join(known_sources())}")


def _unavailable(retry_after_s: int) -> JSONResponse:
    return _problem(503, "cannot read the source settings right now; nothing was accepted, retry later",
                    headers={"Retry-After": str(retry_after_s)})


@router.put(
    "/{source}/secret",
    status_code=204,
    summary="Set or replace the shared secret of an upstream source",
    description="The secret the source signs its webhooks with (for Shopify: the webhook signing "
    "secret shown in the admin, or the app's client secret). It is never returned.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": SECRET_BODY_SCHEMA}}}},
    responses={
        204: {"description": "Stored; webhooks are verified with it from now on."},
        400: _json("Malformed JSON."),
        404: _json("Unknown source; the message names the known ones."),
        413: _json("Body over 4 KiB."),
        422: _json("No valid `secret`."),
        503: _json("Storage unavailable; retry."),
    },
)
async def put_secret(source: SourceName, request: Request, tenant_id: TenantId, sources: SourcesDep, settings: SettingsDep) -> Response:
    if get_source(source) is None:
        return _unknown(source)
    try:
        raw = decode_json(await read_body_limited(request, MAX_SECRET_BODY_BYTES))
    except BodyTooLarge as exc:
        return _problem(413, str(exc))
    except MalformedJson as exc:
        return _problem(400, str(exc))
    if not isinstance(raw, dict) or "secret" not in raw:
        return _problem(422, "expected a JSON object with a 'secret'", [FieldError("secret", "required field is missing")])
    if extra := sorted(set(raw) - {"secret"}):
        return _problem(422, f"unexpected field {extra[0]!r}", [FieldError(extra[0], "Extra inputs are not permitted")])
    try:
        secret = check_secret(raw["secret"])
    except InvalidSecret as exc:
        return _problem(422, f"secret: {exc}", [FieldError("secret", str(exc))])
    try:
        await sources.set_secret(tenant_id, source, secret)
    except SourcesUnavailable:
        return _unavailable(settings.retry_after_s)
    return Response(status_code=204)


@router.delete(
    "/{source}/secret",
    status_code=204,
    summary="Remove the shared secret of an upstream source",
    description="Webhooks of that source are refused (409) until a secret is set again.",
    responses={
        204: {"description": "Removed."},
        404: _json("Unknown source, or no secret configured."),
        503: _json("Storage unavailable; retry."),
    },
)
async def delete_secret(source: SourceName, tenant_id: TenantId, sources: SourcesDep, settings: SettingsDep) -> Response:
    if get_source(source) is None:
        return _unknown(source)
    try:
        removed = await sources.delete_secret(tenant_id, source)
    except SourcesUnavailable:
        return _unavailable(settings.retry_after_s)
    if not removed:
        return _problem(404, f"no {source} secret configured for this tenant")
    return Response(status_code=204)


async def _secret_methods_only(request: Request) -> Response:
    """PUT and DELETE are two routes; without this, a 405 would list only the first one's method."""
    return _problem(405, f"{request.method} is not allowed here; use {' or '.join(SECRET_METHODS)}",
                    headers={"Allow": ", ".join(SECRET_METHODS)})


router.add_api_route("/{source}/secret", _secret_methods_only, include_in_schema=False,
                     methods=["GET", "HEAD", "POST", "PATCH", "OPTIONS"])


def _webhook(source: Source) -> Callable[..., Awaitable[JSONResponse]]:
    def count(outcome: str) -> None:
        metrics.SOURCE_WEBHOOKS.labels(source.name, outcome).inc()

    async def receive(request: Request, tenant_id: TenantId, service: IngestServiceDep,
                      sources: SourcesDep, settings: SettingsDep) -> JSONResponse:
        try:
            body = await read_body_limited(request, settings.max_source_bytes)
        except BodyTooLarge as exc:
            count("too_large")
            return _problem(413, str(exc))
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            received = await sources.receive(tenant_id, source, body, headers)
        except NoSecret as exc:
            count("no_secret")
            return _problem(409, str(exc))
        except BadSignature as exc:
            count("bad_signature")
            # A challenge marks this 401 as the caller's (the gateway passes it on), not a
            # refusal of the gateway's internal token.
            challenge = f'HMAC-SHA256 realm="{source.name}", header="{source.signature_header}"'
            return _problem(401, str(exc), headers={"WWW-Authenticate": challenge})
        except MalformedJson as exc:
            count("malformed")
            return _problem(400, str(exc))
        except Unmappable as exc:
            count("unmappable")
            return _problem(422, f"{source.title} webhook not accepted: {exc}", exc.errors)
        except SourcesUnavailable:
            count("unavailable")
            return _unavailable(settings.retry_after_s)
        body_out: dict[str, Any] = {"accepted": 0, "duplicates": 0}
        if received.events:
            try:
                published = await service.publish(tenant_id, received.events)
            except BrokerUnavailable:
                count("broker_unavailable")
                return _broker_down(settings.retry_after_s)
            body_out = dict(published.counts())
        if received.note:
            body_out["note"] = received.note
        count("published" if received.events else "ignored")
        return JSONResponse(body_out, status_code=200)

    return receive


for _source in SOURCES.values():
    router.add_api_route(
        f"/{_source.name}/{_source.webhook}",
        _webhook(_source),
        methods=["POST"],
        name=f"{_source.name}_webhook",
        summary=f"Receive {_source.title} webhooks",
        description=f"Point the {_source.title} webhook at `https://<gateway>/v1/sources/{_source.name}/"
        f"{_source.webhook}?key=<api key>` ({_source.title} cannot send our Authorization header; the "
        f"`{_source.signature_header}` signature, made with the secret set by `PUT /v1/sources/"
        f"{_source.name}/secret`, proves the sender). The mapping to contract events is in "
        "docs/events.md. Answers 200 once the broker has the events, so the source stops retrying.",
        responses={
            200: _json("Published (or nothing to publish; see `note`).", WEBHOOK_RESULT_SCHEMA),
            400: _json("Malformed JSON."),
            401: _json("Missing or wrong signature; nothing was published."),
            409: _json("No secret configured for this source and tenant."),
            413: _json("Body over `max_source_bytes` (256 KiB)."),
            422: _json("Unsupported topic, or the payload does not make a valid event; errors name the source's field."),
            503: _json("Broker or storage unavailable; retry after the Retry-After header."),
        },
    )
