"""Property-based tests over the contract (hypothesis): whatever arrives, validation either
yields an event that survives the trip through Kafka unchanged, or names what is wrong."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.service import FieldError, validate
from shared.events import EVENT_TYPES, EventRecord, parse_event
from tests.shared.test_events import documented_examples

EXAMPLES = {e["type"]: e for e in documented_examples()}
NOW = datetime(2026, 11, 23, tzinfo=timezone.utc)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
identifiers = st.text(min_size=1, max_size=128).filter(lambda s: "\x00" not in s)
amounts = st.decimals(min_value=0, max_value=Decimal("999999999999"), places=2).map(str)
moments = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2026, 11, 22),
                       timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]))


@settings(max_examples=300, deadline=None)
@given(raw=json_values)
def test_any_json_is_either_an_event_or_named_errors(raw: object) -> None:
    result = validate(raw, now=NOW)
    if isinstance(result, list):
        assert result and all(isinstance(e, FieldError) and e.field and e.message for e in result)


@settings(max_examples=300, deadline=None)
@given(event_type=st.sampled_from(EVENT_TYPES), event_id=identifiers, customer=identifiers, at=moments,
       source=st.text(max_size=200))
def test_valid_envelopes_survive_the_topic_unchanged(event_type: str, event_id: str, customer: str,
                                                     at: datetime, source: str) -> None:
    raw = {**EXAMPLES[event_type], "id": event_id, "customer_id": customer, "occurred_at": at.isoformat(), "source": source}
    event = parse_event(raw, now=NOW)
    record = EventRecord(tenant_id="t", received_at=NOW, event=event)
    again = EventRecord.model_validate_json(record.model_dump_json())
    assert again == record
    assert again.event.occurred_at == at


@settings(max_examples=200, deadline=None)
@given(amount=amounts)
def test_decimal_money_is_kept_exactly(amount: str) -> None:
    raw = {**EXAMPLES["order.completed"], "data": {**EXAMPLES["order.completed"]["data"], "amount": amount}}
    assert parse_event(raw, now=NOW).data.amount == amount


@settings(max_examples=200, deadline=None)
@given(score=st.integers().filter(lambda n: not 0 <= n <= 10) | st.floats() | st.booleans() | st.text())
def test_nps_outside_0_to_10_or_not_an_integer_is_refused_at_data_score(score: object) -> None:
    raw = {**EXAMPLES["feedback.nps"], "data": {"score": score}}
    result = validate(raw, now=NOW)
    assert isinstance(result, list)
    assert "data.score" in [e.field for e in result]


@settings(max_examples=200, deadline=None)
@given(amount=st.floats(allow_nan=False) | st.integers() | st.decimals(max_value=Decimal("-0.01"), places=2).map(str))
def test_money_as_a_number_or_negative_is_refused_at_data_amount(amount: object) -> None:
    raw = {**EXAMPLES["order.completed"], "data": {**EXAMPLES["order.completed"]["data"], "amount": amount}}
    result = validate(raw, now=NOW)
    assert isinstance(result, list) and "data.amount" in [e.field for e in result]
