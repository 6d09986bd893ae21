"""The fast path (pydantic straight from the request bytes) may only ever accept what the slow
path (decode, check, validate event by event) accepts, and must parse it to the same events."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.service import (
    MalformedJson,
    decode_json,
    parse_all_or_nothing,
    parse_one_or_nothing,
    validate,
)
from tests.shared.test_events import documented_examples

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
EXAMPLES = documented_examples()

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.sampled_from(["59.90", "EUR", "2026-01-01T00:00:00Z", "2026-01-01", "2999-01-01T00:00:00Z", "\x00", "\ud800"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=25,
)
raw_literals = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "01", "\"\\u0000\"", "\"\\ud800\"", "[" * 30 + "]" * 30])


def slow_path(body: bytes) -> tuple[list[Any], int] | None:
    """(good events, number of rejected) as the slow path decides; None if the body is refused."""
    try:
        raw = decode_json(body)
    except MalformedJson:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("events"), list):
        return None
    good, rejected = [], 0
    for index, item in enumerate(raw["events"]):
        result = validate(item, index, NOW)
        if isinstance(result, list):
            rejected += 1
        else:
            good.append(result)
    return good, rejected


def assert_agree(body: bytes) -> None:
    fast = parse_all_or_nothing(body, NOW)
    if fast is not None:
        assert slow_path(body) == (fast, 0)


def test_valid_batches_take_the_fast_path_and_parse_alike() -> None:
    body = json.dumps({"events": EXAMPLES}).encode()
    fast = parse_all_or_nothing(body, NOW)
    assert fast is not None and slow_path(body) == (fast, 0)
    for example in EXAMPLES:
        one = json.dumps(example).encode()
        assert parse_one_or_nothing(one, NOW) == validate(json.loads(one), now=NOW)


def test_anything_doubtful_is_left_to_the_slow_path() -> None:
    good = EXAMPLES[2]
    for body in [
        json.dumps({"events": [good, {**good, "id": "a\u0000b"}]}).encode(),  # NUL escape
        json.dumps({"events": [good], "extra": 1}).encode(),  # extra key: slow path ignores it
        b'{"events": [' + json.dumps(good).encode()[:-1] + b', "x": NaN}]}',
        json.dumps({"events": [{**good, "occurred_at": 1767225600}]}).encode(),  # epoch number
        b'{"events": [' + json.dumps(good).encode() + b"]",  # truncated
    ]:
        assert parse_all_or_nothing(body, NOW) is None


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=len(EXAMPLES) - 1),
    path=st.lists(st.sampled_from(["data", "id", "type", "customer_id", "occurred_at", "source", "amount",
                                   "currency", "score", "attributes", "end_date", "auto_renew", "x"]),
                  min_size=1, max_size=2),
    value=json_values,
)
def test_fast_path_never_accepts_what_the_slow_path_refuses(index: int, path: list[str], value: Any) -> None:
    event = json.loads(json.dumps(EXAMPLES[index]))
    target = event
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target.get(key), dict) else target
    target[path[-1]] = value
    assert_agree(json.dumps({"events": [EXAMPLES[0], event]}).encode())


@settings(max_examples=100, deadline=None)
@given(index=st.integers(min_value=0, max_value=len(EXAMPLES) - 1), literal=raw_literals,
       key=st.sampled_from(["score", "amount", "x", "points"]))
def test_fast_path_never_accepts_odd_json_literals(index: int, literal: str, key: str) -> None:
    event = json.dumps(EXAMPLES[index])
    data_at = event.index('"data": {') + len('"data": {')
    spliced = event[:data_at] + f'"{key}": {literal}, ' + event[data_at:]
    assert_agree(('{"events": [' + spliced + "]}").encode())


def test_the_slow_path_takes_valid_json_orjson_refuses_and_explains_what_it_cannot_take() -> None:
    assert decode_json(b'{"n": 1180591620717411303424}') == {"n": 2**70}  # beyond 64 bits
    for body, reason in [(b'{"s": "\\ud800"}', "unpaired surrogate"), (b'{"s": "a\\u0000"}', "NUL"),
                         (b'{"x": NaN}', "numbers must be finite"), (b'{"x": 1,}', "line 1 column 9")]:
        try:
            decode_json(body)
        except MalformedJson as exc:
            assert reason in str(exc)
        else:
            raise AssertionError(f"{body!r} was accepted")
