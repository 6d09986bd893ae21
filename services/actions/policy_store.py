"""Per-tenant policy documents (the CRUD API). A tenant without a document of its own uses the
default file; the first write stores a full document of the tenant's own, which from then on
replaces the default entirely (a per-policy PUT or DELETE starts from a copy of the default).
Every write validates the whole resulting document, so an offer reference, a duplicate name
or priority is refused with the path of the offending field."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session

from services.actions import repository
from services.actions.policies import Policy, PolicyDocument
from services.actions.service import NotFound, Rules
from services.actions.tables import ActionsPolicyDocument


def effective(session: Session, tenant_id: str, rules: Rules) -> tuple[str, PolicyDocument]:
    """("tenant" or "default", the document that decides for this tenant), read from the
    database (never from the decision cache: the API shows what is stored)."""
    row = repository.get_policy_document(session, tenant_id)
    if row is None:
        return "default", rules.default_document
    return "tenant", PolicyDocument.model_validate(row.document)


def replace(session: Session, tenant_id: str, document: PolicyDocument, now: datetime) -> None:
    row = repository.get_policy_document(session, tenant_id) or ActionsPolicyDocument(
        tenant_id=tenant_id, document={}, updated_at=now
    )
    row.document = document.model_dump(mode="json")
    row.updated_at = now
    session.add(row)
    session.flush()


def reset(session: Session, tenant_id: str) -> bool:
    """Drop the tenant's own document (back to the default file); False if it had none."""
    row = repository.get_policy_document(session, tenant_id)
    if row is None:
        return False
    session.delete(row)
    return True


def upsert_policy(
    session: Session, tenant_id: str, policy: Policy, rules: Rules, now: datetime
) -> PolicyDocument:
    """Add or replace one policy; raises pydantic.ValidationError if the document breaks."""
    _, document = effective(session, tenant_id, rules)
    raw: dict[str, Any] = document.model_dump(mode="json")
    raw["policies"] = [p for p in raw["policies"] if p["name"] != policy.name] + [
        policy.model_dump(mode="json")
    ]
    updated = PolicyDocument.model_validate(raw)
    replace(session, tenant_id, updated, now)
    return updated


def delete_policy(
    session: Session, tenant_id: str, name: str, rules: Rules, now: datetime
) -> None:
    _, document = effective(session, tenant_id, rules)
    if document.policy(name) is None:
        raise NotFound(f"policy {name} not found")
    raw = document.model_dump(mode="json")
    raw["policies"] = [p for p in raw["policies"] if p["name"] != name]
    replace(session, tenant_id, PolicyDocument.model_validate(raw), now)
