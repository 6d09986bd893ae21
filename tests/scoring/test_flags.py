"""Data features cannot use (another currency, a contract ending before it starts) is flagged,
kept in history, and ignored by the features."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from services.scoring import repository, service
from services.scoring.features import (
    FLAG_CONTRACT_DATES,
    FLAG_CURRENCY,
    NO_CONTRACT_END_DAYS,
    compute_features,
    event_flags,
)
from services.scoring.model import Predictor, TrainedModel
from services.scoring.tables import TABLES
from shared.db import create_tables, make_engine, session_scope

from .conftest import event_record

NOW = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def _order(at: datetime, amount: str, currency: str, customer: str = "c-1") -> object:
    return event_record(customer, "order.completed", at,
                        {"order_id": f"o-{amount}-{currency}", "amount": amount, "currency": currency})


def _contract(start: datetime, end: datetime, customer: str = "c-1") -> object:
    return event_record(customer, "subscription.started", start, {
        "contract_id": "k1", "plan": "plus", "price": "9.90", "currency": "EUR",
        "start_date": start.date().isoformat(), "end_date": end.date().isoformat(),
    })


def test_flags_name_what_is_unusable() -> None:
    assert event_flags("order.completed", {"amount": "5.00", "currency": "EUR"}) == []
    assert event_flags("order.completed", {"amount": "5.00", "currency": "USD"}) == [FLAG_CURRENCY]
    assert event_flags("order.refunded", {"amount": "5.00", "currency": "GBP"}) == [FLAG_CURRENCY]
    assert event_flags("order.completed", {"amount": "5.00", "currency": "USD"}, currency="USD") == []
    assert event_flags("subscription.started", {"start_date": "2026-03-01", "end_date": "2026-02-01"}) == [FLAG_CONTRACT_DATES]
    assert event_flags("subscription.renewed", {"start_date": "2026-03-01", "end_date": "2026-03-01"}) == []
    assert event_flags("subscription.started", {"start_date": "2026-03-01", "end_date": None}) == []
    assert event_flags("feedback.nps", {"score": 3}) == []


def test_features_ignore_the_unusable_part_only() -> None:
    usd = _order(NOW - 10 * DAY, "100.00", "USD").event
    eur = _order(NOW - 20 * DAY, "30.00", "EUR").event
    f = compute_features([usd, eur], NOW)
    assert f["orders_90d"] == 2.0 and f["orders_30d"] == 2.0  # the order counts ...
    assert f["spend_90d"] == 30.0 and f["spend_365d"] == 30.0  # ... its foreign amount does not
    assert f["days_since_last_order"] == 10.0

    backwards = _contract(NOW - 30 * DAY, NOW - 60 * DAY).event
    f = compute_features([backwards], NOW)
    assert f["has_contract"] == 1.0  # a contract exists; its impossible end date is ignored
    assert f["days_to_contract_end"] == NO_CONTRACT_END_DAYS
    sane = _contract(NOW - 30 * DAY, NOW + 60 * DAY).event
    assert compute_features([sane], NOW)["days_to_contract_end"] == 60.0


def test_flagged_events_are_kept_and_flagged_once(database_url: str, trained_model: TrainedModel) -> None:
    r = trained_model.report
    predictor = Predictor(r.version, r.feature_names, trained_model.estimator, r.roc_auc)
    records = [
        _order(NOW - 1 * DAY, "100.00", "USD"),
        _order(NOW - 2 * DAY, "20.00", "EUR"),
        _contract(NOW - 5 * DAY, NOW - 50 * DAY),
    ]
    engine = make_engine(database_url)
    try:
        create_tables(engine, TABLES)
        with session_scope(engine) as session:
            service.process_batch(session, records, predictor, service.Bands(), NOW)
            assert sorted(service.flag_events(session, records, NOW)) == [FLAG_CONTRACT_DATES, FLAG_CURRENCY]
        with session_scope(engine) as session:  # redelivery: nothing new
            service.process_batch(session, records, predictor, service.Bands(), NOW)
            assert service.flag_events(session, records, NOW) == []
        with session_scope(engine) as session:
            assert repository.count_events(session, "acme", "c-1") == 3
            assert repository.event_flags(session, "acme", "c-1") == {
                records[0].event.id: [FLAG_CURRENCY], records[2].event.id: [FLAG_CONTRACT_DATES],
            }
            assert repository.event_flags(session, "globex") == {}
            score = service.latest_score(session, "acme", "c-1")
            assert score is not None
            assert score.features["spend_90d"] == 20.0 and score.features["orders_90d"] == 2.0
            assert score.features["days_to_contract_end"] == NO_CONTRACT_END_DAYS
    finally:
        engine.dispose()
