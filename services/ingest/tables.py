"""ingest's own table: which event ids each tenant has sent, to answer "duplicate" at the door.

The durable exactly-once guarantee lives where events are stored (scoring's unique key);
this table lets ingest skip re-publishing and tell the sender what was a duplicate.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime
from shared.secret_box import EncryptedSecret


class IngestEventId(SQLModel, table=True):
    __tablename__ = "ingest_event_ids"

    tenant_id: str = Field(primary_key=True, max_length=128)
    event_id: str = Field(primary_key=True, max_length=128)
    type: str = Field(max_length=64)
    received_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


class IngestSourceSecret(SQLModel, table=True):
    """A tenant's shared secret with an upstream source (verifies its webhook signatures).
    Encrypted at rest (shared.secret_box)."""

    __tablename__ = "ingest_source_secrets"

    tenant_id: str = Field(primary_key=True, max_length=128)
    source: str = Field(primary_key=True, max_length=32)
    secret: str = Field(sa_column=Column(EncryptedSecret, nullable=False))  # encrypted at rest
    created_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


class IngestSourceOrder(SQLModel, table=True):
    """Whose order it was, as the source names the order: refund webhooks name only the order."""

    __tablename__ = "ingest_source_orders"

    tenant_id: str = Field(primary_key=True, max_length=128)
    source: str = Field(primary_key=True, max_length=32)
    order_id: str = Field(primary_key=True, max_length=128)
    customer_id: str = Field(max_length=128)
    seen_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


class IngestErasure(SQLModel, table=True):
    """An erasure request (GDPR Art. 17) and its progress: who asked, when, and when each service
    finished. One per tenant and customer; it stays after completion as the record of the
    erasure and as ingest's tombstone (later events of the customer are suppressed)."""

    __tablename__ = "ingest_erasures"
    __table_args__ = (UniqueConstraint("tenant_id", "customer_id", name="uq_ingest_erasures_tenant_customer"),)

    erasure_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(max_length=128)
    customer_id: str = Field(max_length=128)
    requested_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))
    requested_by: str = Field(max_length=128, description="the caller's API key id, or 'api'")
    ingest_done_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    scoring_done_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    actions_done_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))
    completed_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime, nullable=True))


TABLES = [IngestEventId, IngestSourceSecret, IngestSourceOrder, IngestErasure]
