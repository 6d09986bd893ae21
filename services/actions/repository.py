"""All SQL of the actions service's decisions and offers (webhook SQL: webhook_repository.py).

Tenant-facing queries always filter by tenant_id.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timezone

from sqlalchemy import case, delete, func, tuple_
from sqlmodel import Session, col, select

from services.actions.tables import (
    ActionsActivityDay,
    ActionsContract,
    ActionsCustomer,
    ActionsDecision,
    ActionsOffer,
    ActionsOfferResponse,
    ActionsPolicyDocument,
)
from shared.db import dialect_insert

# --- decisions and offers -----------------------------------------------------------


def get_decision(session: Session, tenant_id: str, score_id: str) -> ActionsDecision | None:
    return session.exec(
        select(ActionsDecision).where(
            ActionsDecision.tenant_id == tenant_id, ActionsDecision.score_id == score_id
        )
    ).first()


def last_offer_at(session: Session, tenant_id: str, customer_id: str) -> datetime | None:
    return session.exec(
        select(func.max(ActionsOffer.created_at)).where(
            ActionsOffer.tenant_id == tenant_id, ActionsOffer.customer_id == customer_id
        )
    ).first()


def list_offers(
    session: Session, tenant_id: str, customer_id: str, limit: int
) -> Sequence[ActionsOffer]:
    return session.exec(
        select(ActionsOffer)
        .where(ActionsOffer.tenant_id == tenant_id, ActionsOffer.customer_id == customer_id)
        .order_by(col(ActionsOffer.created_at).desc(), col(ActionsOffer.offer_id))
        .limit(limit)
    ).all()


def list_decisions(
    session: Session, tenant_id: str, customer_id: str, limit: int
) -> Sequence[ActionsDecision]:
    return session.exec(
        select(ActionsDecision)
        .where(ActionsDecision.tenant_id == tenant_id, ActionsDecision.customer_id == customer_id)
        .order_by(col(ActionsDecision.decided_at).desc(), col(ActionsDecision.decision_id))
        .limit(limit)
    ).all()


# --- policies, guardrails ----------------------------------------------------------


def get_policy_document(session: Session, tenant_id: str) -> ActionsPolicyDocument | None:
    return session.get(ActionsPolicyDocument, tenant_id)


def last_offers(
    session: Session, tenant_id: str, customer_id: str, policy: str
) -> tuple[datetime | None, datetime | None]:
    """When this customer last got an offer of `policy`, and any marketing offer (one query)."""
    of_policy, marketing = session.execute(
        select(
            func.max(case((ActionsOffer.policy == policy, ActionsOffer.created_at))),
            func.max(case((col(ActionsOffer.service).is_(False), ActionsOffer.created_at))),
        ).where(ActionsOffer.tenant_id == tenant_id, ActionsOffer.customer_id == customer_id)
    ).one()
    return _aware(of_policy), _aware(marketing)


def _aware(value: datetime | None) -> datetime | None:
    """Aggregates bypass the UtcDateTime column type: SQLite hands back naive UTC."""
    if value is None:
        return None
    if isinstance(value, str):  # SQLite returns text for an aggregate over a CASE
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def budget_used(
    session: Session, tenant_id: str, policy: str, since: datetime
) -> tuple[int, float]:
    """Offers of `policy` created since `since` (the period start): count and summed cost."""
    count, cost = session.exec(
        select(func.count(), func.coalesce(func.sum(ActionsOffer.cost), 0.0)).where(
            ActionsOffer.tenant_id == tenant_id,
            ActionsOffer.policy == policy,
            col(ActionsOffer.created_at) >= since,
        )
    ).one()
    return int(count), float(cost)


# --- customer state ----------------------------------------------------------------


def lock_customer(session: Session, tenant_id: str, customer_id: str) -> ActionsCustomer:
    """The customer's state row, created empty if new, locked for this transaction (the score
    consumer and the event consumer may both write it). One query for a known customer."""
    query = (
        select(ActionsCustomer)
        .where(ActionsCustomer.tenant_id == tenant_id, ActionsCustomer.customer_id == customer_id)
        .with_for_update()
    )
    existing = session.exec(query).first()
    if existing is not None:
        return existing
    session.execute(
        dialect_insert(session, ActionsCustomer.__table__)  # type: ignore[attr-defined]
        .on_conflict_do_nothing(index_elements=["tenant_id", "customer_id"]),
        [{"tenant_id": tenant_id, "customer_id": customer_id, "attributes": {}}],
    )
    return session.exec(query).one()


def get_customer(session: Session, tenant_id: str, customer_id: str) -> ActionsCustomer | None:
    return session.get(ActionsCustomer, (tenant_id, customer_id))


def customer_contracts(
    session: Session, tenant_id: str, customer_id: str
) -> Sequence[ActionsContract]:
    return session.exec(
        select(ActionsContract)
        .where(ActionsContract.tenant_id == tenant_id, ActionsContract.customer_id == customer_id)
        .order_by(col(ActionsContract.contract_id))
    ).all()


def get_contract(session: Session, tenant_id: str, contract_id: str) -> ActionsContract | None:
    return session.get(ActionsContract, (tenant_id, contract_id))


def add_activity_day(session: Session, tenant_id: str, customer_id: str, day: date) -> None:
    session.execute(
        dialect_insert(session, ActionsActivityDay.__table__)  # type: ignore[attr-defined]
        .on_conflict_do_nothing(),
        [{"tenant_id": tenant_id, "customer_id": customer_id, "day": day}],
    )


def add_offer_response(session: Session, row: dict[str, object]) -> None:
    session.execute(
        dialect_insert(session, ActionsOfferResponse.__table__)  # type: ignore[attr-defined]
        .on_conflict_do_nothing(),
        [row],
    )


def mark_erased(session: Session, tenant_id: str, customer_id: str, now: datetime) -> None:
    state = lock_customer(session, tenant_id, customer_id)
    blank = ActionsCustomer(tenant_id=tenant_id, customer_id=customer_id, attributes={})
    for name in ActionsCustomer.model_fields:
        setattr(state, name, getattr(blank, name))
    state.erased_at = now
    session.add(state)
    for table in (ActionsContract, ActionsActivityDay, ActionsOfferResponse):
        session.execute(
            delete(table).where(
                table.tenant_id == tenant_id,  # type: ignore[attr-defined]
                table.customer_id == customer_id,  # type: ignore[attr-defined]
            )
        )


# --- the contract-end sweep (system-wide) ------------------------------------------


def contracts_ending_between(
    session: Session, first: date, last: date, after: tuple[str, str] | None, limit: int
) -> Sequence[ActionsContract]:
    """Active contracts (no cancellation notice, not ended) ending within [first, last], in
    (tenant, contract) order after `after`: pages of the sweep."""
    query = select(ActionsContract).where(
        ActionsContract.status == "active",
        col(ActionsContract.end_date) >= first,
        col(ActionsContract.end_date) <= last,
    )
    if after is not None:
        query = query.where(
            tuple_(col(ActionsContract.tenant_id), col(ActionsContract.contract_id)) > after
        )
    return session.exec(
        query.order_by(col(ActionsContract.tenant_id), col(ActionsContract.contract_id)).limit(
            limit
        )
    ).all()


# --- the uplift report ----------------------------------------------------------------


def tenants_with_decisions(session: Session) -> list[str]:
    return list(session.exec(select(ActionsDecision.tenant_id).distinct()).all())


def report_decisions(
    session: Session, tenant_id: str, matured_before: datetime
) -> Sequence[ActionsDecision]:
    """Sent and held-out decisions old enough for their horizon to be over, oldest first."""
    return session.exec(
        select(ActionsDecision)
        .where(
            ActionsDecision.tenant_id == tenant_id,
            col(ActionsDecision.policy).is_not(None),
            (ActionsDecision.outcome == "offer_created") | (ActionsDecision.reason == "holdout"),
            col(ActionsDecision.decided_at) <= matured_before,
        )
        .order_by(col(ActionsDecision.decided_at), col(ActionsDecision.decision_id))
    ).all()


def activity_days(
    session: Session, tenant_id: str, customers: Sequence[str]
) -> dict[str, list[date]]:
    result: dict[str, list[date]] = {}
    for start in range(0, len(customers), 500):
        chunk = list(customers[start : start + 500])
        for customer, day in session.exec(
            select(ActionsActivityDay.customer_id, ActionsActivityDay.day).where(
                ActionsActivityDay.tenant_id == tenant_id,
                col(ActionsActivityDay.customer_id).in_(chunk),
            )
        ).all():
            result.setdefault(customer, []).append(day)
    return result


def contract_ends(
    session: Session, tenant_id: str, customers: Sequence[str]
) -> dict[str, list[datetime]]:
    result: dict[str, list[datetime]] = {}
    for start in range(0, len(customers), 500):
        chunk = list(customers[start : start + 500])
        for customer, ended_at in session.exec(
            select(ActionsContract.customer_id, ActionsContract.ended_at).where(
                ActionsContract.tenant_id == tenant_id,
                col(ActionsContract.customer_id).in_(chunk),
                col(ActionsContract.ended_at).is_not(None),
            )
        ).all():
            result.setdefault(customer, []).append(ended_at)
    return result


def redeemed_offers(session: Session, tenant_id: str, offer_ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(offer_ids), 500):
        chunk = list(offer_ids[start : start + 500])
        found.update(
            session.exec(
                select(ActionsOfferResponse.offer_id).where(
                    ActionsOfferResponse.tenant_id == tenant_id,
                    ActionsOfferResponse.response == "redeemed",
                    col(ActionsOfferResponse.offer_id).in_(chunk),
                )
            ).all()
        )
    return found
