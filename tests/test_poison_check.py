"""tests/poison.py's check says what is wrong with a dead-letter topic: a record nobody poisoned,
a poisoned record missing (per consumer group), a reason that does not name the problem."""

from __future__ import annotations

import pytest
from aiokafka import ConsumerRecord

from shared.topics import CUSTOMER_EVENTS, dead_letter
from tests.poison import Poisoned, check_dead_letters, poisoned_events

TOPIC = "t1-" + dead_letter(CUSTOMER_EVENTS)


def letter(p: Poisoned | None, reason: str, group: str = "scoring", offset: int = 0) -> ConsumerRecord:
    key, value = (p.key, p.value) if p else (b"t/c-1", b'{"an": "innocent record"}')
    headers = [("reason", reason.encode()), ("source-topic", b"t1-customer-events"),
               ("source-partition", b"0"), ("source-offset", str(offset).encode()), ("consumer-group", group.encode())]
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, key, value, None, len(key), len(value), headers)


def good_letters(poison: list[Poisoned], group: str = "scoring") -> list[ConsumerRecord]:
    reasons = {"undecodable-bytes": "undecodable: ValidationError: Invalid JSON: expected value",
               "occurred-after-received": "unprocessable: occurred_at x is 48.0 h after received_at y",
               "nul-in-customer-id": "unprocessable: failed 2 times: DataError: cannot contain NUL (0x00) bytes"}
    return [letter(p, reasons[p.name], group, n) for n, p in enumerate(poison)]


def test_the_poisoned_set_passes_per_group() -> None:
    poison = poisoned_events("t", "c-1", postgres=True)
    records = good_letters(poison, "scoring") + good_letters(poison, "actions-events")
    found = check_dead_letters(records, poison, max_attempts=2,
                               groups={CUSTOMER_EVENTS: ["scoring", "actions-events"]})
    assert {name: len(rs) for (_, name), rs in found.items()} == {p.name: 2 for p in poison}


def test_every_problem_is_named() -> None:
    poison = poisoned_events("t", "c-1", postgres=True)
    records = good_letters(poison)
    records[1] = letter(poison[1], "unprocessable: something else")  # reason does not name it
    records[2] = letter(poison[2], "unprocessable: failed 3 times: DataError: NUL (0x00)")  # wrong attempts
    records.append(letter(None, "undecodable: ?"))  # nobody poisoned this one
    with pytest.raises(AssertionError) as raised:
        check_dead_letters(records, poison, max_attempts=2, groups={CUSTOMER_EVENTS: ["scoring", "actions-events"]})
    message = str(raised.value)
    assert "(occurred-after-received): reason 'unprocessable: something else' should start with" in message
    assert "(nul-in-customer-id): reason 'unprocessable: failed 3 times" in message
    assert "not a deliberately poisoned record" in message and "innocent record" in message
    assert "undecodable-bytes on customer-events: no dead letter from group actions-events" in message


def test_repeats_fail_only_when_exactly_once_is_asked() -> None:
    poison = poisoned_events("t", "c-1", postgres=False)
    records = good_letters(poison) + good_letters(poison)
    with pytest.raises(AssertionError, match="2 dead letters from group scoring, expected one"):
        check_dead_letters(records, poison, max_attempts=3, groups={CUSTOMER_EVENTS: ["scoring"]})
    check_dead_letters(records, poison, max_attempts=3, groups={CUSTOMER_EVENTS: ["scoring"]}, exactly_once=False)
