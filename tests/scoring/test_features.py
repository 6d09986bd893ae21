"""Features are pure functions of (history, as_of): hand-built histories, cut-offs, order."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from services.scoring.features import (
    FEATURE_NAMES,
    NEUTRAL_NPS,
    NO_CONTRACT_END_DAYS,
    HistoryEvent,
    compute_features,
    feature_vector,
    to_history_event,
    with_events,
)
from services.scoring.simulate import simulate_history
from shared.events import parse_event

AS_OF = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def ev(kind: str, days_ago: float, **data: Any) -> dict[str, Any]:
    return {"type": kind, "occurred_at": AS_OF - timedelta(days=days_ago), "data": data}


def order(days_ago: float, amount: str = "10.00") -> dict[str, Any]:
    return ev("order.completed", days_ago, order_id=f"o{days_ago}", amount=amount, currency="EUR")


def contract(kind: str, days_ago: float, ends_in_days: int | None, auto_renew: bool = False) -> dict[str, Any]:
    end = (AS_OF + timedelta(days=ends_in_days)).date().isoformat() if ends_in_days is not None else None
    return ev(kind, days_ago, contract_id="k1", plan="plus", price="19.90", currency="EUR",
              start_date=(AS_OF - timedelta(days=days_ago)).date().isoformat(), end_date=end, auto_renew=auto_renew)


def test_feature_names_are_the_ordered_keys_of_every_vector() -> None:
    features = compute_features([order(3)], AS_OF)
    assert tuple(features) == FEATURE_NAMES
    assert feature_vector(features) == [features[name] for name in FEATURE_NAMES]
    with pytest.raises(KeyError):
        feature_vector({"orders_30d": 1.0})


def test_empty_history_gives_neutral_defaults() -> None:
    f = compute_features([], AS_OF)
    assert f["days_since_last_activity"] == 0.0 and f["tenure_days"] == 0.0
    assert f["last_nps"] == NEUTRAL_NPS and f["has_nps"] == 0.0
    assert f["has_contract"] == 0.0 and f["days_to_contract_end"] == NO_CONTRACT_END_DAYS
    assert f["orders_365d"] == 0.0 and f["tickets_open"] == 0.0


def test_recency_counts_any_event_and_uses_as_of_not_the_wall_clock() -> None:
    f = compute_features([order(30), ev("session.recorded", 2.5, duration_seconds=60)], AS_OF)
    assert f["days_since_last_activity"] == pytest.approx(2.5)
    assert f["days_since_last_order"] == pytest.approx(30)
    long_ago = datetime(2019, 1, 10, tzinfo=timezone.utc)
    f = compute_features([{"type": "session.recorded", "occurred_at": "2019-01-05T00:00:00Z", "data": {}}], long_ago)
    assert f["days_since_last_activity"] == pytest.approx(5)


def test_order_counts_spend_and_trend_by_window() -> None:
    history = [order(10, "59.90"), order(40, "0.10"), order(100, "20.00"), order(200, "1000"), order(400, "5")]
    f = compute_features(history, AS_OF)
    assert (f["orders_30d"], f["orders_90d"], f["orders_365d"]) == (1.0, 2.0, 4.0)
    assert f["spend_90d"] == pytest.approx(60.0)
    assert f["spend_365d"] == pytest.approx(1080.0)
    # last 90 days: 2 orders; the 90 before: 1 (day 100) -> (2 - 1) / (2 + 1)
    assert f["order_trend"] == pytest.approx(1 / 3)
    assert compute_features([order(100)], AS_OF)["order_trend"] == -1.0
    assert compute_features([order(5)], AS_OF)["order_trend"] == 1.0


def test_refunds_complaints_and_open_tickets() -> None:
    history = [
        ev("order.refunded", 20, order_id="o1", amount="5.00", currency="EUR"),
        ev("order.refunded", 380, order_id="o0", amount="5.00", currency="EUR"),
        ev("support.complaint", 10, severity="high"),
        ev("support.complaint", 95, severity="low"),
        ev("support.ticket_opened", 30, ticket_id="t1"),
        ev("support.ticket_opened", 20, ticket_id="t2"),
        ev("support.ticket_opened", 5, ticket_id="t3"),
        ev("support.ticket_resolved", 18, ticket_id="t2"),
        ev("support.ticket_resolved", -1, ticket_id="t3"),  # resolved after as_of: still open
    ]
    f = compute_features(history, AS_OF)
    assert f["refunds_365d"] == 1.0
    assert f["complaints_90d"] == 1.0
    assert f["tickets_open"] == 2.0


def test_last_nps_wins_and_sets_the_flag() -> None:
    f = compute_features([ev("feedback.nps", 50, score=9), ev("feedback.nps", 5, score=3)], AS_OF)
    assert (f["last_nps"], f["has_nps"]) == (3.0, 1.0)


def test_contract_end_auto_renew_and_notice_follow_the_latest_term() -> None:
    started = [contract("subscription.started", 300, ends_in_days=40)]
    f = compute_features(started, AS_OF)
    assert (f["has_contract"], f["days_to_contract_end"], f["contract_auto_renew"]) == (1.0, 40.0, 0.0)

    noticed = started + [ev("subscription.cancellation_notice", 3, contract_id="k1", notice_period_days=30)]
    assert compute_features(noticed, AS_OF)["cancellation_notice_given"] == 1.0

    renewed = noticed + [contract("subscription.renewed", 1, ends_in_days=400, auto_renew=True)]
    f = compute_features(renewed, AS_OF)
    assert (f["days_to_contract_end"], f["contract_auto_renew"], f["cancellation_notice_given"]) == (400.0, 1.0, 0.0)

    open_ended = compute_features([contract("subscription.started", 10, ends_in_days=None)], AS_OF)
    assert (open_ended["has_contract"], open_ended["days_to_contract_end"]) == (1.0, NO_CONTRACT_END_DAYS)


def test_tenure_from_first_event_or_earlier_sign_up() -> None:
    assert compute_features([order(100), order(3)], AS_OF)["tenure_days"] == pytest.approx(100)
    signed_up = (AS_OF - timedelta(days=300)).isoformat()
    f = compute_features([ev("customer.profile_updated", 100, signed_up_at=signed_up), order(3)], AS_OF)
    assert f["tenure_days"] == pytest.approx(300)


def test_events_after_as_of_are_invisible() -> None:
    past = [contract("subscription.started", 200, ends_in_days=30), order(10), ev("feedback.nps", 20, score=9)]
    future = [
        order(-0.001), ev("support.complaint", -1), ev("feedback.nps", -2, score=0),
        ev("subscription.cancellation_notice", -3, contract_id="k1"),
        contract("subscription.renewed", -4, ends_in_days=500, auto_renew=True),
        ev("support.ticket_opened", -1, ticket_id="t9"),
    ]
    assert compute_features(past + future, AS_OF) == compute_features(past, AS_OF)
    # ... and they count once the cut-off has passed them
    later = compute_features(past + future, AS_OF + timedelta(days=5))
    assert later["complaints_90d"] == 1.0 and later["last_nps"] == 0.0 and later["days_to_contract_end"] == 495.0


def test_arrival_order_and_event_shape_do_not_matter() -> None:
    end = datetime(2026, 1, 1, tzinfo=timezone.utc)
    events = [e for e in simulate_history(5, seed=3, end=end)]
    by_customer: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_customer.setdefault(event["customer_id"], []).append(event)
    rng = random.Random(1)
    for history in by_customer.values():
        for as_of in (end - timedelta(days=200), end):
            expected = compute_features(history, as_of)
            for _ in range(3):
                shuffled = history[:]
                rng.shuffle(shuffled)
                assert compute_features(shuffled, as_of) == expected
            assert compute_features([parse_event(e) for e in shuffled], as_of) == expected
            assert compute_features([to_history_event(e) for e in shuffled], as_of) == expected


def test_adding_events_to_a_sorted_history_gives_what_sorting_everything_gives() -> None:
    """with_events: in order (only the new events sorted), out of order, ties on time (the type's
    rank and then the id decide), and empty either side; the same list, event for event, as one
    stable sort of both."""
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    kinds = ["order.completed", "subscription.started", "subscription.ended", "support.complaint", "feedback.nps"]

    def event(n: int, minute: int) -> HistoryEvent:
        return HistoryEvent(type=rng.choice(kinds), occurred_at=start + timedelta(minutes=minute), id=f"e{n:04d}")

    for case in range(300):
        size, added = rng.randint(0, 12), rng.randint(0, 6)
        later = case % 2 == 0  # half the cases: every new event after the history
        events = [event(n, rng.randint(0, 30)) for n in range(size)]
        history = sorted(events, key=HistoryEvent.sort_key)
        offset = 30 if later else 0
        new = [event(size + n, offset + rng.randint(0, 30)) for n in range(added)]
        expected = sorted([*history, *new], key=HistoryEvent.sort_key)
        got = with_events(history, new)
        assert [e.id for e in got] == [e.id for e in expected], case
        assert got is not history  # the cached list is never changed in place
