"""HTTP API of the actions service (called by the gateway only): thin, transaction at the edge.
Webhook subscriptions and deliveries: webhook_routes.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import ValidationError

from services.actions import customers, policy_store, service, uplift
from services.actions.deps import ClockDep, EngineDep, RulesDep, SettingsDep
from services.actions.policies import Policy, PolicyDocument
from services.actions.schemas import (
    ContractOut,
    CustomerStateOut,
    DecisionOut,
    OfferOut,
    PoliciesOut,
    UpliftGroupOut,
    UpliftReportOut,
)
from shared.app import TenantId
from shared.db import session_scope

router = APIRouter(prefix="/v1")

CustomerId = Annotated[str, Path(min_length=1, max_length=128)]
Limit = Annotated[int, Query(ge=1, le=500)]
# Documented answers besides the success (the gateway's schemathesis run checks every status).
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such object for this tenant."}}
CONFLICT: dict[int | str, dict[str, Any]] = {409: {"description": "The object's state forbids this."}}


@router.get("/customers/{customer_id}/offers", response_model=list[OfferOut], tags=["customers"])
def customer_offers(
    customer_id: CustomerId, tenant: TenantId, engine: EngineDep, limit: Limit = 100
) -> list[OfferOut]:
    with session_scope(engine) as session:
        rows = service.list_offers(session, tenant, customer_id, limit)
    return [OfferOut.model_validate(r) for r in rows]


@router.get(
    "/customers/{customer_id}/decisions", response_model=list[DecisionOut], tags=["customers"]
)
def customer_decisions(
    customer_id: CustomerId, tenant: TenantId, engine: EngineDep, limit: Limit = 100
) -> list[DecisionOut]:
    """Every decision taken on this customer's scores, newest first, with outcome and reason."""
    with session_scope(engine) as session:
        rows = service.list_decisions(session, tenant, customer_id, limit)
    return [DecisionOut.model_validate(r) for r in rows]


# --- policies (the catalog lives inside the document) --------------------------------

PolicyName = Annotated[str, Path(min_length=1, max_length=64)]


