"""bench.scoring reads the instance's counter often only where the measured interval may begin or
end (each reading is a request the measured instance serves)."""

from __future__ import annotations

from bench.scoring import CLOSE_POLL_S, FAR_POLL_S, next_poll_s


def test_often_until_the_first_events_are_counted() -> None:
    assert next_poll_s(0, 20_000, None) == CLOSE_POLL_S
    assert next_poll_s(1_000, 20_000, None) == CLOSE_POLL_S  # no rate yet


def test_seldom_while_the_end_is_far_and_often_near_it() -> None:
    assert next_poll_s(2_000, 20_000, rate=10_000) == FAR_POLL_S  # 1.8 s to go
    assert next_poll_s(14_000, 20_000, rate=10_000) == FAR_POLL_S  # 0.6 s: more than two far readings away
    assert next_poll_s(16_000, 20_000, rate=10_000) == CLOSE_POLL_S  # 0.4 s
    assert next_poll_s(19_000, 20_000, rate=10_000) == CLOSE_POLL_S  # 0.1 s to go
    assert FAR_POLL_S > 5 * CLOSE_POLL_S
