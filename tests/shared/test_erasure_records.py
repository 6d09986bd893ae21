"""The erasure control record and the status record: round trips, and telling records apart."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from shared.events import (
    ErasureRecord,
    ErasureStatusRecord,
    EventRecord,
    decode_customer_record,
    event_json_schema,
    parse_event,
    partition_key,
)

AT = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)


def test_the_control_record_round_trips_on_the_customers_partition() -> None:
    record = ErasureRecord(erasure_id="er_1", tenant_id="t-1", customer_id="c-1", requested_at=AT)
    assert record.to_json().startswith(b'{"kind":"erasure",')
    assert record.key == partition_key("t-1", "c-1")
    assert decode_customer_record(record.to_json()) == record
    assert decode_customer_record(b"  " + record.to_json()) == record


def test_events_still_decode_as_events() -> None:
    event = parse_event({"id": "e-1", "type": "session.recorded", "customer_id": "c-1",
                         "occurred_at": AT.isoformat(), "data": {}}, now=AT)
    record = EventRecord(tenant_id="t-1", received_at=AT, event=event)
    assert decode_customer_record(record.model_dump_json().encode()) == record
    assert "kind" not in str(event_json_schema()["oneOf"][0])  # the public contract is unchanged


@pytest.mark.parametrize("raw, field", [
    (b'{"kind":"forget","erasure_id":"er_1","tenant_id":"t","customer_id":"c","requested_at":"2026-05-01T12:00:00Z"}',
     "kind"),
    (b'{"kind":"erasure","tenant_id":"t","customer_id":"c","requested_at":"2026-05-01T12:00:00Z"}', "erasure_id"),
    (b'{"kind":"erasure","erasure_id":"er_1","tenant_id":"t","customer_id":"","requested_at":"2026-05-01T12:00:00Z"}',
     "customer_id"),
    (b'{"kind":"erasure","erasure_id":"er_1","tenant_id":"t","customer_id":"c","requested_at":"2026-05-01T12:00:00"}',
     "requested_at"),
    (b'{"kind":"erasure","erasure_id":"er_1","tenant_id":"t","customer_id":"c","requested_at":"2026-05-01T12:00:00Z",'
     b'"extra":1}', "extra"),
])
def test_bad_control_records_are_refused_naming_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        decode_customer_record(raw)


def test_status_records_name_a_known_service() -> None:
    status = ErasureStatusRecord(erasure_id="er_1", tenant_id="t-1", service="scoring", done_at=AT)
    assert ErasureStatusRecord.model_validate_json(status.model_dump_json()) == status
    assert status.key == b"er_1"
    with pytest.raises(ValidationError, match="service"):
        ErasureStatusRecord(erasure_id="er_1", tenant_id="t-1", service="gateway", done_at=AT)  # type: ignore[arg-type]
