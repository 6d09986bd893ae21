"""All SQL of the actions service's decisions and offers (webhook SQL: webhook_repository.py).

Tenant-facing queries always filter by tenant_id.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from services.actions.tables import ActionsDecision, ActionsOffer

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
