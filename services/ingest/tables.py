"""ingest's own table: which event ids each tenant has sent, to answer "duplicate" at the door.

The durable exactly-once guarantee lives where events are stored (scoring's unique key);
this table lets ingest skip re-publishing and tell the sender what was a duplicate.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from shared.db import UtcDateTime


class IngestEventId(SQLModel, table=True):
    __tablename__ = "ingest_event_ids"

    tenant_id: str = Field(primary_key=True, max_length=128)
    event_id: str = Field(primary_key=True, max_length=128)
    type: str = Field(max_length=64)
    received_at: datetime = Field(sa_column=Column(UtcDateTime, nullable=False))


TABLES = [IngestEventId]