def _invalid(exc: ValidationError, prefix: tuple[str, ...] = ("body",)) -> HTTPException:
    """A document that fails validation after a per-policy change: 422 naming the field."""
    return HTTPException(
        422,
        [
            {"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ],
    )


def _forget(rules: service.Rules, tenant: str) -> None:
    """After the commit: this instance's next decision reads the new document."""
    if rules.cache is not None:
        rules.cache.invalidate(tenant)


@router.get("/policies", response_model=PoliciesOut, tags=["policies"])
def get_policies(tenant: TenantId, engine: EngineDep, rules: RulesDep) -> PoliciesOut:
    """The policy document that decides for this tenant: its own, or the default file."""
    with session_scope(engine) as session:
        source, document = policy_store.effective(session, tenant, rules)
    return PoliciesOut(source=source, document=document)  # type: ignore[arg-type]


@router.put("/policies", response_model=PoliciesOut, tags=["policies"])
def put_policies(
    body: PolicyDocument, tenant: TenantId, engine: EngineDep, rules: RulesDep, clock: ClockDep
) -> PoliciesOut:
    """Replace the tenant's whole document (offer catalog and policies); from now on it, not the
    default file, decides for this tenant."""
    with session_scope(engine) as session:
        policy_store.replace(session, tenant, body, clock.now())
    _forget(rules, tenant)
    return PoliciesOut(source="tenant", document=body)


@router.delete("/policies", status_code=status.HTTP_204_NO_CONTENT, tags=["policies"],
               responses={404: {"description": "The tenant has no policy document of its own."}})
def reset_policies(tenant: TenantId, engine: EngineDep, rules: RulesDep) -> Response:
    """Drop the tenant's own document: the default file applies again."""
    with session_scope(engine) as session:
        if not policy_store.reset(session, tenant):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "this tenant has no policy document")
    _forget(rules, tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/policies/{name}", response_model=Policy, tags=["policies"], responses=NOT_FOUND)
def get_policy(name: PolicyName, tenant: TenantId, engine: EngineDep, rules: RulesDep) -> Policy:
    with session_scope(engine) as session:
        _, document = policy_store.effective(session, tenant, rules)
    policy = document.policy(name)
    if policy is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"policy {name} not found")
    return policy


@router.put("/policies/{name}", response_model=Policy, tags=["policies"])
def put_policy(
    name: PolicyName,
    body: Policy,
    tenant: TenantId,
    engine: EngineDep,
    rules: RulesDep,
    clock: ClockDep,
) -> Policy:
    """Add or replace one policy in the tenant's document (a copy of the default on first use)."""
    if body.name != name:
        raise HTTPException(
            422,
            [{"loc": ["body", "name"], "msg": f"must equal the path's policy name '{name}'",
              "type": "value_error"}],
        )
    try:
        with session_scope(engine) as session:
            policy_store.upsert_policy(session, tenant, body, rules, clock.now())
    except ValidationError as exc:
        raise _invalid(exc, ("document",)) from None
    _forget(rules, tenant)
    return body


@router.delete("/policies/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["policies"],
               responses=NOT_FOUND)
def delete_policy(
    name: PolicyName, tenant: TenantId, engine: EngineDep, rules: RulesDep, clock: ClockDep
) -> Response:
    try:
        with session_scope(engine) as session:
            policy_store.delete_policy(session, tenant, name, rules, clock.now())
    except service.NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    _forget(rules, tenant)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- customer state and the uplift report --------------------------------------------


@router.get("/customers/{customer_id}/state", response_model=CustomerStateOut, tags=["customers"])
def customer_state(
    customer_id: CustomerId, tenant: TenantId, engine: EngineDep
) -> CustomerStateOut:
    """What actions knows of this customer from their events (`known: false` when nothing)."""
    with session_scope(engine) as session:
        state, contracts = customers.profile(session, tenant, customer_id)
    if state is None:
        return CustomerStateOut(customer_id=customer_id, known=False)
    return CustomerStateOut(
        customer_id=customer_id,
        known=True,
        marketing_consent=state.marketing_consent,
        segment=state.segment,
        attributes=state.attributes or {},
        loyalty_tier=state.loyalty_tier,
        last_activity_at=state.last_activity_at,
        last_complaint_at=state.last_complaint_at,
        last_nps=state.last_nps,
        last_csat=state.last_csat,
        last_probability=state.last_probability,
        last_band=state.last_band,
        contracts=[ContractOut.model_validate(c) for c in contracts],
    )


@router.get("/reports/uplift", response_model=UpliftReportOut, tags=["reports"])
def uplift_report(
    tenant: TenantId,
    engine: EngineDep,
    clock: ClockDep,
    settings: SettingsDep,
    horizon_days: Annotated[int | None, Query(ge=1, le=3650)] = None,
) -> UpliftReportOut:
    """Per policy and risk band: treated vs control customers, churn rates over the horizon,
    uplift with a 95% interval, redemptions, offer cost, retained revenue, ROI."""
    horizon = horizon_days or settings.uplift_horizon_days
    now = clock.now()
    with session_scope(engine) as session:
        groups = uplift.uplift_report(session, tenant, now, timedelta(days=horizon))
    return UpliftReportOut(
        as_of=now,
        horizon_days=horizon,
        interval=uplift.INTERVAL,
        groups=[UpliftGroupOut.model_validate(g) for g in groups],
    )


# Not in the gateway's route table: the gateway's export route fans out to it (services/gateway/export.py).
internal_router = APIRouter(prefix="/internal/v1", include_in_schema=False)


@internal_router.get("/customers/{customer_id}/export")
def export_customer(customer_id: CustomerId, tenant: TenantId, engine: EngineDep) -> dict[str, Any]:
    """Everything actions holds about the customer (GDPR Art. 15/20)."""
    with session_scope(engine) as session:
        return customers.export(session, tenant, customer_id)
