"""The contract: every type documented with a valid example, round-trips, and bad input is refused."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.events import (
    EVENT_TYPES,
    ActionRecord,
    ErasureRecord,
    EventRecord,
    ScoreRecord,
    broken_invariant,
    event_json_schema,
    erasures_done,
    event_records_json,
    keyed_json,
    parse_event,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def documented_examples() -> list[dict]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", DOC.read_text(), re.S)]


def test_every_type_has_one_valid_example_in_the_docs() -> None:
    examples = documented_examples()
    assert sorted(e["type"] for e in examples) == sorted(EVENT_TYPES)
    for example in examples:
        parse_event(example)


@pytest.mark.parametrize("example", documented_examples(), ids=lambda e: e["type"])
def test_every_type_round_trips_through_the_topic_record(example: dict) -> None:
    event = parse_event(example)
    record = EventRecord(tenant_id="t1", received_at=datetime.now(timezone.utc), event=event)
    again = EventRecord.model_validate_json(record.model_dump_json())
    assert again == record
    assert type(again.event) is type(event)
    assert again.key == b"t1/c-1042"


def test_fast_record_serialization_is_byte_for_byte_the_models() -> None:
    received_at = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
    events = [parse_event(example) for example in documented_examples()]
    tenant = "tenant-\u00e9\"quoted\""
    fast = event_records_json(tenant, received_at, events)
    for (key, value), event in zip(fast, events, strict=True):
        record = EventRecord(tenant_id=tenant, received_at=received_at, event=event)
        assert key == record.key
        assert value == record.model_dump_json().encode()
        assert EventRecord.model_validate_json(value) == record


def test_published_records_are_byte_for_byte_the_models_json_under_their_partition_key() -> None:
    at = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
    score = ScoreRecord(score_id="s1", tenant_id="t1", customer_id="c-\u00e9", probability=0.1 + 0.2,
                        band="low", model_version="m1", scored_at=at, event_id="e1",
                        features={"orders_90d": 3.0, "spend_90d": 1e-7}, reasons=["No order for \"45\" days"])
    action = ActionRecord(decision_id="d1", tenant_id="t1", customer_id="c-2", score_id="s1", outcome="suppressed",
                          reason="cooldown", decided_at=at)
    for record, (key, value) in zip([score, action], keyed_json([score, action]), strict=True):
        assert key == record.key
        assert value == record.model_dump_json().encode()
        assert type(record).model_validate_json(value) == record
    erased = ErasureRecord(erasure_id="x1", tenant_id="t1", customer_id="c-3", requested_at=at)
    [(key, value)] = erasures_done([erased], "scoring", at)
    assert key == b"x1"
    assert json.loads(value) == {"erasure_id": "x1", "tenant_id": "t1", "service": "scoring",
                                 "done_at": "2026-03-01T12:30:15.123456Z"}


def test_json_schema_names_every_type() -> None:
    mapping = event_json_schema()["discriminator"]["mapping"]
    assert sorted(mapping) == sorted(EVENT_TYPES)


BASE = documented_examples()[2]  # order.completed


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"type": "order.teleported"}, ()),
        ({"occurred_at": "2026-11-20T10:00:00"}, ("occurred_at",)),
        ({"occurred_at": (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()}, ("occurred_at",)),
        ({"data": {**BASE["data"], "amount": 59.9}}, ("data", "amount")),
        ({"data": {**BASE["data"], "amount": "59,90"}}, ("data", "amount")),
        ({"data": {**BASE["data"], "currency": "euro"}}, ("data", "currency")),
        ({"data": {**BASE["data"], "coupon": "X"}}, ("data", "coupon")),
        ({"customer_id": ""}, ("customer_id",)),
        ({"tenant_id": "someone-else"}, ("tenant_id",)),
    ],
)
def test_bad_payloads_are_rejected_at_the_field(change: dict, where: tuple) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_event({**BASE, **change})
    locations = [tuple(e["loc"][1:]) if e["loc"] else () for e in caught.value.errors()]
    assert where in locations


def test_old_events_are_welcome() -> None:
    assert parse_event({**BASE, "occurred_at": "2015-01-01T00:00:00+01:00"}).occurred_at.year == 2015


def test_a_record_whose_event_occurred_more_than_24_hours_after_it_was_received_breaks_the_invariant() -> None:
    """Ingest refuses occurred_at more than 24 h ahead of its clock and stamps received_at from
    it: a record further ahead was not published by ingest (consumers dead-letter it)."""
    received_at = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)

    def record(ahead: timedelta) -> EventRecord:
        event = parse_event({"id": "e-1", "type": "session.recorded", "customer_id": "c-1",
                             "occurred_at": (received_at + ahead).isoformat(), "data": {}}, now=received_at + ahead)
        return EventRecord(tenant_id="t1", received_at=received_at, event=event)

    assert broken_invariant(record(timedelta(hours=24))) is None
    assert broken_invariant(record(-timedelta(days=400))) is None  # old events are welcome
    assert broken_invariant(record(timedelta(hours=30))) == (
        "occurred_at 2026-03-02T18:00:00+00:00 is 30.0 h after received_at 2026-03-01T12:00:00+00:00 "
        "(ingest accepts at most 24 h): the event did not come through the API")
