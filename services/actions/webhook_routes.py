"""HTTP API of webhook subscriptions and deliveries (called by the gateway only): thin,
transaction at the edge."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response, status

from services.actions import webhooks
from services.actions.config import ActionsSettings
from services.actions.deps import ClockDep, EngineDep, WorkerDep
from services.actions.errors import Conflict, NotFound
from services.actions.url_guard import UnsafeUrl, UrlPolicy
from services.actions.webhook_schemas import (
    DeliveryOut,
    DeliveryStatus,
    RangeReplayed,
    ReplayRange,
    RotateSecret,
    SecretRotated,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
)
from shared.app import TenantId
from shared.events import RFC3339DateTime

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such object for this tenant."}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": "The object's state forbids this."}}
from shared.db import session_scope

router = APIRouter(prefix="/v1")

ObjectId = Annotated[str, Path(min_length=1, max_length=64)]
Limit = Annotated[int, Query(ge=1, le=500)]


def get_settings(request: Request) -> ActionsSettings:
    return request.state.settings


SettingsDep = Annotated[ActionsSettings, Depends(get_settings)]


def _unprocessable(field: str, message: str, kind: str) -> HTTPException:
    return HTTPException(
        422,
        [{"loc": ["body", field], "msg": message, "type": kind}],
    )


# --- subscriptions ----------------------------------------------------------------------


@router.post(
    "/webhooks",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookCreated,
    tags=["webhooks"],
)
def create_webhook(
    body: WebhookCreate,
    tenant: TenantId,
    engine: EngineDep,
    clock: ClockDep,
    settings: SettingsDep,
) -> WebhookCreated:
    """Subscribe a URL to signed webhooks. The secret is returned only here. The URL must be
    https and resolve to public addresses only (SSRF guard)."""
    try:
        with session_scope(engine) as session:
            subscription = webhooks.create_subscription(
                session,
                tenant,
                str(body.url),
                clock.now(),
                UrlPolicy(allow_local=settings.webhook_allow_local_urls),
                secret=body.secret,
                event_types=body.event_types,
            )
            return WebhookCreated.model_validate(subscription)
    except UnsafeUrl as exc:
        raise _unprocessable("url", f"webhook URL {exc}", "unsafe_url") from None
    except ValueError as exc:
        raise _unprocessable("event_types", str(exc), "value_error") from None


@router.get("/webhooks", response_model=list[WebhookOut], tags=["webhooks"])
def list_webhooks(tenant: TenantId, engine: EngineDep) -> list[WebhookOut]:
    """Active subscriptions (a disabled one is still visible by its id)."""
    with session_scope(engine) as session:
        rows = webhooks.list_subscriptions(session, tenant)
        return [WebhookOut.model_validate(r) for r in rows]


@router.get("/webhooks/{subscription_id}", response_model=WebhookOut, tags=["webhooks"], responses=NOT_FOUND)
def get_webhook(subscription_id: ObjectId, tenant: TenantId, engine: EngineDep) -> WebhookOut:
    """One subscription; `disabled_reason` says why a disabled one stopped (e.g. 410 Gone)."""
    try:
        with session_scope(engine) as session:
            return WebhookOut.model_validate(
                webhooks.get_subscription(session, tenant, subscription_id)
            )
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.delete(
    "/webhooks/{subscription_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["webhooks"],
    responses=NOT_FOUND,
)
def delete_webhook(
    subscription_id: ObjectId, tenant: TenantId, engine: EngineDep, clock: ClockDep
) -> Response:
    """Stop sending to this URL; its pending deliveries are parked."""
    try:
        with session_scope(engine) as session:
            webhooks.delete_subscription(session, tenant, subscription_id, clock.now())
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/webhooks/{subscription_id}/rotate-secret",
    response_model=SecretRotated,
    tags=["webhooks"],
    responses={**NOT_FOUND, **CONFLICT},
)
def rotate_webhook_secret(
    subscription_id: ObjectId,
    tenant: TenantId,
    engine: EngineDep,
    clock: ClockDep,
    settings: SettingsDep,
    body: Annotated[RotateSecret | None, Body()] = None,
) -> SecretRotated:
    """Make a new signing secret current and return it (only here). During the overlap
    (CHURNGUARD_ACTIONS_SECRET_ROTATION_OVERLAP_S, default 24 h) every request carries a
    signature with the previous secret as well, so receivers can switch at their pace."""
    try:
        with session_scope(engine) as session:
            rotation = webhooks.rotate_secret(
                session,
                tenant,
                subscription_id,
                clock.now(),
                timedelta(seconds=settings.secret_rotation_overlap_s),
                secret=body.secret if body else None,
            )
            return SecretRotated(
                id=rotation.subscription.id,
                secret=rotation.secret,
                previous_secret_expires_at=rotation.previous_secret_expires_at,
            )
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except ValueError as exc:
        raise _unprocessable("secret", str(exc), "value_error") from None


# --- deliveries -------------------------------------------------------------------------


@router.get("/deliveries", response_model=list[DeliveryOut], tags=["deliveries"])
def list_deliveries(
    tenant: TenantId,
    engine: EngineDep,
    status_filter: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    subscription_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    created_from: Annotated[
        RFC3339DateTime | None, Query(description="Created at or after (RFC 3339 with offset).")
    ] = None,
    created_to: Annotated[RFC3339DateTime | None, Query(description="Created before.")] = None,
    limit: Limit = 100,
) -> list[DeliveryOut]:
    """Deliveries, newest first, each with its attempt log (status code, error, latency)."""
    if created_from is not None and created_to is not None and created_to <= created_from:
        raise HTTPException(
            422,
            [
                {
                    "loc": ["query", "created_to"],
                    "msg": "created_to must be after created_from",
                    "type": "value_error",
                }
            ],
        )
    with session_scope(engine) as session:
        items = webhooks.list_deliveries(
            session,
            tenant,
            status_filter,
            limit,
            subscription_id=subscription_id,
            created_from=created_from,
            created_to=created_to,
        )
        return [DeliveryOut.of(item) for item in items]


@router.get("/deliveries/{delivery_id}", response_model=DeliveryOut, tags=["deliveries"], responses=NOT_FOUND)
def get_delivery(delivery_id: ObjectId, tenant: TenantId, engine: EngineDep) -> DeliveryOut:
    try:
        with session_scope(engine) as session:
            return DeliveryOut.of(webhooks.get_delivery(session, tenant, delivery_id))
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.post("/deliveries/replay", response_model=RangeReplayed, tags=["deliveries"])
def replay_deliveries(
    body: ReplayRange, tenant: TenantId, engine: EngineDep, clock: ClockDep, worker: WorkerDep
) -> RangeReplayed:
    """Replay every parked delivery created in [created_from, created_to) (at most 1000 per
    call), optionally of one subscription; each keeps its webhook-id."""
    with session_scope(engine) as session:
        result = webhooks.replay_range(
            session,
            tenant,
            body.created_from,
            body.created_to,
            clock.now(),
            subscription_id=body.subscription_id,
        )
    worker.wake()
    return RangeReplayed(
        replayed=result.replayed, skipped_inactive_subscription=result.skipped_inactive_subscription
    )


@router.post("/deliveries/{delivery_id}/replay", response_model=DeliveryOut, tags=["deliveries"],
             responses={**NOT_FOUND, **CONFLICT})
def replay_delivery(
    delivery_id: ObjectId, tenant: TenantId, engine: EngineDep, clock: ClockDep, worker: WorkerDep
) -> DeliveryOut:
    """Send a parked or failing delivery again now, with a fresh retry schedule and the same
    webhook-id."""
    try:
        with session_scope(engine) as session:
            delivery = webhooks.replay_delivery(session, tenant, delivery_id, clock.now())
            out = DeliveryOut.model_validate(delivery)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    worker.wake()
    return out
