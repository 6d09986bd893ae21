"""The framing of joined single events between the gateway and ingest (shared/joined.py):
pure logic, any bytes through unchanged, and a framing that does not add up refused by name."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.joined import (
    ANSWERS_HEADER,
    LENGTHS_HEADER,
    MAX_ITEMS,
    MalformedJoin,
    join_answers,
    join_bodies,
    split_answers,
    split_bodies,
)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=MAX_ITEMS))
def test_bodies_come_back_byte_for_byte(bodies: list[bytes]) -> None:
    assert split_bodies(*join_bodies(bodies)) == bodies


@given(st.lists(st.tuples(st.integers(100, 599), st.binary(max_size=300)), min_size=1, max_size=MAX_ITEMS))
def test_answers_come_back_with_their_status(answers: list[tuple[int, bytes]]) -> None:
    body, header = join_answers(answers)
    assert split_answers(body, header, len(answers)) == answers


@pytest.mark.parametrize(("body", "lengths", "named"), [
    (b"abc", None, f"missing {LENGTHS_HEADER}"),
    (b"abc", "", f"missing {LENGTHS_HEADER}"),
    (b"abc", "1,x", f"malformed {LENGTHS_HEADER}"),
    (b"abc", "4,-1", f"malformed {LENGTHS_HEADER}"),
    (b"abc", "1,1", "says 2 bytes; the body has 3"),
    (b"abc", "2,2", "says 4 bytes; the body has 3"),
    (b"a" * (MAX_ITEMS + 1), ",".join(["1"] * (MAX_ITEMS + 1)), f"{MAX_ITEMS + 1} joined events; at most {MAX_ITEMS}"),
])
def test_a_request_framing_that_does_not_add_up_is_refused(body: bytes, lengths: str | None, named: str) -> None:
    with pytest.raises(MalformedJoin, match=named):
        split_bodies(body, lengths)


@pytest.mark.parametrize(("body", "header", "expected", "named"), [
    (b"{}", None, 1, f"no {ANSWERS_HEADER}"),
    (b"{}", "202", 1, f"malformed {ANSWERS_HEADER}"),
    (b"{}", "202:x", 1, f"malformed {ANSWERS_HEADER}"),
    (b"{}{}", "202:2,202:2", 1, "2 answers for 1 joined events"),
    (b"{}", "202:3", 1, "says 3 bytes; the body has 2"),
])
def test_an_answer_framing_that_does_not_add_up_is_refused(body: bytes, header: str | None, expected: int,
                                                           named: str) -> None:
    with pytest.raises(MalformedJoin, match=named):
        split_answers(body, header, expected)
